"""How our Triton kernels become torch operators (models/kernel_ops.py): the mode chosen at import,
its refusal of bad settings, and ``launch``'s handling of stand-ins and fake tensors."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

# which of our Triton ops torch.compile decomposes into their kernels (a triton_op registers its body
# for functionalisation) -- all eight, or none where they stay opaque custom ops
PROBE = """
from torch._library.custom_ops import OPDEFS
from torch._subclasses.functional_tensor import FunctionalTensorMode
from mdtzoo.models import kernel_ops, triton_attention, triton_norm
traced = sorted(n for n in kernel_ops.OPS if FunctionalTensorMode in OPDEFS[n]._torch_dispatch_fns)
print("MODE", kernel_ops.MODE, sorted(kernel_ops.OPS), "TRACED", traced)
"""
OPS = ["mdtzoo::batch_sum", "mdtzoo::gated_residual_norm", "mdtzoo::gated_residual_norm_bwd", "mdtzoo::kept_grad",
       "mdtzoo::norm_modulate", "mdtzoo::norm_modulate_bwd", "mdtzoo::relbias_flash_bwd_offsets",
       "mdtzoo::relbias_flash_fwd_offsets"]


def _probe(script=PROBE, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MDTZOO_KERNEL_OPS")}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**base, **env})


def test_mode_is_triton_op_with_compiled_kernels_and_custom_op_under_the_interpreter():
    plain, interpreted, custom = _probe(), _probe(TRITON_INTERPRET="1"), _probe(MDTZOO_KERNEL_OPS="custom")
    for proc in (plain, interpreted, custom):
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"MODE triton {OPS} TRACED {OPS}" in plain.stdout, plain.stdout
    assert f"MODE custom {OPS} TRACED []" in interpreted.stdout, interpreted.stdout  # the interpreter: opaque
    assert f"MODE custom {OPS} TRACED []" in custom.stdout, custom.stdout


@pytest.mark.parametrize("env, message", [
    ({"MDTZOO_KERNEL_OPS": "fast"}, "MDTZOO_KERNEL_OPS='fast' is not a kernel-op mode; valid: 'triton', 'custom'"),
    ({"MDTZOO_KERNEL_OPS": "triton", "TRITON_INTERPRET": "1"}, "under TRITON_INTERPRET=1 use 'custom'"),
])
def test_bad_modes_are_refused_at_import_with_what_is_valid(env, message):
    proc = _probe(**env)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_a_torch_without_triton_op_takes_custom_ops_and_refuses_triton_mode():
    probe = "import torch\ndel torch.library.triton_op\n" + PROBE  # as torch < 2.6
    old, forced = _probe(probe), _probe(probe, MDTZOO_KERNEL_OPS="triton")
    assert old.returncode == 0 and f"MODE custom {OPS} TRACED []" in old.stdout, old.stderr[-2000:]
    assert forced.returncode != 0 and "needs torch.library.triton_op (torch >= 2.6)" in forced.stderr


def test_launch_runs_stand_ins_directly_and_skips_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mdtzoo.models.kernel_ops import launch

    calls = []

    class StandIn:  # anything indexable by a grid that is not a JITFunction
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    x = torch.zeros(3)
    launch(StandIn(), (2, 1))(x, 5, BLOCK=16)
    assert calls == [((2, 1), (x, 5), {"BLOCK": 16})]
    with FakeTensorMode() as mode:  # an op's fake kernel runs its body: shapes only, no launch
        launch(StandIn(), (2,))(mode.from_tensor(x), 5)
    assert len(calls) == 1


def test_overridden_applies_settings_inside_and_restores_the_config_even_after_an_error():
    from mdtzoo.models.kernel_ops import overridden

    config = {"warps": 4, "rows": 2}
    with overridden(config, {"warps": 16}) as inside:
        assert inside is config and config == {"warps": 16, "rows": 2}
    assert config == {"warps": 4, "rows": 2}
    with pytest.raises(RuntimeError), overridden(config, {"rows": 8, "new": 1}):
        raise RuntimeError
    assert config == {"warps": 4, "rows": 2}  # the added key gone too
