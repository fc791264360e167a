"""Fused CPU decode-matmul for packed weights (the ``cpu`` backend of :class:`UMQLinear`).

The C++ source ``umq_cpu.cpp`` beside this file ships in the wheel and is compiled on
first use with the system's C++ compiler (``$CXX`` or ``g++``) into
``${UMQ_CACHE_DIR:-~/.cache/umq}/runtime/``, one shared library per source hash,
compiler, flags and CPU, then loaded with ctypes. It never materialises the dense weight:

- :func:`matmul` ``x [M, C] -> [M, R]``: for ``M <= GEMV_MAX_ROWS`` every group (mask
  byte, ``8 + k`` payload bytes, scale) is decoded in registers and multiplied straight
  into the accumulators, up to 4 activation rows per decode; for larger ``M`` (prefill)
  rows of the weight are decoded tile by tile into a cache-sized buffer that a torch GEMM
  multiplies (the decode is then amortised over ``M``).
- :func:`decode`: the dense decode, bit-exact with :func:`umqcli.codec.dequantize`.

Paths (``isa``): ``"avx2"`` (AVX2 + FMA + F16C: a ``vpshufb`` per group with a
per-mask-byte table) and ``"scalar"`` (portable C++, the SIMD path's twin). The best one
the CPU runs is chosen at run time; ``UMQ_RUNTIME_ISA=avx2|scalar`` or the ``isa``
argument forces one, ``UMQ_RUNTIME=0`` turns the runtime off. Where no compiler works,
:func:`available` is False, one :class:`RuntimeWarning` says why, and callers use the
torch decode-then-matmul path. Threads: OpenMP (the runtime torch already loaded),
``torch.get_num_threads()`` of them; the prefill path's GEMM is torch's, on the same threads.

Prefill compute dtype (:func:`prefill_dtype`, the one place it is chosen): the tiles follow
the activations. bfloat16 activations on a CPU whose bfloat16 GEMM is native (AVX512-BF16
or AMX, :func:`bf16_gemm_is_native`) get bfloat16 tiles and torch's bfloat16 GEMM (float32
accumulation inside oneDNN, the bias added before the output's one rounding): bit for bit
``F.linear(x, dequantize(packed).to(torch.bfloat16), bias)``, at about its cost plus one
decode. The price: each decoded weight is rounded to bfloat16 (relative error at most
u = 2^-8, on top of the format's own; bfloat16 hi values are exact), and so is a bias of
another dtype. With ``A = |x| · |Ŵ|ᵀ + |b|`` an output is within
``(1 + u) (u + gamma_{C+1} (1 + u)) A + u |x · Ŵᵀ + b|`` of the exact ``x · Ŵᵀ + b``
(``gamma_n = n 2^-24 / (1 - n 2^-24)``, the float32 sum; the last term is the output's
rounding to bfloat16, which every path with bfloat16 activations has; plus 2^-126 per
subnormal the bfloat16 dot product flushes): about ``2^-8 A``
more than with float32 tiles (:func:`umqcli.testing.bounds.bf16_linear_error_bound`).
Every other case decodes float32 tiles and runs a float32 GEMM (exact float32 products,
the activations widened exactly): float32 and float16 activations (torch's float16 GEMM
has no native units without AVX512-FP16: 4x slower than float32 on Zen 4), and bfloat16
ones where the bfloat16 GEMM is not native (3x slower than float32 on AVX2).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from ..codec import PackedTensor, check_stored_layout
from ..errors import UMQError

SOURCE = Path(__file__).with_name("umq_cpu.cpp")
CXX_FLAGS = ("-O2", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno")
ISAS = ("avx2", "scalar")
_ISA_CODES = {"scalar": 0, "avx2": 1}
_LO_CODES = {"fp8_e4m3": 0, "fp8_e5m2": 1, "int8": 2}
_HI_CODES = {"float16": 0, "bfloat16": 1}
_OUT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

GEMV_MAX_ROWS = 16
"""Largest M served by the in-register GEMV; above, the tiled decode + GEMM."""
PARALLEL_MIN_WORK = int(os.environ.get("UMQ_PARALLEL_MIN_WORK", 1 << 18))
"""Fewest weights (times M / 4) a call needs before it runs on more than one thread: below, a
fork/join costs more than it saves. On a machine whose cores are busy with other processes
every parallel region waits for a second core: raise it there (``UMQ_PARALLEL_MIN_WORK``)."""
TILE_BYTES = 1 << 22
"""float32 bytes of one decoded weight tile on the prefill path (a bfloat16 tile holds the same
rows in half the bytes). Fewer, larger tiles re-read the activations less often: 4 MiB beat 1
MiB by 4-10% with float32 tiles at M = 32-512 and matched it with bfloat16 tiles (Zen 4)."""

_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_FAILURE: str | None = None
_last_path: str | None = None
_SCRATCH = threading.local()  # per thread: the prefill's tile buffer, reused across calls


def _scratch_tile(rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """A ``[rows, columns]`` tile buffer of this thread, reused while large enough: a fresh
    multi-MiB buffer per call is page-faulted in anew whenever the allocator has handed
    the memory back to the system."""
    buffers = _SCRATCH.__dict__.setdefault("tiles", {})
    held = buffers.get(dtype)
    if held is None or held.numel() < rows * columns:
        held = buffers[dtype] = torch.empty(rows * columns, dtype=dtype)
    return held[: rows * columns].view(rows, columns)


def cache_dir() -> Path:
    """Where compiled libraries live: ``$UMQ_CACHE_DIR/runtime`` (default ``~/.cache/umq``)."""
    return Path(os.environ.get("UMQ_CACHE_DIR") or Path.home() / ".cache" / "umq").expanduser() / "runtime"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _cpu_key() -> str:
    """Enough of the CPU's identity that a cache shared between machines stays correct."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_path(compiler: str) -> Path:
    """The cached library for this source, compiler, flags and CPU."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), compiler.encode(), version.encode(), " ".join(CXX_FLAGS).encode(),
                    _cpu_key().encode()])
    ).hexdigest()[:16]
    return cache_dir() / f"umq_cpu-{key}.so"


def _build(compiler: str, target: Path) -> None:
    """Compile into a temporary sibling, then rename: concurrent first uses are safe."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *CXX_FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | None:
    global _LIB, _FAILURE
    if _LIB is not None or _FAILURE is not None:
        return _LIB
    with _LOCK:
        if _LIB is not None or _FAILURE is not None:
            return _LIB
        try:
            compiler = _compiler()
            if compiler is None:
                raise OSError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
            target = library_path(compiler)
            if not target.exists():
                _build(compiler, target)
            lib = ctypes.CDLL(str(target))
        except OSError as exc:
            _FAILURE = str(exc)
            warnings.warn(
                f"umq: the fused CPU runtime is unavailable ({_FAILURE}); packed layers decode the "
                "whole weight on every call instead (slower, same results)",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        lib.umq_cpu_features.restype = i32
        lib.umq_gemv.restype = i32
        lib.umq_gemv.argtypes = [i32, ptr, i64, i64, ptr, ptr, ptr, i64, i64, i32, i32, i32, i32, ptr, i64, i32]
        lib.umq_set_parallel_min_work.restype = None
        lib.umq_set_parallel_min_work.argtypes = [i64]
        lib.umq_set_parallel_min_work(PARALLEL_MIN_WORK)
        lib.umq_linear.restype = i32
        lib.umq_linear.argtypes = [i32, ptr, ptr, i32, i64, ptr, i32, i32]
        lib.umq_decode.restype = i64
        lib.umq_decode.argtypes = [i32, ptr, ptr, ptr, i64, i64, i32, i32, i32, i32, i64, i64, i32, ptr, i64, i32]
        lib.umq_narrow.restype = i32
        lib.umq_narrow.argtypes = [i32, ptr, ptr, i64, i32]
        _LIB = lib
        return lib


def available() -> bool:
    """True when the runtime is enabled (``UMQ_RUNTIME`` is not ``0``) and its library
    compiled and loaded (the first call compiles; a failure warns once)."""
    return os.environ.get("UMQ_RUNTIME", "1") != "0" and _load() is not None


def supported_isas() -> tuple[str, ...]:
    """The paths this CPU runs, best first (empty when the runtime is unavailable)."""
    lib = _load()
    if lib is None:
        return ()
    return ("avx2", "scalar") if lib.umq_cpu_features() & 1 else ("scalar",)


def select_isa(isa: str | None = None) -> str:
    """``isa``, else ``$UMQ_RUNTIME_ISA``, else the best supported path; UMQError (rule
    ``runtime``) for a path this CPU or build cannot run."""
    wanted = (isa or os.environ.get("UMQ_RUNTIME_ISA") or "auto").lower()
    supported = supported_isas()
    if not supported:
        raise UMQError(f"the fused CPU runtime is unavailable: {_FAILURE}", rule="runtime")
    if wanted == "auto":
        return supported[0]
    if wanted not in supported:
        raise UMQError(
            f"runtime path {wanted!r} is not available on this CPU (available: {', '.join(supported)})",
            rule="runtime",
        )
    return wanted


def last_path() -> str | None:
    """``"<isa>-gemv"``, ``"<isa>-tiled"`` (float32 tiles) or ``"<isa>-tiled-bf16"`` of the
    latest :func:`matmul` or layer call, or the decode's ``"<isa>-decode"`` (what tests check
    to know which path ran)."""
    return _last_path


def bf16_gemm_is_native() -> bool:
    """Whether torch's bfloat16 GEMM runs on bfloat16 units here (AVX512-BF16 or AMX): as
    fast as or faster than float32 where it does, 3x slower where it does not (AVX2).
    ``UMQ_RUNTIME_BF16_GEMM=1`` / ``0`` overrides the answer (tests force both paths)."""
    forced = os.environ.get("UMQ_RUNTIME_BF16_GEMM")
    if forced in ("0", "1"):
        return forced == "1"
    cpu = torch.cpu
    return any(bool(getattr(cpu, probe, lambda: False)()) for probe in ("_is_avx512_bf16_supported",
                                                                          "_is_amx_tile_supported"))


def prefill_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The dtype the prefill path decodes weight tiles to and multiplies in, for activations
    of ``x_dtype``: bfloat16 for bfloat16 activations where :func:`bf16_gemm_is_native`,
    float32 otherwise (float16 GEMMs have no native units on the CPUs this targets)."""
    return torch.bfloat16 if x_dtype == torch.bfloat16 and bf16_gemm_is_native() else torch.float32


def _problem(packed: PackedTensor) -> tuple:
    spec = packed.spec
    if packed.data.device.type != "cpu":
        raise UMQError(f"the CPU runtime needs CPU tensors, got {packed.data.device}", rule="runtime")
    check_stored_layout(packed)
    data, mask, scale = (t.contiguous() for t in (packed.data, packed.mask, packed.scale))
    keep = (data, mask, scale)  # the caller holds these while the kernel runs
    return keep, (data.data_ptr(), mask.data_ptr(), scale.data_ptr(), spec.rows, spec.columns, spec.k,
                  spec.block, _LO_CODES[spec.lo.value], _HI_CODES[spec.hi.value])


def matmul(x: torch.Tensor, packed: PackedTensor, *, isa: str | None = None) -> torch.Tensor:
    """``x`` float ``[..., C]`` on the CPU -> float32 ``[..., R]``: ``x · Ŵᵀ`` with float32
    accumulation, ``Ŵ`` the float32 decode (the same values as
    ``codec.dequantize(packed, torch.float32)``)."""
    global _last_path
    chosen = select_isa(isa)
    lib = _load()
    spec = packed.spec
    keep, problem = _problem(packed)
    rows = x.reshape(-1, spec.columns).to(torch.float32).contiguous()
    m = rows.shape[0]
    threads = torch.get_num_threads()
    if m <= GEMV_MAX_ROWS:
        out = torch.empty(m, spec.rows, dtype=torch.float32)
        status = lib.umq_gemv(_ISA_CODES[chosen], rows.data_ptr(), m, spec.columns, *problem, out.data_ptr(),
                              spec.rows, threads)
        assert status == 0, "umq_gemv refused a checked problem"
        _last_path = f"{chosen}-gemv"
    else:
        out = _tiled(rows, packed, chosen, problem)
    del keep
    return out.reshape(*x.shape[:-1], spec.rows)


def _tiled(rows: torch.Tensor, packed: PackedTensor, isa: str, problem: tuple,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """The prefill path: ``rows`` ``[M, C]`` float32 or bfloat16, contiguous -> ``[M, R]`` in
    that dtype (contiguous, as ``F.linear``'s), ``+ bias`` (same dtype) inside the GEMM when
    given. Rows of ``Ŵ`` are decoded a tile at a time straight to that dtype (bfloat16: the
    float32 decode rounded to nearest even, as ``.to(torch.bfloat16)``) and multiplied into
    their output columns."""
    global _last_path
    lib, spec, dtype = _load(), packed.spec, rows.dtype
    threads = torch.get_num_threads()
    tile_rows = max(8, min(spec.rows, TILE_BYTES // max(1, 4 * spec.columns)))
    tile = _scratch_tile(tile_rows, spec.columns, dtype)
    out = torch.empty(rows.shape[0], spec.rows, dtype=dtype)
    for r0 in range(0, spec.rows, tile_rows):
        r1 = min(spec.rows, r0 + tile_rows)
        bad = lib.umq_decode(_ISA_CODES[isa], *problem, r0, r1, _OUT_CODES[dtype], tile.data_ptr(), spec.columns,
                             threads)
        _check_decode(bad, spec)
        weights = tile[: r1 - r0].T
        if bias is None:
            torch.mm(rows, weights, out=out[:, r0:r1])
        else:
            torch.addmm(bias[r0:r1], rows, weights, out=out[:, r0:r1])
    _last_path = f"{isa}-tiled" if dtype == torch.float32 else f"{isa}-tiled-bf16"
    return out


class _Layer(ctypes.Structure):
    """``UmqLayer`` of umq_cpu.cpp: one packed layer's pointers and sizes."""

    _fields_ = [
        ("data", ctypes.c_void_p), ("mask", ctypes.c_void_p), ("scale", ctypes.c_void_p),
        ("rows", ctypes.c_int64), ("cols", ctypes.c_int64),
        ("k", ctypes.c_int32), ("block", ctypes.c_int32), ("lo", ctypes.c_int32), ("hi", ctypes.c_int32),
        ("bias", ctypes.c_void_p), ("bias_kind", ctypes.c_int32),
    ]


class LinearLaunch:
    """Everything one packed linear layer's calls need, checked once: ``y = x · Ŵᵀ + b``.

    Built from the layer's stored tensors and bias (CPU, FORMAT v1 layout and dtypes
    checked by :func:`check_stored_layout`, bias float32/float16/bfloat16 ``[R]``;
    otherwise :class:`UMQError`). It holds those tensors and their version counters;
    :meth:`current` says whether it still describes the given ones (same objects, not
    modified in place since), and callers build a new launch when it does not, so a
    stale pointer is never used. A call ``launch(x)`` (``x`` float32/float16/bfloat16
    ``[..., C]``) returns ``[..., R]`` in ``x.dtype``: for ``M <= GEMV_MAX_ROWS`` one C call
    reads the activations in their dtype, accumulates in float32, adds the bias and
    rounds once to the output dtype. Larger M take the tiled prefill path in the dtype
    :func:`prefill_dtype` picks: bfloat16 tiles and GEMM with the bias inside it (bfloat16
    ``x`` where that GEMM is native), else :func:`matmul`'s float32 tiles, then the bias,
    then one rounding to ``x.dtype``.
    """

    __slots__ = ("packed", "bias", "isa", "_versions", "_layer", "_layer_address", "_isa_code", "_call", "_path")

    def __init__(self, packed: PackedTensor, bias: torch.Tensor | None, *, isa: str | None = None) -> None:
        self.isa = select_isa(isa)
        spec = packed.spec
        if packed.data.device.type != "cpu" or (bias is not None and bias.device.type != "cpu"):
            raise UMQError("the CPU runtime needs CPU tensors", rule="runtime")
        check_stored_layout(packed)
        if not all(t.is_contiguous() for t in (packed.data, packed.mask, packed.scale)):
            raise UMQError("the CPU runtime needs contiguous stored tensors", rule="runtime")
        if bias is not None and (bias.dtype not in _OUT_CODES or tuple(bias.shape) != (spec.rows,)
                                 or not bias.is_contiguous()):
            raise UMQError(
                f"bias is {bias.dtype} {tuple(bias.shape)}, the CPU runtime needs a contiguous float32, "
                f"float16 or bfloat16 ({spec.rows},)",
                rule="runtime",
            )
        self.packed, self.bias = packed, bias
        self._versions = self._versions_of(packed.data, packed.mask, packed.scale, bias)
        self._layer = _Layer(
            packed.data.data_ptr(), packed.mask.data_ptr(), packed.scale.data_ptr(), spec.rows, spec.columns,
            spec.k, spec.block, _LO_CODES[spec.lo.value], _HI_CODES[spec.hi.value],
            None if bias is None else bias.data_ptr(), _OUT_CODES[bias.dtype] if bias is not None else 0,
        )
        self._layer_address = ctypes.addressof(self._layer)
        self._isa_code = _ISA_CODES[self.isa]
        self._path = f"{self.isa}-gemv"
        self._call = _load().umq_linear

    @staticmethod
    def _versions_of(data, mask, scale, bias) -> tuple:
        return data._version, mask._version, scale._version, None if bias is None else bias._version

    def current(self, data, mask, scale, bias, spec) -> bool:
        """True when these are the tensors (and spec) this launch was built from, unchanged."""
        p = self.packed
        return (
            data is p.data and mask is p.mask and scale is p.scale and bias is self.bias and spec is p.spec
            and self._versions == self._versions_of(data, mask, scale, bias)
        )

    def run_raw(self, x: torch.Tensor, out: torch.Tensor, threads: int) -> None:
        """The C call alone on float32 ``x`` / ``out`` ``[M, C]`` / ``[M, R]``, contiguous,
        M <= GEMV_MAX_ROWS, shapes not checked (benchmarks time the kernel with it)."""
        self._call(self._isa_code, self._layer_address, x.data_ptr(), 0, x.shape[0], out.data_ptr(), 0, threads)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        global _last_path
        spec = self.packed.spec
        if not x.is_cpu or x.dim() < 1 or x.shape[-1] != spec.columns or not x.is_floating_point():
            raise UMQError(
                f"the CPU runtime multiplies a float CPU tensor [..., {spec.columns}], got {x.dtype} "
                f"{tuple(x.shape)} on {x.device}",
                rule="matmul-input",
            )
        kind = _OUT_CODES.get(x.dtype)
        m = x.numel() // spec.columns if spec.columns else 0
        if m > GEMV_MAX_ROWS and spec.columns and prefill_dtype(x.dtype) == torch.bfloat16:
            keep, problem = _problem(self.packed)
            bias = None if self.bias is None else self.bias.to(torch.bfloat16)
            out = _tiled(x.reshape(-1, spec.columns).contiguous(), self.packed, self.isa, problem, bias)
            del keep
            return out.reshape(*x.shape[:-1], spec.rows)
        if kind is None or m > GEMV_MAX_ROWS or spec.columns == 0:
            rows = x.reshape(-1, spec.columns)
            out = matmul(rows, self.packed, isa=self.isa)
            if self.bias is not None:
                out = out.add_(self.bias.to(torch.float32))
            return out.to(x.dtype).reshape(*x.shape[:-1], spec.rows)
        if not x.is_contiguous():
            x = x.contiguous()
        out = torch.empty((*x.shape[:-1], spec.rows), dtype=x.dtype)
        status = self._call(self._isa_code, self._layer_address, x.data_ptr(), kind, m, out.data_ptr(), kind,
                            torch.get_num_threads())
        assert status == 0, "umq_linear refused a checked problem"
        _last_path = self._path
        return out


def _check_decode(bad: int, spec) -> None:
    assert bad >= 0, "umq_decode refused a checked problem"
    if bad:
        raise UMQError(f"{bad} mask byte(s) do not have exactly k={spec.k} bits set", rule="popcount")


def decode(packed: PackedTensor, dtype: torch.dtype | None = None, *, isa: str | None = None) -> torch.Tensor:
    """Dense ``[R, C]`` in ``dtype`` (float32, float16 or bfloat16; default the source
    dtype): bit-exact with :func:`umqcli.codec.dequantize`. A mask byte whose popcount is
    not k raises UMQError (rule ``popcount``)."""
    global _last_path
    chosen = select_isa(isa)
    lib = _load()
    spec = packed.spec
    target = dtype or spec.torch_dtype
    if target not in _OUT_CODES:
        raise UMQError(f"the CPU runtime decodes to float32, float16 or bfloat16, not {target}", rule="runtime")
    keep, problem = _problem(packed)
    out = torch.empty(spec.rows, spec.columns, dtype=target)
    bad = lib.umq_decode(_ISA_CODES[chosen], *problem, 0, spec.rows, _OUT_CODES[target], out.data_ptr(),
                         spec.columns, torch.get_num_threads())
    del keep
    _check_decode(bad, spec)
    _last_path = f"{chosen}-decode"
    return out


__all__ = [
    "GEMV_MAX_ROWS",
    "ISAS",
    "LinearLaunch",
    "available",
    "bf16_gemm_is_native",
    "cache_dir",
    "decode",
    "last_path",
    "matmul",
    "prefill_dtype",
    "select_isa",
    "supported_isas",
]
