"""Fused CPU passes (numba) for the reference configuration: an optional override.

The torch codec in :mod:`umqcli.codec` is the reference and stays so. It needs about a
dozen full-size passes and temporaries (abs, top-k, scales, divide, cast, scatter...),
and torch's CPU reductions over a last dimension of 8 are slow. This module does the same
arithmetic in one pass over each row, parallel over rows:

- :func:`quantize_magnitude`: magnitude selection (FORMAT §5), absmax scales and the
  group interleave (§3/§4) for one 2-D tensor, writing data/mask/scale directly;
- :func:`dequantize`: the inverse, decoding into float32, float16 or bfloat16.

Every rounding is written out on IEEE bit patterns (integer arithmetic, plus the float32
add/subtract of 2**23 that rounds to an integer; round to nearest even, subnormals
included) so that the bytes equal the torch path's bit for bit; ``tests/test_codec.py``
checks that on the conformance vectors, on random tensors and on every fp16 input.
``codec.quantize`` / ``codec.dequantize`` use it for CPU tensors of at least
``codec.FUSED_MIN_ELEMENTS`` elements when numba imports (a core dependency; absent, the torch path runs) unless
``UMQ_FUSED=0``; without numba nothing here is compiled and the torch path runs. The
numba code lives in :mod:`umqcli._fused_kernels`, imported on first use only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from typing import Iterator

import numpy as np
import torch

from .format import HI_KERNEL_CODES, LO_KERNEL_CODES, LoFormat

# numba is a core dependency, but if it is missing the torch reference path runs. It is
# imported with the kernels (umqcli/_fused_kernels.py) on first use, not with umqcli.
_HAS_NUMBA = importlib.util.find_spec("numba") is not None

OUT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def available() -> bool:
    """True when numba is importable and ``UMQ_FUSED`` is not ``0``."""
    return _HAS_NUMBA and os.environ.get("UMQ_FUSED", "1") != "0"


_KERNELS = None
# Pack calls the codec from worker threads: the one-off set-up below (importing numba,
# starting its thread pool, building tables) must happen once, not concurrently; a
# concurrent first import of numba fails with a partially initialised module.
_INIT_LOCK = threading.RLock()


def kernels():
    """The :mod:`umqcli._fused_kernels` module (imports numba on the first call)."""
    global _KERNELS
    if _KERNELS is None:
        with _INIT_LOCK:
            if _KERNELS is None:
                from . import _fused_kernels

                _KERNELS = _fused_kernels
    return _KERNELS


_LAUNCHED = False


def _follow_torch_threads() -> None:
    """Run numba's parallel loops on as many threads as torch uses (``torch.set_num_threads``
    is the one knob users know). Starting numba's OpenMP layer resets the process's
    OpenMP thread count, which torch reads too, so torch's setting is put back then."""
    global _LAUNCHED
    numba = kernels().numba
    if not _LAUNCHED:
        with _INIT_LOCK:
            if not _LAUNCHED:
                torch_threads = torch.get_num_threads()
                from numba.np.ufunc import parallel

                parallel._launch_threads()
                torch.set_num_threads(torch_threads)
                _LAUNCHED = True
    wanted = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)


def allows_concurrent_calls() -> bool | None:
    """Whether codec calls from several Python threads at once are safe: True without the
    fused pass, or once numba's threading layer is known to be OpenMP or TBB; False for
    its "workqueue" layer (it aborts the process on concurrent parallel calls); None
    while no parallel numba function has run yet."""
    if not available():
        return True
    if not _LAUNCHED:
        return None
    try:
        return kernels().numba.threading_layer() != "workqueue"
    except ValueError:  # numba: no parallel function has run yet
        return None


# numba's "workqueue" threading layer (used when neither TBB nor OpenMP is available)
# aborts the process on concurrent parallel calls from two Python threads; the OpenMP and
# TBB layers, and torch, are fine. Codec calls from worker threads are serialised until
# the layer is known to allow concurrency.
_CALL_LOCK = threading.Lock()
_calls_concurrent: bool | None = None  # None: not known yet


