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
``codec.FUSED_MIN_ELEMENTS`` elements when numba imports (the ``fast`` extra) unless
``UMQ_FUSED=0``; without numba nothing here is compiled and the torch path runs.
"""

from __future__ import annotations

import os

import numpy as np
import torch

try:  # numba is optional (extra "fast"): without it the torch reference path runs.
    import numba
    from llvmlite import ir
    from numba import njit, prange
    from numba.core import types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised on installs without the extra
    numba = None

LO_CODES = {"fp8_e4m3": 0, "fp8_e5m2": 1, "int8": 2}
HI_CODES = {"float16": 0, "bfloat16": 1}
OUT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def available() -> bool:
    """True when numba is importable and ``UMQ_FUSED`` is not ``0``."""
    return numba is not None and os.environ.get("UMQ_FUSED", "1") != "0"


if numba is not None:
    _F32_MAX = np.float32(3.4028234663852886e38)
    _LO_MAX = np.array([448.0, 57344.0, 127.0], dtype=np.float32)
    # 1 / the subnormal spacing of each lo encoding (2**-9, 2**-16; int8: 1), and 2**23.
    _SUBNORMAL_UNIT_INV = np.array([512.0, 65536.0, 1.0], dtype=np.float32)
    _ROUND_MAGIC = np.float32(8388608.0)
    _POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)

    @intrinsic
    def _f32_bits(typingctx, x):
        """Reinterpret a float32 scalar's bits as uint32 (no conversion)."""
        if x != types.float32:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return types.uint32(types.float32), codegen

    @njit(cache=True)
    def _round_shift(m, shift):
        """Round-half-to-even of ``m / 2**shift`` (``m`` < 2**25, ``shift`` >= 1)."""
        if shift >= 26:
            return 0
        half = (1 << (shift - 1)) - 1
        return (m + half + ((m >> shift) & 1)) >> shift

    @njit(cache=True)
    def _encode_lo(x, lo):
        """float32 ``x`` with ``|x| <= MAX`` -> the lo byte (FORMAT §4), round to nearest even.

        fp8 normal range: rebias the float32 exponent and round the 23-bit mantissa to M
        bits in integer arithmetic (a carry moves into the exponent, as it should).
        Below the smallest normal (and for int8): ``|x| * 2**(bias + M - 1)`` (exact, a
        power of two) is rounded to an integer by the float32 add/subtract of 2**23,
        which rounds half to even; that integer is the subnormal code and carries into
        the smallest normal exactly. The sign bit is kept for fp8, so -0.0 and tiny
        negatives give 0x80 as torch's casts do; int8 negates (-0.0 gives 0). Both paths
        are computed and one is selected: no branch in the hot loop.
        """
        bits = np.int64(_f32_bits(x))
        negative = (bits >> 31) & 1
        a = bits & 0x7FFFFFFF
        grid = abs(x) * _SUBNORMAL_UNIT_INV[lo]
        small = np.int64((grid + _ROUND_MAGIC) - _ROUND_MAGIC)
        if lo == 2:
            return ((small ^ -negative) + negative) & 0xFF
        if lo == 0:  # e4m3: bias 7, 3 mantissa bits, smallest normal 2**-6
            rebased = a - (120 << 23)
            normal = (rebased + 0x7FFFF + ((rebased >> 20) & 1)) >> 20
            code = normal if a >= (121 << 23) else small
        else:  # e5m2: bias 15, 2 mantissa bits, smallest normal 2**-14
            rebased = a - (112 << 23)
            normal = (rebased + 0xFFFFF + ((rebased >> 21) & 1)) >> 21
            code = normal if a >= (113 << 23) else small
        return (negative << 7) | code

    @njit(cache=True)
    def _f32_to_f16(x):
        """float32 -> float16 bit pattern, round to nearest even, overflow to inf."""
        bits = np.int64(_f32_bits(x))
        sign = (bits >> 16) & 0x8000
        a = bits & 0x7FFFFFFF
        if a >= 0x7F800000:
            return sign | 0x7C00 | (0x200 if a > 0x7F800000 else 0)
        if a >= 0x477FF000:  # >= 65520 rounds to inf
            return sign | 0x7C00
        exponent = a >> 23
        if exponent >= 113:
            rebased = a - (112 << 23)
            return sign | ((rebased + 0xFFF + ((rebased >> 13) & 1)) >> 13)
        if exponent == 0:
            return sign
        return sign | _round_shift((a & 0x7FFFFF) | 0x800000, 126 - exponent)

    @njit(cache=True)
    def _f32_to_bf16(x):
        """float32 -> bfloat16 bit pattern, round to nearest even (finite inputs)."""
        bits = np.int64(_f32_bits(x))
        if (bits & 0x7FFFFFFF) > 0x7F800000:
            return ((bits >> 16) | 0x40) & 0xFFFF
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF

    @njit(cache=True)
    def encode_lo_array(x, lo):
        """Vector form of :func:`_encode_lo` for tests: float32 [N] -> uint8 [N]."""
        out = np.empty(x.shape[0], dtype=np.uint8)
        for i in range(x.shape[0]):
            out[i] = _encode_lo(x[i], lo)
        return out

    @njit(cache=True)
    def f32_to_16_array(x, bf16):
        """Vector form of the float32 -> float16 / bfloat16 casts for tests."""
        out = np.empty(x.shape[0], dtype=np.uint16)
        for i in range(x.shape[0]):
            out[i] = _f32_to_bf16(x[i]) if bf16 else _f32_to_f16(x[i])
        return out

    @njit(cache=True)
    def _pack_row(values, absv, hi_row, check_hi, k, block, lo, hi_kind, codes, buf, data_row, mask_row, scale_row, amax):
        """One row: ``values`` float32 [C] (``absv`` their magnitudes) -> the data, mask
        and scale rows; ``codes`` uint8 [C] and ``buf`` uint8 [width + 1] are scratch;
        ``check_hi``: whether ``hi_row`` (patterns of the hi dtype) may hold inf.
        Returns a status: 0 ok, 1 a non-finite source value, 2 a hi value that is not
        finite in the hi dtype. Branch-free inner loops, so LLVM vectorises them."""
        cols = values.shape[0]
        groups = cols // 8
        limit = _LO_MAX[lo]
        finite = True
        for c in range(cols):
            finite &= absv[c] <= _F32_MAX  # False for NaN and inf
        if not finite:
            return 1
        for b in range(cols // block):
            amax[b] = np.float32(0.0)
        # Selection (FORMAT §5): element i is hi iff fewer than k elements of its group
        # beat it, where j beats i when |w_j| > |w_i|, or |w_j| == |w_i| and j < i. The
        # ranks are a permutation of 0..7, so the largest lo magnitude of the group is
        # the one of rank k (none when k == 8).
        for g in range(groups):
            base = np.uint64(g * 8)
            byte = 0
            lo_max = np.float32(0.0)
            for i in range(8):
                a_i = absv[base + np.uint64(i)]
                rank = 0
                for j in range(8):
                    a_j = absv[base + np.uint64(j)]
                    rank += (a_j > a_i) | ((a_j == a_i) & (j < i))
                byte |= np.int64(rank < k) << i
                lo_max += a_i * np.float32(rank == k)  # adds one value and seven zeros
            mask_row[g] = byte
            b = (g * 8) // block
            if lo_max > amax[b]:
                amax[b] = lo_max
        if check_hi:  # hi patterns converted from another dtype may overflow it
            hi_exp = 0x7C00 if hi_kind == 0 else 0x7F80
            for g in range(groups):
                byte = mask_row[g]
                for i in range(8):
                    if (byte >> i) & 1 and (hi_row[g * 8 + i] & hi_exp) == hi_exp:
                        return 2
        # Scales (FORMAT §4) and the lo code of every element (hi ones too: harmless and
        # keeps the loop free of the mask).
        for b in range(cols // block):
            s = amax[b] / limit  # float32 / float32: IEEE division
            scale_row[b] = s
            if s == 0:
                for c in range(b * block, (b + 1) * block):
                    codes[c] = 0
            else:
                for c in range(np.uint64(b * block), np.uint64((b + 1) * block)):
                    x = min(max(values[c] / s, -limit), limit)
                    codes[c] = _encode_lo(x, lo)
        if k == 0:
            for c in range(cols):
                data_row[c] = codes[c]
            return 0
        # Interleave (FORMAT §3) without branches: always write the hi high byte one
        # place on; a lo element's spill is overwritten by the next element (``buf``
        # has one spare byte for the row's last one).
        # Unsigned indices spare numba's negative-index wraparound on every access.
        one, low_byte = np.uint64(1), np.uint64(0xFF)
        offset = np.uint64(0)
        for g in range(groups):
            byte = np.uint64(mask_row[g])
            base = np.uint64(g * 8)
            for i in range(8):
                position = np.uint64(i)
                hi = (byte >> position) & one
                h = np.uint64(hi_row[base + position])
                code = np.uint64(codes[base + position])
                # Select by arithmetic, not a branch: the mask bits are data.
                buf[offset] = code ^ ((code ^ (h & low_byte)) & (np.uint64(0) - hi))
                buf[offset + one] = h >> np.uint64(8)
                offset += one + hi
        for c in range(data_row.shape[0]):
            data_row[c] = buf[c]
        return 0

    @njit(parallel=True, cache=True)
    def _quantize16(src, lut, hi_bits, check_hi, k, block, lo, hi_kind, data, mask, scale, status):
        rows, cols = src.shape
        for r in prange(rows):
            values = np.empty(cols, dtype=np.float32)
            absv = np.empty(cols, dtype=np.float32)
            codes = np.empty(cols, dtype=np.uint8)
            buf = np.empty(data.shape[1] + 1, dtype=np.uint8)
            amax = np.empty(cols // block, dtype=np.float32)
            for c in range(cols):
                value = lut[src[r, c]]
                values[c] = value
                absv[c] = abs(value)
            status[r] = _pack_row(
                values, absv, hi_bits[r], check_hi, k, block, lo, hi_kind, codes, buf, data[r], mask[r], scale[r], amax
            )

    @njit(parallel=True, cache=True)
    def _quantize32(src, hi_bits, check_hi, k, block, lo, hi_kind, data, mask, scale, status):
        rows, cols = src.shape
        for r in prange(rows):
            absv = np.empty(cols, dtype=np.float32)
            codes = np.empty(cols, dtype=np.uint8)
            buf = np.empty(data.shape[1] + 1, dtype=np.uint8)
            amax = np.empty(cols // block, dtype=np.float32)
            for c in range(cols):
                absv[c] = abs(src[r, c])
            status[r] = _pack_row(
                src[r], absv, hi_bits[r], check_hi, k, block, lo, hi_kind, codes, buf, data[r], mask[r], scale[r], amax
            )

    @njit(parallel=True, cache=True)
    def _dequantize(data, mask, scale, k, block, lo_table, hi_table, hi_same, out_kind, out16, out32, status):
        """Decode rows. lo: ``lo_table[q] * scale`` in float32; hi: the stored pattern,
        copied when the output dtype is the hi dtype (``hi_same``) else through
        ``hi_table`` (pattern -> float32, exact) and cast. ``out_kind``: 0 float32 into
        ``out32``; 1 float16 / 2 bfloat16 bit patterns into ``out16``. A row whose mask
        asks for more bytes than the row holds (popcount > k) gets status 1."""
        rows, groups = mask.shape
        width = data.shape[1]
        for r in prange(rows):
            used = 0
            for g in range(groups):
                used += 8 + _POPCOUNT[mask[r, g]]
            status[r] = used > width
            if used > width:
                continue
            # Unsigned indices spare numba's negative-index wraparound on every access.
            data_row, out16_row, out32_row = data[r], out16[r], out32[r]
            last = np.uint64(width - 1)
            offset = np.uint64(0)
            for g in range(groups):
                byte = np.uint64(mask[r, g])
                s = scale[r, (g * 8) // block]
                for i in range(8):
                    c = np.uint64(g * 8 + i)
                    hi = (byte >> np.uint64(i)) & np.uint64(1)
                    low = data_row[offset]
                    # The high byte of a hi value; for a lo element at the row's end the
                    # read is clamped into the row (and unused).
                    high = data_row[min(offset + np.uint64(1), last)]
                    offset += np.uint64(1) + hi
                    pattern = np.int64(low) | (np.int64(high) << 8)
                    # Both values are computed and one is selected (the mask bits are
                    # data: a branch on them would mispredict).
                    lo_value = lo_table[low] * s
                    hi_value = hi_table[pattern]
                    if out_kind == 0:
                        out32_row[c] = hi_value if hi else lo_value
                    elif hi_same:
                        lo16 = _f32_to_f16(lo_value) if out_kind == 1 else _f32_to_bf16(lo_value)
                        out16_row[c] = lo16 ^ ((lo16 ^ pattern) & -np.int64(hi))
                    else:
                        value = hi_value if hi else lo_value
                        out16_row[c] = _f32_to_f16(value) if out_kind == 1 else _f32_to_bf16(value)


_LAUNCHED = False


def _follow_torch_threads() -> None:
    """Run numba's parallel loops on as many threads as torch uses (``torch.set_num_threads``
    is the one knob users know). Starting numba's OpenMP layer resets the process's
    OpenMP thread count, which torch reads too, so torch's setting is put back then."""
    global _LAUNCHED
    if not _LAUNCHED:
        torch_threads = torch.get_num_threads()
        from numba.np.ufunc import parallel

        parallel._launch_threads()
        torch.set_num_threads(torch_threads)
        _LAUNCHED = True
    wanted = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)


_TABLES: dict[str, torch.Tensor] = {}


def _table(name: str) -> np.ndarray:
    """Lookup tables: 16-bit pattern -> float32 (exact) and lo byte -> float32."""
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
        _quantize32(weight.contiguous().numpy(), hi_np, True, k, block, LO_CODES[lo], HI_CODES[hi], *outs)
    else:
        src = weight.contiguous().view(torch.int16).numpy().view(np.uint16)
        lut = _table("float16" if weight.dtype == torch.float16 else "bfloat16")
        check_hi = weight.dtype != (torch.float16 if hi == "float16" else torch.bfloat16)
        _quantize16(src, lut, hi_np, check_hi, k, block, LO_CODES[lo], HI_CODES[hi], *outs)
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
    _dequantize(
        data.contiguous().numpy(), mask.contiguous().numpy(), scale.contiguous().numpy(), k, block,
        _table(lo), _table(hi), dtype == hi_dtype, out_kind, out16, out32, status,
    )
    return out, bool(status.any())
