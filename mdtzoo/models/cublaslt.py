"""cuBLASLt matmuls with fused GELU and bias-gradient epilogues, called through ctypes (no compiled extension).

The training MLP is y = fc2(gelu(u)), u = fc1(h). torch's cuBLAS calls offer the GELU epilogue only
in a forward that drops u (``torch._addmm_activation``), so its backward must keep u from another
matmul and run the GELU as separate elementwise kernels. cuBLASLt itself has both halves:

- ``linear_gelu(x, w, b)``: g = gelu_tanh(x w^T + b) and u = x w^T + b from one matmul
  (epilogue GELU_AUX_BIAS: u is written as the "aux" output beside g);
- ``dgelu_linear(dy, w, u)``: du = (dy w) * gelu_tanh'(u) from one matmul (epilogue DGELU, reading u
  as the aux input), so neither dg nor a separate GELU-backward kernel exists. cuBLASLt can sum du's
  columns in the same epilogue (DGELU_BGRAD, ``dgelu_linear_bgrad``), but its algorithms for that
  took 2.2-3.5x DGELU's time on an H100, more than the sum saves (docs/performance.md, session 17);
- ``weight_grad(dy, x)``: a Linear layer's weight gradient dy^T x and its bias gradient, dy's column
  sums, from one matmul (epilogue BGRADB), for fc2 (dy) and fc1 (du).

cuBLASLt's GELU is the tanh approximation that DiT and MDT use. Row-major tensors are passed as the
transposed column-major problem (a row-major (T, F) output is column-major (F, T), whose rows are the
features, so the bias and its gradient run along cuBLASLt's rows).

The library is the libcublasLt that torch's CUDA build has loaded (found in the process's memory
map; ``MDTZOO_CUBLASLT`` names another file). Handles, descriptors and chosen algorithms are cached
per device and problem; each device gets a 32 MiB workspace once, so the calls can be captured in
CUDA graphs. A problem runs the heuristic's first algorithm unless the tuned table
(``cublaslt_algos.json``, measured by experiments/bench/lt_tune.py for a card and library version)
names a faster one of those the heuristic offers; the choice is fixed per problem, so results repeat. Calls run on torch's current stream. 16-bit inputs only (bf16 or fp16, all the same
dtype), float32 accumulation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

# Enum values of cublasLt.h / library_types.h (CUDA 12 and 13).
_DTYPES = {torch.bfloat16: 14, torch.float16: 2}  # cudaDataType_t: CUDA_R_16BF, CUDA_R_16F
_R_32F = 0
_COMPUTE_32F = 68  # cublasComputeType_t
_OP_N, _OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_DESC_AUX_POINTER, _DESC_AUX_LD = 11, 12
_PREF_MAX_WORKSPACE = 1
_PREF_MIN_ALIGNMENT = {"a": 5, "b": 6, "c": 7, "d": 8}
EPILOGUES = {"gelu_aux_bias": 164, "dgelu": 192, "dgelu_bgrad": 208, "bgradb": 512}
WORKSPACE_BYTES = 32 << 20
CANDIDATES = 8  # algorithms asked of the heuristic per problem
# Which of them runs: for benchmarks, ALGO_PICK[epilogue] (lt_parts.py --sweep); else the index the tuned
# table gives for the problem on this card and library version (``tuned``); else the heuristic's first.
# Either way a problem always gets the same algorithm, so a resumed run computes what the first run did.
ALGO_PICK: dict[str, int] = {}
# cublaslt_algos.json: {"<card>|<libcublasLt version>": {"<problem>": index}}, written by
# experiments/bench/lt_tune.py from timed sweeps; MDTZOO_LT_TUNED=0 (before the first call): not read.
TUNED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cublaslt_algos.json")


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


_lib = None
_handles: dict[int, ctypes.c_void_p] = {}
_workspaces: dict[int, torch.Tensor] = {}
_plans: dict[tuple, tuple] = {}
_tuned: dict[int, dict[str, int]] = {}  # device -> this card's and library's table
_picks: dict[tuple, int] = {}  # plan key -> the index it runs (ALGO_PICK aside)


def _library_path() -> str | None:
    """MDTZOO_CUBLASLT, else the libcublasLt mapped into this process (torch's), else the linker's."""
    if os.environ.get("MDTZOO_CUBLASLT"):
        return os.environ["MDTZOO_CUBLASLT"]
    if torch.cuda.is_available():
        torch.cuda.init()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libcublasLt.so"):
                    return path
    except OSError:
        pass
    return ctypes.util.find_library("cublasLt")


def library():
    """The loaded libcublasLt (ctypes), or a RuntimeError saying what is missing."""
    global _lib
    if _lib is None:
        path = _library_path()
        if path is None:
            raise RuntimeError("mlp_impl='cublaslt' needs CUDA's libcublasLt, which this process has not loaded and "
                               "the linker cannot find; use a CUDA build of torch, set MDTZOO_CUBLASLT to the "
                               "library's path, or use mlp_impl='torch'")
        try:
            lib = ctypes.CDLL(path)
        except OSError as err:
            raise RuntimeError(f"mlp_impl='cublaslt': cannot load libcublasLt from {path!r} ({err})") from err
        p = ctypes.c_void_p
        lib.cublasLtMatmul.argtypes = [p, p, p, p, p, p, p, p, p, p, p, p, p, p, ctypes.c_size_t, p]
        lib.cublasLtMatmulDescSetAttribute.argtypes = [p, ctypes.c_int, p, ctypes.c_size_t]
        lib.cublasLtMatmulPreferenceSetAttribute.argtypes = [p, ctypes.c_int, p, ctypes.c_size_t]
        lib.cublasLtMatrixLayoutCreate.argtypes = [p, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64]
        lib.cublasLtMatmulDescCreate.argtypes = [p, ctypes.c_int, ctypes.c_int]
        lib.cublasLtMatmulAlgoGetHeuristic.argtypes = [p, p, p, p, p, p, p, ctypes.c_int, p, p]
        lib.cublasLtGetVersion.restype = ctypes.c_size_t
        _lib = lib
    return _lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt {what} failed with cublasStatus_t {status}")


def _handle(device: int) -> ctypes.c_void_p:
    if device not in _handles:
        handle = ctypes.c_void_p()
        _check(library().cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
        _handles[device] = handle
        with torch.cuda.device(device):
            _workspaces[device] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=f"cuda:{device}")
    return _handles[device]


def _set(setter, obj, attr: int, value) -> None:
    _check(setter(obj, attr, ctypes.byref(value), ctypes.sizeof(value)), f"attribute {attr}")


def _alignment(t: torch.Tensor) -> int:
    """The largest power of two up to 256 dividing t's address: what cuBLASLt may assume of it."""
    address = t.data_ptr()
    return min(256, address & -address) if address else 256


def _plan(device: int, dtype: torch.dtype, epilogue: str, transa: int, transb: int, m: int, n: int, k: int, lda: int,
          ldb: int, ldd: int, aligns: tuple[int, int, int]) -> tuple:
    """(descriptor, layouts of A, B, D, the heuristic's algorithms, their results' buffer) for
    D (m, n) = op(A) (m, k) @ op(B) (k, n), column-major, with the epilogue; built once per key. A
    problem cuBLASLt has no algorithm for is refused by name here (the trainer probes each model width
    first: ``lt_mlp.check_library``)."""
    key = (device, dtype, epilogue, transa, transb, m, n, k, lda, ldb, ldd, aligns)
    if key in _plans:
        return _plans[key]
    lib, dt = library(), _DTYPES[dtype]
    desc = ctypes.c_void_p()
    _check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), _COMPUTE_32F, _R_32F), "cublasLtMatmulDescCreate")
    setter = lib.cublasLtMatmulDescSetAttribute
    _set(setter, desc, _DESC_TRANSA, ctypes.c_int32(transa))
    _set(setter, desc, _DESC_TRANSB, ctypes.c_int32(transb))
    _set(setter, desc, _DESC_EPILOGUE, ctypes.c_uint32(EPILOGUES[epilogue]))
    _set(setter, desc, _DESC_AUX_LD, ctypes.c_int64(ldd))
    layouts = []
    a_shape = (k, m) if transa == _OP_T else (m, k)  # (rows, cols) as stored
    b_shape = (n, k) if transb == _OP_T else (k, n)
    for rows, cols, ld in (a_shape + (lda,), b_shape + (ldb,), (m, n, ldd)):
        layout = ctypes.c_void_p()
        _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), dt, rows, cols, ld), "cublasLtMatrixLayoutCreate")
        layouts.append(layout)
    pref = ctypes.c_void_p()
    _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "cublasLtMatmulPreferenceCreate")
    pset = lib.cublasLtMatmulPreferenceSetAttribute
    _set(pset, pref, _PREF_MAX_WORKSPACE, ctypes.c_uint64(WORKSPACE_BYTES))
    for name, align in zip(("a", "b", "c", "d"), aligns + aligns[2:]):  # C is D (beta = 0)
        _set(pset, pref, _PREF_MIN_ALIGNMENT[name], ctypes.c_uint32(align))
    results, count = (_Heuristic * CANDIDATES)(), ctypes.c_int(0)
    a_l, b_l, d_l = layouts
    _check(lib.cublasLtMatmulAlgoGetHeuristic(_handle(device), desc, a_l, b_l, d_l, d_l, pref, CANDIDATES,
                                              results, ctypes.byref(count)), "cublasLtMatmulAlgoGetHeuristic")
    lib.cublasLtMatmulPreferenceDestroy(pref)
    if count.value < 1:
        raise RuntimeError(f"cuBLASLt has no algorithm for epilogue {epilogue} at m={m}, n={n}, k={k} ({dtype}, "
                           f"alignments {aligns}); use mlp_impl='torch'")
    # (the algorithms are views into ``results``, which the plan keeps alive)
    _plans[key] = (desc, a_l, b_l, d_l, [results[i].algo for i in range(count.value)], results)
    return _plans[key]


