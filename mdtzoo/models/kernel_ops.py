"""How our Triton kernels become torch operators: ``kernel_op`` and ``launch``.

By default an op is a ``torch.library.triton_op``. torch.compile then traces the op's Python body:
the kernels appear in the graph as calls of user-defined Triton kernels, and inductor launches them
from its own generated code with its own allocations and launcher. Only eager calls (and the CPU
interpreter) run the body as written.

The alternative, ``MDTZOO_KERNEL_OPS=custom`` in the environment before import, makes each op an opaque
``torch.library.custom_op``: inductor calls it through the dispatcher and its Python body runs at
every call (the ops' form up to session 9, kept as the benchmarks' baseline; docs/performance.md,
session 10). It is also the mode under Triton's CPU interpreter (``TRITON_INTERPRET=1``), whose
kernels torch.compile cannot trace: there a compiled graph calls the op, which runs the interpreter.

An op's body must be traceable by torch.compile either way: shapes and strides read in Python (fixed
under ``dynamic=False``), tensors allocated with torch, kernels launched through ``launch``. The
body is also the op's fake (meta) kernel, so the outputs' shapes, dtypes and strides are the real
ones by construction.
"""

from __future__ import annotations

import os

import torch
from torch._library.triton import set_wrap_triton_enabled
from torch._subclasses.fake_tensor import is_fake

try:
    from triton.runtime.jit import JITFunction
except ImportError:  # no Triton: no kernels to launch (the ops' callers take the torch maths)
    JITFunction = ()

MODES = ("triton", "custom")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MODE = os.environ.get("MDTZOO_KERNEL_OPS", "custom" if INTERPRETED else "triton")
if MODE not in MODES:
    raise ValueError(f"MDTZOO_KERNEL_OPS={MODE!r} is not a kernel-op mode; valid: {', '.join(map(repr, MODES))}")
if MODE == "triton" and INTERPRETED:
    raise ValueError("MDTZOO_KERNEL_OPS='triton' needs compiled Triton kernels; under TRITON_INTERPRET=1 use 'custom'")


def launch(kernel, grid):
    """``kernel[grid]`` as a traceable call (``torch.library.wrap_triton``). Anything else that
    takes a grid -- the interpreter's kernels, a test's stand-in -- runs directly, and not at all on
    fake tensors (the op's fake kernel: shapes only)."""
    if not isinstance(kernel, JITFunction):
        def run(*args, **kwargs):
            if not any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
                kernel[grid](*args, **kwargs)
        return run
    return torch.library.wrap_triton(kernel)[grid]


OPS: list[str] = []  # every operator made by ``kernel_op``, in the order made


def kernel_op(name: str):
    """Decorator: the function as the torch operator ``name`` (no argument mutated), in ``MODE``."""
    def wrap(fn):
        OPS.append(name)
        if MODE == "triton":
            return torch.library.triton_op(name, mutates_args=())(fn)

        def run(*args, **kwargs):  # launched directly, as triton_op's own eager path does
            with set_wrap_triton_enabled(False):
                return fn(*args, **kwargs)

        run.__name__, run.__doc__ = fn.__name__, fn.__doc__
        op = torch.library.custom_op(name, run, mutates_args=(), schema=torch.library.infer_schema(fn, mutates_args=()))
        op.register_fake(fn)  # traceable body: the kernels' launches do nothing on fake tensors
        return op
    return wrap
