"""Our Triton kernels as an H100 would run them, read on any machine: launches recorded instead of
run, compiled for sm_90 from the CPU, and ptxas's register and spill report.

Used by the codegen tests (tests/test_triton_codegen.py: 16-byte accesses, tensor-core products,
float arguments as inductor passes them) and by ``experiments/bench/norm_sweep.py --registers``
(each launch setting's registers per thread and the warps that fit on an SM).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile

import torch

REGISTERS_PER_SM = 65536  # sm_90's register file, 32-bit registers
MAX_WARPS_PER_SM = 64


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


@contextlib.contextmanager
def recording(module, names):
    """Inside, ``module``'s kernels ``names`` record their launches instead of running; yields the
    list of (name, kernel, args, kwargs) the launches fill in, in ``names`` order, once it closes."""
    saved = {name: getattr(module, name) for name in names}
    recorders = {name: _Recorder(saved[name]) for name in names}
    launches = []
    try:
        for name in names:
            setattr(module, name, recorders[name])
        yield launches
    finally:
        for name in names:
            setattr(module, name, saved[name])
    launches += [(name, saved[name], *call) for name in names for call in recorders[name].calls]


def sm90_ptx(fn, args, kwargs, floats: str = "fp32") -> str:
    """The PTX of ``fn`` compiled for sm_90 as the JIT would specialise this launch (integers
    divisible by 16 and 16-byte-aligned pointers marked so; Python floats typed ``floats``: Triton's
    JIT passes them as fp32, inductor's launcher as fp64). ``kwargs`` may hold num_warps/num_stages."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
    values = dict(zip(fn.arg_names, args)) | kwargs
    types = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64"}
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = types[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = floats
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    return compiled.asm["ptx"]


def ptxas_usage(ptx: str) -> dict[str, int]:
    """{'registers': per thread, 'spill_bytes': stores + loads} from Triton's bundled ptxas for sm_90a."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        raise FileNotFoundError(f"no ptxas at {ptxas}: this Triton build ships none; the report needs it")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", out)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
    if registers is None:
        raise RuntimeError(f"ptxas reported no register count:\n{out}")
    return {"registers": int(registers.group(1)), "spill_bytes": sum(spills)}


def warps_per_sm(registers: int, num_warps: int) -> int:
    """Warps of one kernel resident on an sm_90 SM, as its registers allow (whole programs of
    ``num_warps`` warps; registers allocated per warp in units of 256; shared memory not counted)."""
    per_warp = -(-registers * 32 // 256) * 256
    programs = REGISTERS_PER_SM // (per_warp * num_warps)
    return min(programs * num_warps, MAX_WARPS_PER_SM - MAX_WARPS_PER_SM % num_warps)


def launch_usage(fn, args, kwargs) -> dict[str, int]:
    """A recorded launch's ptxas report on sm_90 with its resident warps per SM added:
    {'registers', 'spill_bytes', 'warps_per_sm'}."""
    use = ptxas_usage(sm90_ptx(fn, args, kwargs))
    return use | {"warps_per_sm": warps_per_sm(use["registers"], kwargs.get("num_warps", 4))}