def problem_name(key: tuple) -> str:
    """A plan key as the tuned table names it: epilogue, dtype, transposes, m, n, k, leading dims, alignments."""
    _, dtype, epilogue, transa, transb, m, n, k, lda, ldb, ldd, aligns = key
    return " ".join(map(str, (epilogue, str(dtype).replace("torch.", ""), transa, transb, m, n, k, lda, ldb, ldd,
                              "/".join(map(str, aligns)))))


def table_name(device: int) -> str:
    """This card and library version, the tuned table's top-level key (e.g. 'NVIDIA H100 80GB HBM3|130200')."""
    return f"{torch.cuda.get_device_name(device)}|{library().cublasLtGetVersion()}"


def tuned(device: int) -> dict[str, int]:
    """The tuned table's entries for this device's card and library version ({} if none or MDTZOO_LT_TUNED=0)."""
    if device not in _tuned:
        table = {}
        if os.environ.get("MDTZOO_LT_TUNED", "1") != "0" and os.path.exists(TUNED_FILE):
            import json

            try:
                with open(TUNED_FILE) as f:
                    table = json.load(f).get(table_name(device), {})
                if not all(isinstance(index, int) for index in table.values()):
                    raise ValueError("an algorithm index is not an integer")
            except (ValueError, AttributeError) as err:
                raise RuntimeError(f"cannot read the tuned cuBLASLt algorithms in {TUNED_FILE} ({err}); rewrite it "
                                   "with experiments/bench/lt_tune.py --write, or set MDTZOO_LT_TUNED=0") from err
        _tuned[device] = table
    return _tuned[device]


