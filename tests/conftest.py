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
