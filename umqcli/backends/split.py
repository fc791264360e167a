"""The seed's split matmul as a backend: ``Y = X·((1−M)⊙Ŵ)ᵀ + X·(M⊙Ŵ)ᵀ`` as two dense
GEMMs on stock torch ops (tensor cores on a GPU, no custom kernel).

- **lo part**: the lo codes with zeros at the hi positions form a dense 8-bit ``[R, C]``
  matrix (byte 0 is +0 in FP8 E4M3, E5M2 and int8, so the codes are used as stored, no
  re-rounding). ``x`` is quantized per row (per token) to FP8 E4M3 (``amax / 448``) for
  FP8 weights, to int8 (``amax / 127``) for int8 weights; the GEMM is
  ``torch._scaled_mm`` (FP8, unit scales, float32 out) or ``torch._int_mm`` (exact int32),
  and the row scales of ``x`` and ``Ŵ`` are applied to its float32 result. With a scale per
  block of columns (``block < C``) the lo part is one GEMM per block of columns (``K =
  block``), summed in float32: correct everywhere, fast only with one scale per row.
- **hi part**: the hi values with zeros at the lo positions, a dense ``[R, C]`` matrix in
  the hi format; ``x`` is cast to that format (for float16, first divided by a per-row
  power of two so it cannot overflow) and multiplied with float32 output
  (``torch.mm(..., out_dtype=float32)`` on a GPU; on the CPU, where that op does not exist,
  the same products, which are exact in float32, are summed in float32).

The two float32 partial products are added. Unlike the fused kernels this path rounds
the *activations* (to 8 bits for the lo part, 16 bits for the hi part), so it is not
within the float32 dot-product bound of ``X·Ŵᵀ``; :func:`umqcli.testing.bounds.split_error_bound`
states its bound, element by element. ``decode`` is :func:`codec.dequantize` (bit-exact).

Preparation (:meth:`SplitBackend.prepare`) turns the packed bytes into the two dense
matrices once; :meth:`SplitBackend.matmul_prepared` is the per-call work. Shapes are
padded to multiples of 16 (the FP8 GEMM's requirement on a GPU) with zero weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codec import PackedTensor, dequantize
from ..format import GROUP, HiFormat, LoFormat
from . import check_matmul_input

PAD = 16  # torch._scaled_mm on a GPU needs K and N multiples of 16
INT_MM_MIN_ROWS = 17  # torch._int_mm on a GPU needs more than 16 rows


@dataclass(frozen=True)
class ActivationFormat:
    """How ``x`` is rounded for one GEMM: per-row scale ``amax / max_value`` (or a power
    of two for float16), then a cast to ``dtype``. The rounding error of one element is at
    most ``unit * |x| + half_spacing * row_scale`` (relative rounding for normal values,
    half the smallest spacing below them)."""

    dtype: torch.dtype
    max_value: float
    unit: float
    half_spacing: float


# The activations of the lo GEMM, by the weight's lo format (FP8 weights meet E4M3
# activations: cuBLAS has no E5M2 x E5M2 FP8 GEMM).
LO_ACTIVATIONS = {
    LoFormat.FP8_E4M3: ActivationFormat(torch.float8_e4m3fn, 448.0, 2.0**-4, 2.0**-10),
    LoFormat.FP8_E5M2: ActivationFormat(torch.float8_e4m3fn, 448.0, 2.0**-4, 2.0**-10),
    LoFormat.INT8: ActivationFormat(torch.int8, 127.0, 0.0, 0.5),
}
# The activations of the hi GEMM: the hi format itself.
HI_ACTIVATIONS = {
    HiFormat.BFLOAT16: ActivationFormat(torch.bfloat16, float(torch.finfo(torch.bfloat16).max), 2.0**-8, 2.0**-134),
    HiFormat.FLOAT16: ActivationFormat(torch.float16, 2.0**15, 2.0**-11, 2.0**-25),
}


@dataclass(frozen=True)
class SplitWeight:
    """A packed weight as the two dense GEMM operands.

    ``lo_codes`` ``[blocks, R_pad, K_pad]`` (FP8 or int8; zero at hi positions and in the
    padding), ``lo_scale`` float32 ``[blocks, R]``, ``hi`` ``[R_pad, C]`` in the hi format
    (zero at lo positions and in the padding)."""

    rows: int
    columns: int
    block: int
    lo: LoFormat
    hi_format: HiFormat
    lo_codes: torch.Tensor
    lo_scale: torch.Tensor
    hi: torch.Tensor


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def split_packed(packed: PackedTensor, device: torch.device | None = None) -> SplitWeight:
    """The dense lo-code and hi matrices of ``packed`` (gathered from the payload by the
    mask bits: position ``i`` of a group sits at byte ``i + popcount(mask & ((1<<i)-1))``)."""
    spec = packed.spec
    rows, cols = spec.shape
    device = device or packed.data.device
    groups = cols // GROUP
    data = packed.data.to(device).reshape(rows, groups, GROUP + spec.k).to(torch.int64)
    bits = (packed.mask.to(device).to(torch.int64).unsqueeze(-1) >> torch.arange(GROUP, device=device)) & 1
    offset = torch.arange(GROUP, device=device) + torch.cumsum(bits, dim=-1) - bits
    first = torch.gather(data, 2, offset)
    is_hi = bits.bool()
    lo_bytes = torch.where(is_hi, 0, first).reshape(rows, cols).to(torch.uint8)
    if spec.k:
        second = torch.gather(data, 2, (offset + 1).clamp(max=GROUP + spec.k - 1))
        hi_bits = torch.where(is_hi, first | (second << 8), 0).reshape(rows, cols)
    else:
        hi_bits = torch.zeros(rows, cols, dtype=torch.int64, device=device)
    block = spec.block  # resolved: columns per scale
    blocks = cols // block
    rows_pad, k_pad = _round_up(rows, PAD), _round_up(block, PAD)
    codes = torch.zeros(blocks, rows_pad, k_pad, dtype=torch.uint8, device=device)
    codes[:, :rows, :block] = lo_bytes.reshape(rows, blocks, block).permute(1, 0, 2)
    hi = torch.zeros(rows_pad, cols, dtype=torch.int16, device=device)
    hi[:rows] = hi_bits.to(torch.int32).to(torch.int16)  # low 16 bits: the stored pattern
    return SplitWeight(
        rows=rows,
        columns=cols,
        block=block,
        lo=spec.lo,
        hi_format=spec.hi,
        lo_codes=codes.view(spec.lo.torch_dtype),
        lo_scale=packed.scale.to(device=device, dtype=torch.float32).T.contiguous(),
        hi=hi.view(spec.hi.torch_dtype),
    )


def quantize_rows(x: torch.Tensor, fmt: ActivationFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` float32 ``[M, C]`` -> (codes in ``fmt.dtype``, float32 row scales ``[M]``)
    with ``codes * scale ≈ x``. FP8/int8: scale ``amax / max_value`` (1 for a zero row),
    round to nearest even. float16: the smallest power of two that brings ``amax`` to at
    most ``max_value`` (exact division; 1 when no scaling is needed). bfloat16: scale 1."""
    amax = x.abs().amax(dim=1)
    if fmt.dtype == torch.bfloat16:
        scale = torch.ones_like(amax)
    elif fmt.dtype == torch.float16:
        scale = torch.exp2(torch.ceil(torch.log2(amax / fmt.max_value)).clamp(min=0))
    else:
        scale = torch.where(amax > 0, amax / fmt.max_value, torch.ones_like(amax))
    scaled = (x / scale[:, None]).clamp(-fmt.max_value, fmt.max_value)
    if fmt.dtype == torch.int8:
        return torch.round(scaled).to(torch.int8), scale
    return scaled.to(fmt.dtype), scale