def _pick(key: tuple, count: int) -> int:
    """The algorithm index a plan runs: ALGO_PICK's for its epilogue, else the tuned table's, else 0."""
    if key[2] in ALGO_PICK:
        return min(ALGO_PICK[key[2]], count - 1)
    if key not in _picks:
        index = tuned(key[0]).get(problem_name(key), 0)
        _picks[key] = index if 0 <= index < count else 0
    return _picks[key]


def tuned_plans() -> int:
    """How many of the plans made so far run a tuned (not the first) algorithm: what the bench records."""
    return sum(1 for index in _picks.values() if index)


def candidates(epilogue: str) -> int:
    """How many algorithms the heuristic offered for the problems with this epilogue met so far (the
    most of any): the range of ``ALGO_PICK[epilogue]`` worth sweeping."""
    return max((len(plan[4]) for key, plan in _plans.items() if key[2] == epilogue), default=0)


_ONE, _ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)


def _matmul(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, *, transa: int, m: int, n: int, k: int,
            epilogue: str, bias: torch.Tensor | None, aux: torch.Tensor | None, transb: int = _OP_N) -> None:
    """D = epilogue(op(A) op(B)), column-major views of row-major tensors (see the module docstring)."""
    device = d.device.index
    key = (device, d.dtype, epilogue, transa, transb, m, n, k, a.stride(0), b.stride(0), d.stride(0),
           (_alignment(a), _alignment(b), _alignment(d)))
    desc, a_l, b_l, d_l, algos, _ = _plan(*key)
    algo = algos[_pick(key, len(algos))]
    lib = library()
    setter = lib.cublasLtMatmulDescSetAttribute
    if bias is not None:
        _set(setter, desc, _DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
    if aux is not None:
        _set(setter, desc, _DESC_AUX_POINTER, ctypes.c_void_p(aux.data_ptr()))
    stream = torch.cuda.current_stream(d.device).cuda_stream
    ws = _workspaces[device]
    _check(lib.cublasLtMatmul(_handle(device), desc, ctypes.byref(_ONE), a.data_ptr(), a_l, b.data_ptr(), b_l,
                              ctypes.byref(_ZERO), d.data_ptr(), d_l, d.data_ptr(), d_l, ctypes.byref(algo),
                              ws.data_ptr(), WORKSPACE_BYTES, stream), "cublasLtMatmul")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit column stride (a contiguous copy otherwise); its row stride is the leading dimension."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_inputs(*tensors: torch.Tensor) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES or not all(t.is_cuda for t in tensors):
        raise ValueError(f"cuBLASLt matmuls here take CUDA tensors of one 16-bit dtype; got "
                         f"{[(t.dtype, t.device.type) for t in tensors]}")


def linear_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, u): u = x w^T + b, g = gelu_tanh(u), one matmul. x (T, K), w (F, K), b (F,); both (T, F)."""
    _check_inputs(x, w, b)
    x, w, b = _rows(x), _rows(w), b.contiguous()
    t, k = x.shape
    f = w.shape[0]
    g = torch.empty((t, f), device=x.device, dtype=x.dtype)
    u = torch.empty_like(g)
    if t:
        _matmul(w, x, g, transa=_OP_T, m=f, n=t, k=k, epilogue="gelu_aux_bias", bias=b, aux=u)
    return g, u


def _dgelu(dy: torch.Tensor, w: torch.Tensor, u: torch.Tensor, db: torch.Tensor | None) -> torch.Tensor:
    """du = (dy w) * gelu_tanh'(u) (u's dtype), one matmul: epilogue DGELU, or with ``db`` DGELU_BGRAD
    (du's column sums written to db)."""
    _check_inputs(dy, w, u)
    dy, w, u = _rows(dy), _rows(w), u.contiguous()
    t, k = dy.shape
    f = w.shape[1]
    du = torch.empty((t, f), device=u.device, dtype=u.dtype)
    if t:
        _matmul(w, dy, du, transa=_OP_N, m=f, n=t, k=k, epilogue="dgelu" if db is None else "dgelu_bgrad", bias=db,
                aux=u)
    return du


def dgelu_linear(dy: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """du = (dy w) * gelu_tanh'(u) (u's dtype), one matmul with the DGELU epilogue. dy (T, K), w (K, F)
    (fc2's weight, (out, in)), u (T, F)."""
    return _dgelu(dy, w, u, None)


def dgelu_linear_bgrad(dy: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(du, db): ``dgelu_linear`` with du's column sums in the epilogue too (DGELU_BGRAD). Not used by
    the MLP: its algorithms took 2.2-3.5x DGELU's time on an H100 (docs/performance.md, session 17)."""
    db = torch.zeros((w.shape[1],), device=u.device, dtype=u.dtype)
    return _dgelu(dy, w, u, db), db


def weight_grad(dy: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dw, db) of a Linear layer y = x w^T + b: dw = dy^T x (dy's dtype) and db = dy's column sums,
    from one matmul (epilogue BGRADB: the sums of the B operand, dy, over the reduced dimension).
    dy (T, F), x (T, K) -> dw (F, K), db (F,)."""
    _check_inputs(dy, x)
    dy, x = _rows(dy), _rows(x)
    t, f = dy.shape
    k = x.shape[1]
    dw = torch.empty((f, k), device=dy.device, dtype=dy.dtype)
    db = torch.empty((f,), device=dy.device, dtype=dy.dtype)
    if not t:
        return dw.zero_(), db.zero_()
    # column-major: dw^T (K, F) = x^T (K, T) @ dy (T, F); x^T is x's memory as is, dy is dy^T's transposed
    _matmul(x, dy, dw, transa=_OP_N, transb=_OP_T, m=k, n=f, k=t, epilogue="bgradb", bias=db, aux=None)
    return dw, db