@contextlib.contextmanager
def codec_call() -> Iterator[None]:
    """Wrap a codec call made from a worker thread (``umq pack``'s pool): serialised
    unless concurrent calls are known to be safe (:func:`allows_concurrent_calls`)."""
    global _calls_concurrent
    if _calls_concurrent:
        yield
        return
    with _CALL_LOCK:
        yield
        _calls_concurrent = allows_concurrent_calls()


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` for the block (``None``: left
    alone), then put back; the fused pass follows it (:func:`_follow_torch_threads`)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_TABLES: dict[str, torch.Tensor] = {}


def _table(name: str) -> np.ndarray:
    """Lookup tables: 16-bit pattern -> float32 (exact) and lo byte -> float32."""
    with _INIT_LOCK:
        if name not in _TABLES:
            if name in ("float16", "bfloat16"):
                patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16)
                dtype = torch.float16 if name == "float16" else torch.bfloat16
                _TABLES[name] = patterns.view(dtype).float()
            else:
                codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
                dtype = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "int8": torch.int8}[name]
                _TABLES[name] = codes.view(dtype).float()
    return _TABLES[name].numpy()


def quantize_magnitude(weight: torch.Tensor, hi_bits: torch.Tensor, k: int, block: int, lo: str, hi: str):
    """Fused magnitude quantize of a contiguous CPU ``weight`` [R, C] (float32, float16 or
    bfloat16) whose hi values are ``hi_bits`` (int16 [R, C], the patterns of ``hi``).

    Returns ``(data uint8 [R, G*(8+k)], mask uint8 [R, G], scale float32 [R, C/block],
    status int8 [R])``; status 1 marks a row with a non-finite value, 2 a row whose hi
    value overflows ``hi`` (the outputs of such rows are then incomplete).
    """
    weight, hi_bits = weight.detach(), hi_bits.detach()  # .numpy() refuses autograd tensors
    rows, cols = weight.shape
    data = torch.empty(rows, cols // 8 * (8 + k), dtype=torch.uint8)
    mask = torch.empty(rows, cols // 8, dtype=torch.uint8)
    scale = torch.empty(rows, cols // block, dtype=torch.float32)
    status = torch.empty(rows, dtype=torch.int8)
    outs = (data.numpy(), mask.numpy(), scale.numpy(), status.numpy())
    _follow_torch_threads()
    hi_np = hi_bits.contiguous().view(torch.int16).numpy().view(np.uint16)
    if weight.dtype == torch.float32:
        kernels()._quantize32(weight.contiguous().numpy(), hi_np, True, k, block, LO_KERNEL_CODES[lo], HI_KERNEL_CODES[hi], *outs)
    else:
        src = weight.contiguous().view(torch.int16).numpy().view(np.uint16)
        lut = _table("float16" if weight.dtype == torch.float16 else "bfloat16")
        check_hi = weight.dtype != (torch.float16 if hi == "float16" else torch.bfloat16)
        kernels()._quantize16(src, lut, hi_np, check_hi, k, block, LO_KERNEL_CODES[lo], HI_KERNEL_CODES[hi], *outs)
    return data, mask, scale, status


def dequantize(data: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor, k: int, block: int,
               lo: str, hi: str, dtype: torch.dtype) -> torch.Tensor:
    """Fused decode of CPU stored tensors (shapes already checked against the spec) into
    ``dtype`` [R, C] (FORMAT §4). Returns ``(values, bad)``: ``bad`` is True when a mask
    byte holds more than k bits, so that a row's payload is too short."""
    rows, groups = mask.shape
    cols = groups * 8
    out_kind = OUT_CODES[dtype]
    hi_dtype = torch.float16 if hi == "float16" else torch.bfloat16
    if out_kind == 0:
        out = torch.empty(rows, cols, dtype=torch.float32)
        # The unused output is an empty [R, 0] array, so that its row views stay valid.
        out32, out16 = out.numpy(), np.empty((rows, 0), dtype=np.uint16)
    else:
        out = torch.empty(rows, cols, dtype=dtype)
        out16, out32 = out.view(torch.int16).numpy().view(np.uint16), np.empty((rows, 0), dtype=np.float32)
    status = np.empty(rows, dtype=np.int8)
    _follow_torch_threads()
    kernels()._dequantize(
        data.contiguous().numpy(), mask.contiguous().numpy(), scale.contiguous().numpy(), k, block,
        _table(lo), _table(hi), dtype == hi_dtype, out_kind, out16, out32, status,
    )
    return out, bool(status.any())


SELECTION_CODES = {"magnitude": 0, "error": 1, "activation": 2}


def candidate_errors(weight32: torch.Tensor, hi32: torch.Tensor, act_sq: torch.Tensor,
                     candidates: list[tuple[int, int, LoFormat, str]], *, threads: int | None = None) -> np.ndarray:
    """float64 ``[N]``: for each candidate ``(k, block columns, lo, selection)`` of the
    contiguous CPU float32 weight ``[R, C]``, ``sum_j act_sq_j ||W[:, j] - Ŵ[:, j]||^2``
    where ``Ŵ`` is ``codec.fake_quantize(weight, params, act_sq=act_sq, dtype=float32)``
    and ``hi32`` (float32 ``[R, C]``) the weight rounded to the hi format.

    The reference twin is that fake-quantize and a float64 sum; the values Ŵ are the
    same, the sums are in another order (relative difference ~1e-15). Where the error or
    activation selection picks per block between candidate masks whose errors tie to
    float32 rounding, this pass (comparing float64 sums) may keep the other one, whose
    error is equal to that rounding. Rows run in parallel on ``threads`` (default:
    torch's thread count).
    """
    rows, cols = weight32.shape
    n = len(candidates)
    out = np.zeros((rows, n), dtype=np.float64)
    if n == 0:
        return np.zeros(0)
    ks = np.array([c[0] for c in candidates], dtype=np.int64)
    blocks = np.array([c[1] for c in candidates], dtype=np.int64)
    los = np.array([LO_KERNEL_CODES[c[2]] for c in candidates], dtype=np.int64)
    selections = np.array([SELECTION_CODES[c[3]] for c in candidates], dtype=np.int64)
    luts = np.stack([_table(lo.value) for lo in sorted(LO_KERNEL_CODES, key=LO_KERNEL_CODES.get)])  # row = code
    a = act_sq.detach().float().contiguous()
    _follow_torch_threads()
    if threads:
        numba = kernels().numba
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    kernels()._candidate_errors(
        weight32.detach().contiguous().numpy(), hi32.detach().contiguous().numpy(), a.numpy(),
        a.sqrt().numpy(), ks, blocks, los, selections, luts, out,
    )
    return out.sum(0)
