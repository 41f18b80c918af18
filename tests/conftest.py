"""Shared test setup: gin state is cleared around every test; hypothesis profiles."""

import os
import subprocess
import sys

import gin
import pytest
import torch
from hypothesis import HealthCheck, settings

import mdtzoo  # noqa: F401  (registers every component)

settings.register_profile(
    "default", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))

# One thread: the tests' models are tiny, and several test processes (DDP, submitit jobs) share
# two cores; oversubscribed OpenMP threads made some tests 10x slower.
torch.set_num_threads(1)


BLOCK_SWITCH_SCRIPT = """
import torch
from mdtzoo.models.blocks import Block
import mdtzoo.models.{module} as kernels
{setup}
launches = []
launch = kernels.launch
kernels.launch = lambda kernel, grid: (launches.append(kernel), launch(kernel, grid))[1]  # counted
res, counts = [], []
for impl, compiled, checkpointed in (("torch", False, False), ("triton", False, False), ("triton", True, False),
                                     ("triton", False, True)):
    launches.clear()
    torch.manual_seed(1)
    block = Block(24, 2, {option}=impl)
    block.checkpoint_activations = checkpointed  # the forward recomputed in the backward
    if compiled:  # the ops inside a compiled block: fake kernels, autograd, no graph break
        block.compile(dynamic=False, fullgraph=True)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    c = torch.randn(2, 24, generator=torch.Generator().manual_seed(3))
    y = block(x, c)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    res.append([y, x.grad] + [p.grad for p in block.parameters()])
    counts.append(len(launches))
print("LAUNCHES", *counts)
print("WORST", max(((a - b).norm() / b.norm()).item() for r in res[1:] for a, b in zip(r, res[0])))
"""


def block_switch_error(run, option: str, module: str, setup: str = "") -> float:
    """A ``Block`` with ``option='triton'`` -- eager, compiled (fullgraph) and activation-checkpointed --
    against ``option='torch'``, run by ``run`` (the ``triton_interpreter`` fixture): the worst relative
    error over the output and every gradient. Asserts that the 'triton' blocks launched kernels of
    ``models.<module>`` and the 'torch' block none. ``setup``: Python run first (kernel settings)."""
    out = run(BLOCK_SWITCH_SCRIPT.format(option=option, module=module, setup=setup))
    counts = [int(n) for n in out.split("LAUNCHES")[-1].split("WORST")[0].split()]
    assert counts[0] == 0 and all(n > 0 for n in counts[1:]), counts
    return float(out.split("WORST")[-1])


@pytest.fixture(autouse=True)
def _clear_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def triton_interpreter(tmp_path):
    """run(script, *args) -> stdout: a Python script run in a fresh process under Triton's CPU
    interpreter (TRITON_INTERPRET=1 must be set before triton is imported); the test fails with the
    script's stderr if it does. Skips where triton is not installed."""
    pytest.importorskip("triton")

    def run(script: str, *args: str) -> str:
        path = tmp_path / "interpreted.py"
        path.write_text(script)
        proc = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "TRITON_INTERPRET": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    return run
