"""The numba kernels of the fused codec pass (see :mod:`umqcli._fused`).

Imported only when the fused pass first runs, so that importing ``umqcli`` does not pay
for importing numba. Every function is compiled on first use and cached on disk
(``cache=True``); scalar helpers are inlined into the row kernels by LLVM.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

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
    if k == 1:
        # The common case in one scan: the hi element is the first of the largest, the
        # largest lo magnitude the largest of the other seven (same result as the ranks).
        for g in range(groups):
            base = np.uint64(g * 8)
            top = absv[base]
            second = np.float32(0.0)
            where = 0
            for i in range(1, 8):
                a_i = absv[base + np.uint64(i)]
                above = a_i > top
                second = max(second, min(a_i, top))
                top = max(top, a_i)
                where = i if above else where
            mask_row[g] = 1 << where
            b = (g * 8) // block
            if second > amax[b]:
                amax[b] = second
    else:
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


# --------------------------------------------------------------------------- candidate errors
# The calibration search's inner loop: the activation-weighted squared error of many
# configurations of one weight, without building any reconstruction (see
# umqcli._fused.candidate_errors for the contract and its reference twin).


@njit(cache=True)
def _group_ranks(values, rank, order):
    """``rank[c]``: how many elements of c's group of 8 beat it (greater value, or equal
    at a lower position): FORMAT §5's order, so ``rank < k`` is the top-k selection.
    ``order[g * 8 + r]``: the column of the group's element of rank r (the inverse)."""
    for g in range(values.shape[0] // 8):
        base = g * 8
        for i in range(8):
            v_i = values[base + i]
            r = 0
            for j in range(8):
                v_j = values[base + j]
                r += (v_j > v_i) | ((v_j == v_i) & (j < i))
            rank[base + i] = r
            order[base + r] = base + i


@njit(cache=True)
def _block_scale(absw, order, k, c0, c1, limit):
    """FORMAT §4: absmax of the block's lo elements (rank >= k) / MAX, in float32."""
    amax = np.float32(0.0)
    for g0 in range(c0, c1, 8):
        for r in range(k, 8):
            amax = max(amax, absw[order[g0 + r]])
    return amax / limit


@njit(cache=True)
def _block_error(w, hi_sq, lo_sq, a, b, order, k, c0, c1, s, lo, limit, lut):
    """Squared error of one scale block for the mask "rank < k" under lo scale ``s``,
    weighted two ways: ``(sum a_c d_c^2, sum b_c d_c^2)`` in float64 (``a``: the
    prediction's weights, ``b``: the selection's). Only the lo elements are encoded; with
    ``s < 0`` their squared errors are read from ``lo_sq`` instead. A zero scale means
    every lo element of the block is 0, whose error is 0 under any scale: dividing by 1
    instead keeps the loop free of a branch."""
    s_safe = s if s != 0 else np.float32(1.0)
    err_a = 0.0
    err_b = 0.0
    for g0 in range(c0, c1, 8):
        for r in range(k):
            c = order[g0 + r]
            err_a += a[c] * hi_sq[c]
            err_b += b[c] * hi_sq[c]
        for r in range(k, 8):
            c = order[g0 + r]
            if s < 0:
                d2 = lo_sq[c]
            else:
                x = min(max(w[c] / s_safe, -limit), limit)
                d = np.float64(w[c]) - np.float64(lut[_encode_lo(x, lo)] * s_safe)
                d2 = d * d
            err_a += a[c] * d2
            err_b += b[c] * d2
    return err_a, err_b


@njit(parallel=True, cache=True)
def _candidate_errors(w, hi, a, sqrt_a, ks, blocks, los, selections, luts, out):
    """``out[r, i]``: ``sum_c a_c (w_rc - ŵ_rc)^2`` of row r under candidate i (k, block
    columns, lo code, selection 0 magnitude / 1 error / 2 activation). The error and
    activation selections follow ``codec.select_error``: seed mask (magnitude, or
    salience for activation), the gain of every element under the seed's scales, the
    top-k gain mask, and per block the mask (magnitude, [salience,] gain) of least
    error, the earlier one on ties."""
    rows, cols = w.shape
    n = ks.shape[0]
    ones = np.ones(cols, dtype=np.float64)
    a64 = a.astype(np.float64)
    for r in prange(rows):
        wr, hr = w[r], hi[r]
        absw = np.empty(cols, dtype=np.float32)
        hi_sq = np.empty(cols, dtype=np.float64)
        hi_sq32 = np.empty(cols, dtype=np.float32)
        salience = np.empty(cols, dtype=np.float32)
        gain = np.empty(cols, dtype=np.float32)
        seed_sq = np.empty(cols, dtype=np.float64)
        rank = np.empty(cols, dtype=np.int64)  # ranks are only needed through their order
        order_mag = np.empty(cols, dtype=np.int64)
        order_sal = np.empty(cols, dtype=np.int64)
        order_gain = np.empty(cols, dtype=np.int64)
        for c in range(cols):
            absw[c] = abs(wr[c])
            d = np.float64(wr[c]) - np.float64(hr[c])
            hi_sq[c] = d * d
            d32 = wr[c] - hr[c]
            hi_sq32[c] = d32 * d32
            salience[c] = absw[c] * sqrt_a[c]
        _group_ranks(absw, rank, order_mag)
        _group_ranks(salience, rank, order_sal)
        for i in range(n):
            k, block, lo, selection = ks[i], blocks[i], los[i], selections[i]
            limit = _LO_MAX[lo]
            lut = luts[lo]
            total = 0.0
            if selection == 0 or k == 0 or k == 8:
                for c0 in range(0, cols, block):
                    s = _block_scale(absw, order_mag, k, c0, c0 + block, limit)
                    total += _block_error(wr, hi_sq, seed_sq, a64, a64, order_mag, k, c0, c0 + block, s, lo,
                                          limit, lut)[0]
                out[r, i] = total
                continue
            seed = order_sal if selection == 2 else order_mag
            sel_weights = a64 if selection == 2 else ones
            # The gain of going hi under the seed's scales, in float32 as the reference.
            for c0 in range(0, cols, block):
                s = _block_scale(absw, seed, k, c0, c0 + block, limit)
                s_safe = s if s != 0 else np.float32(1.0)
                for c in range(c0, c0 + block):
                    x = min(max(wr[c] / s_safe, -limit), limit)
                    v = lut[_encode_lo(x, lo)] * s_safe
                    e = wr[c] - v
                    g = e * e - hi_sq32[c]
                    gain[c] = g * a[c] if selection == 2 else g
                    d = np.float64(wr[c]) - np.float64(v)
                    seed_sq[c] = d * d
            _group_ranks(gain, rank, order_gain)
            reuse = np.float32(-1.0)  # the seed's lo errors are in seed_sq
            for c0 in range(0, cols, block):
                c1 = c0 + block
                # the candidates in the reference's order; the first of equal errors wins
                best_a, best_b = _block_error(wr, hi_sq, seed_sq, a64, sel_weights, seed, k, c0, c1, reuse, lo,
                                              limit, lut)
                if selection == 2:
                    s = _block_scale(absw, order_mag, k, c0, c1, limit)
                    err_a, err_b = _block_error(wr, hi_sq, seed_sq, a64, sel_weights, order_mag, k, c0, c1, s, lo,
                                                limit, lut)
                    if err_b <= best_b:  # magnitude comes before salience in the reference
                        best_a, best_b = err_a, err_b
                s = _block_scale(absw, order_gain, k, c0, c1, limit)
                err_a, err_b = _block_error(wr, hi_sq, seed_sq, a64, sel_weights, order_gain, k, c0, c1, s, lo,
                                            limit, lut)
                if err_b < best_b:
                    best_a, best_b = err_a, err_b
                total += best_a
            out[r, i] = total
