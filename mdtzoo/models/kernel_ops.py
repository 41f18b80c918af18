"""How our Triton kernels become torch operators: ``kernel_op`` and ``launch``.

By default an op is a ``torch.library.triton_op``. torch.compile then traces the op's Python body:
the kernels appear in the graph as calls of user-defined Triton kernels, and inductor launches them
from its own generated code with its own allocations and launcher. Only eager calls (and the CPU
interpreter) run the body as written.

The alternative, ``MDTZOO_KERNEL_OPS=custom`` in the environment before import, makes each op an opaque
``torch.library.custom_op``: inductor calls it through the dispatcher and its Python body runs at
every call (the ops' form up to session 9, kept as the benchmarks' baseline; docs/performance.md,
session 10). It is also the mode under Triton's CPU interpreter (``TRITON_INTERPRET=1``), whose
kernels torch.compile cannot trace: there a compiled graph calls the op, which runs the interpreter;
and with a torch older than 2.6, which has no ``triton_op``.

An op's body must be traceable by torch.compile either way: shapes and strides read in Python (fixed
under ``dynamic=False``), tensors allocated with torch, kernels launched through ``launch``. The
body is also the op's fake (meta) kernel, so the outputs' shapes, dtypes and strides are the real
ones by construction.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch._subclasses.fake_tensor import is_fake

try:
    from triton.runtime.jit import JITFunction
except ImportError:  # no Triton: no kernels to launch (the ops' callers take the torch maths)
    JITFunction = ()
HAS_TRITON = JITFunction != ()

MODES = ("triton", "custom")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")  # torch >= 2.6
MODE = os.environ.get("MDTZOO_KERNEL_OPS", "custom" if INTERPRETED or not HAS_TRITON_OP else "triton")
if MODE not in MODES:
    raise ValueError(f"MDTZOO_KERNEL_OPS={MODE!r} is not a kernel-op mode; valid: {', '.join(map(repr, MODES))}")
if MODE == "triton" and INTERPRETED:
    raise ValueError("MDTZOO_KERNEL_OPS='triton' needs compiled Triton kernels; under TRITON_INTERPRET=1 use 'custom'")
if MODE == "triton" and not HAS_TRITON_OP:
    raise ValueError(f"MDTZOO_KERNEL_OPS='triton' needs torch.library.triton_op (torch >= 2.6); this is torch "
                     f"{torch.__version__}: use 'custom'")

OPS: list[str] = []  # every operator made by ``kernel_op``, in the order made


def launch(kernel, grid):
    """``kernel[grid]``: in 'triton' mode a traceable call (``torch.library.wrap_triton``) that
    torch.compile records in its graph. Otherwise -- 'custom' mode, the interpreter's kernels, a
    test's stand-in -- a direct launch, skipped on fake tensors (the op's fake kernel: shapes only)."""
    if MODE == "triton" and isinstance(kernel, JITFunction):
        return torch.library.wrap_triton(kernel)[grid]

    def run(*args, **kwargs):
        if not any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
            kernel[grid](*args, **kwargs)
    return run


@contextlib.contextmanager
def overridden(config: dict, settings: dict):
    """Inside, a kernels' ``CONFIG`` dict with ``settings`` applied; the dict as it was afterwards
    (also after an error)."""
    saved = dict(config)
    config.update(settings)
    try:
        yield config
    finally:
        config.clear()
        config.update(saved)


def kernel_op(name: str):
    """Decorator: the function as the torch operator ``name`` (no argument mutated), in ``MODE``."""
    def wrap(fn):
        OPS.append(name)
        if MODE == "triton":
            return torch.library.triton_op(name, mutates_args=())(fn)
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)  # the body: its launches do nothing on fake tensors
        return op
    return wrap