def _mm_float32(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a @ b_t`` for 16-bit operands with float32 output and accumulation."""
    if a.is_cuda:
        try:
            return torch.mm(a, b_t, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch without mm.dtype: a float32 GEMM
            pass
    # The CPU has no mm.dtype: products of 16-bit values are exact in float32, so this
    # is the same arithmetic (a float32 sum of exact products), at float32 GEMM speed.
    return a.float() @ b_t.float()


class SplitBackend:
    """Split FP8/int8 + 16-bit GEMMs (contract: :mod:`umqcli.backends`; its matmul error
    bound is :func:`umqcli.testing.bounds.split_error_bound`, looser than the fused
    kernels' because the activations are rounded)."""

    name = "split"

    def decode(self, packed: PackedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(packed, dtype)

    def prepare(self, packed: PackedTensor, device: torch.device | None = None) -> SplitWeight:
        return split_packed(packed, device)

    def matmul(self, x: torch.Tensor, packed: PackedTensor) -> torch.Tensor:
        check_matmul_input(x, packed)
        return self.matmul_prepared(x, self.prepare(packed, x.device))

    def matmul_prepared(self, x: torch.Tensor, weight: SplitWeight) -> torch.Tensor:
        """``x`` float ``[..., C]`` -> float32 ``[..., R]``."""
        lead = x.shape[:-1]
        flat = x.reshape(-1, weight.columns).to(torch.float32)
        m = flat.shape[0]
        if m == 0:
            return torch.empty(*lead, weight.rows, dtype=torch.float32, device=x.device)
        y = self._lo_part(flat, weight) + self._hi_part(flat, weight)
        return y.reshape(*lead, weight.rows)

    def _lo_part(self, flat: torch.Tensor, weight: SplitWeight) -> torch.Tensor:
        fmt = LO_ACTIVATIONS[weight.lo]
        codes, x_scale = quantize_rows(flat, fmt)
        m = flat.shape[0]
        blocks, rows_pad, k_pad = weight.lo_codes.shape
        m_run = max(m, INT_MM_MIN_ROWS) if (fmt.dtype == torch.int8 and flat.is_cuda) else m
        padded = torch.zeros(blocks, m_run, k_pad, dtype=torch.uint8, device=flat.device)
        padded[:, :m, : weight.block] = codes.view(torch.uint8).reshape(m, blocks, weight.block).permute(1, 0, 2)
        padded = padded.view(fmt.dtype)
        one = torch.ones((), dtype=torch.float32, device=flat.device)
        y = torch.zeros(m, weight.rows, dtype=torch.float32, device=flat.device)
        for b in range(blocks):
            if fmt.dtype == torch.int8:
                part = torch._int_mm(padded[b], weight.lo_codes[b].T).to(torch.float32)
            else:
                part = torch._scaled_mm(padded[b], weight.lo_codes[b].T, scale_a=one, scale_b=one,
                                        out_dtype=torch.float32)
            y += part[:m, : weight.rows] * weight.lo_scale[b][None, :]
        return y * x_scale[:, None]

    def _hi_part(self, flat: torch.Tensor, weight: SplitWeight) -> torch.Tensor:
        fmt = HI_ACTIVATIONS[weight.hi_format]
        codes, x_scale = quantize_rows(flat, fmt)
        return _mm_float32(codes, weight.hi.T)[:, : weight.rows] * x_scale[:, None]

    def __repr__(self) -> str:
        return "SplitBackend()"
