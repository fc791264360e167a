"""Error bounds the kernel and backend tests (and ``benchmarks/gpu_check.py``) hold the
matmul paths to, as float64 ``[M, R]`` tensors: each output's worst case."""

from __future__ import annotations

import torch

from ..codec import PackedTensor, dequantize
from ..format import GROUP

UNIT = 2.0**-24  # float32 unit roundoff


def gamma(n: int) -> float:
    """``n u / (1 - n u)``: the relative error bound of n float32 roundings (Higham §3.1)."""
    return n * UNIT / (1 - n * UNIT)


def dot_error_bound(x: torch.Tensor, packed: PackedTensor) -> torch.Tensor:
    """The worst-case error of any float32 evaluation of ``x · Ŵᵀ``.

    Each output is a dot product of C float32 terms; summed in float32 in ANY order (the
    kernel's tiles, torch's blocked GEMM, an FMA chain), its error is at most
    ``gamma_C * sum_j |x_j| |w_j|`` (Higham, Accuracy and Stability of Numerical
    Algorithms, §3.1). This is why the tests use this bound and not a guessed rtol: it is
    tight enough to catch one wrong weight (an error of order |x_j w_j|) and cannot fail
    for a correct summation order.
    """
    weight = dequantize(packed, torch.float32).double()
    return gamma(x.shape[-1]) * (x.double().abs() @ weight.abs().T)


BF16_UNIT = 2.0**-8  # bfloat16 unit roundoff (8 significand bits, the leading one included)
FLUSH = 2.0**-126  # the smallest normal float32: what one flushed subnormal (VDPBF16PS) can lose


def bf16_linear_error_bound(
    x: torch.Tensor, packed: PackedTensor, bias: torch.Tensor | None = None, *, weight_rounded: bool = False
) -> torch.Tensor:
    """The worst-case error of ``y = bf16(x · bf16(Ŵ)ᵀ + bf16(b))`` summed in float32 in any
    order (the runtime's bfloat16 prefill path, ``F.linear`` in bfloat16) against the exact
    ``x · Ŵᵀ + b`` (x bfloat16 ``[M, C]``; with ``weight_rounded``, against the exact
    ``x · bf16(Ŵ)ᵀ + bf16(b)``, which isolates the GEMM).

    With ``u = 2^-8``, ``A = |x| · |Ŵ|ᵀ + |b|``: rounding the weights and the bias to
    bfloat16 moves the exact sum by at most ``u A`` (zero when ``weight_rounded``); the
    products of bfloat16 values are exact in float32 and the C + 1 terms (bias included)
    are summed with error at most ``gamma_{C+1} (1 + u) A`` (Higham §3.1); a subnormal
    flushed to zero by the bfloat16 dot-product instruction loses less than 2^-126 each
    time, at most C + 1 times. That is E; the output's one rounding to bfloat16 adds
    ``u |y_float32| <= u (|x · Ŵᵀ + b| + E)``. Bound: ``(1 + u) E + u |x · Ŵᵀ + b|``.
    """
    weight = dequantize(packed, torch.float32)
    if weight_rounded:
        weight = weight.to(torch.bfloat16)
        bias = None if bias is None else bias.to(torch.bfloat16)
    x64, w64 = x.double(), weight.double()
    b64 = torch.zeros(packed.spec.rows, dtype=torch.float64) if bias is None else bias.double()
    magnitude = x64.abs() @ w64.abs().T + b64.abs()
    exact = x64 @ w64.T + b64
    n = x.shape[-1] + 1
    rounding = 0.0 if weight_rounded else BF16_UNIT
    summed = (rounding + gamma(n) * (1 + BF16_UNIT)) * magnitude + n * FLUSH
    return (1 + BF16_UNIT) * summed + BF16_UNIT * exact.abs()


def hi_positions(packed: PackedTensor) -> torch.Tensor:
    """bool ``[R, C]``: True where the mask marks a hi element."""
    bits = (packed.mask.to(torch.int64).unsqueeze(-1) >> torch.arange(GROUP)) & 1
    return bits.bool().reshape(packed.spec.rows, packed.spec.columns)


def split_error_bound(x: torch.Tensor, packed: PackedTensor) -> torch.Tensor:
    """The worst-case error of :class:`umqcli.backends.split.SplitBackend` against the
    exact ``x · Ŵᵀ`` (x float32 ``[M, C]``).

    Two sources: rounding the activations, element j by at most
    ``e_j = (unit + 2u) |x_j| + half_spacing * s`` (the activation format's relative
    rounding, the float32 division by the row scale ``s``, and half the format's smallest
    spacing for values that land below its normal range), against the lo weights for the
    lo GEMM and the hi weights for the hi GEMM; and the float32 arithmetic on the rounded
    activations, ``gamma_n * sum_j (|x_j| + e_j) |ŵ_j| (1 + 2u)`` with
    ``n = C + 2 * blocks + 5`` (the sums, the scale epilogues, the block sums, the final
    add and ``ŵ = fl(q * scale)`` against the exact product)."""
    from ..backends.split import HI_ACTIVATIONS, LO_ACTIVATIONS, quantize_rows

    spec = packed.spec
    x = x.to(torch.float32)
    weight = dequantize(packed, torch.float32).double().abs() * (1 + 2 * UNIT)
    hi = hi_positions(packed)
    total = torch.zeros(x.shape[0], spec.rows, dtype=torch.float64)
    magnitude = torch.zeros_like(total)
    for fmt, part in ((LO_ACTIVATIONS[spec.lo], weight * ~hi), (HI_ACTIVATIONS[spec.hi], weight * hi)):
        _, scale = quantize_rows(x, fmt)
        error = (fmt.unit + 2 * UNIT) * x.double().abs() + fmt.half_spacing * scale.double()[:, None]
        total += error @ part.T
        magnitude += (x.double().abs() + error) @ part.T
    blocks = spec.columns // spec.block
    return total + gamma(spec.columns + 2 * blocks + 5) * magnitude
