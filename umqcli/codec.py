"""The torch reference codec: one 2-D tensor <-> its UMQ v1 representation.

Pure functions on tensors (no files, no printing): choose the hi positions, derive the
block scales, encode lo and hi values and interleave each group's bytes; and the
inverse. This is the one truth that the CUDA kernels, the CLI and the tests are measured
against. Everything is vectorised over rows and groups. For large CPU tensors with the
magnitude selection, :func:`quantize` and :func:`dequantize` hand the work to the fused
numba pass of :mod:`umqcli._fused` when it is installed (same bytes, several times
faster; ``fused=False`` forces this reference).

Shapes used throughout, for a source ``[R, C]`` with ``G = C / 8`` groups per row:
``mask`` bool ``[R, C]`` (True = hi), ``scale`` float32 ``[R, C / block]``.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass

import torch

from . import _fused
from .errors import UMQError
from .format import (
    DATA_SUFFIX,
    GROUP,
    MASK_SUFFIX,
    SCALE_SUFFIX,
    HiFormat,
    LoFormat,
    Method,
    QuantParams,
    ScaleRule,
    Selection,
    TensorSpec,
    dtype_name,
)

_POSITIONS = torch.arange(GROUP, dtype=torch.int64)
_BIT_VALUES = (1 << _POSITIONS).to(torch.uint8)


# --------------------------------------------------------------------------- packed type


@dataclass(frozen=True)
class PackedTensor:
    """One quantized tensor as stored (FORMAT §2).

    - ``data``: uint8 ``[R, G * (8 + k)]``, each group's payload bytes in position order.
    - ``mask``: uint8 ``[R, G]``, bit i set <=> position i is hi.
    - ``scale``: float32 ``[R, C / block]``, the lo scale of each block.
    - ``spec``: the ``umq.tensors`` entry (shape, dtypes, k, block, crc32, ...).
    """

    data: torch.Tensor
    mask: torch.Tensor
    scale: torch.Tensor
    spec: TensorSpec

    @property
    def shape(self) -> tuple[int, int]:
        return self.spec.shape

    @property
    def nbytes(self) -> int:
        return self.spec.stored_bytes

    @property
    def bits_per_element(self) -> float:
        return self.spec.bits_per_element

    def stored_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The three tensors under their file names (``NAME.umq_data`` ...)."""
        return {
            name + DATA_SUFFIX: self.data,
            name + MASK_SUFFIX: self.mask,
            name + SCALE_SUFFIX: self.scale,
        }

    @classmethod
    def from_stored(
        cls, spec: TensorSpec, data: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor
    ) -> "PackedTensor":
        return cls(data=data, mask=mask, scale=scale, spec=spec)

    def validate(self, *, name: str | None = None, check_crc: bool = True) -> None:
        """Check every FORMAT §7 rule; raise :class:`UMQError` naming tensor and rule."""
        validate(self, name=name, check_crc=check_crc)


def crc32(tensor: torch.Tensor) -> int:
    """zlib CRC-32 of a tensor's raw little-endian bytes."""
    flat = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return zlib.crc32(flat.numpy())


def mask_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[R, C]`` -> uint8 ``[R, C/8]`` mask bytes (bit i = position i, LSB first)."""
    rows, cols = mask.shape
    groups = mask.view(rows, cols // GROUP, GROUP).to(torch.uint8)
    return (groups * _BIT_VALUES).sum(-1, dtype=torch.uint8)


def unpack_mask(mask_bytes: torch.Tensor) -> torch.Tensor:
    """uint8 ``[R, G]`` mask bytes -> bool ``[R, G * 8]``."""
    rows, groups = mask_bytes.shape
    bits = (mask_bytes.unsqueeze(-1) & _BIT_VALUES.to(mask_bytes.device)) != 0
    return bits.view(rows, groups * GROUP)


POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


# --------------------------------------------------------------------------- encodings


def encode_lo(x: torch.Tensor, lo: LoFormat) -> torch.Tensor:
    """float32 values already divided by the scale -> uint8 bytes of the lo encoding.

    Clamps to ``[-MAX, MAX]`` first (FORMAT §4: libraries disagree on out-of-range casts),
    then rounds to nearest even (torch's fp8 casts; ``torch.round`` for int8).
    """
    limit = lo.max_value
    x = x.clamp(-limit, limit)
    if lo is LoFormat.INT8:
        return torch.round_(x).to(torch.int8).view(torch.uint8)
    return x.to(lo.torch_dtype).view(torch.uint8)


def decode_lo(q: torch.Tensor, lo: LoFormat) -> torch.Tensor:
    """uint8 bytes of the lo encoding -> float32 (unscaled)."""
    return q.view(lo.torch_dtype).to(torch.float32)


def encode_hi(x: torch.Tensor, hi: HiFormat) -> torch.Tensor:
    """Values -> int16 bit patterns of the hi dtype (round to nearest even)."""
    return x.to(hi.torch_dtype).view(torch.int16)


def decode_hi(bits: torch.Tensor, hi: HiFormat) -> torch.Tensor:
    """int16 bit patterns of the hi dtype -> values in the hi dtype."""
    return bits.view(hi.torch_dtype)


# --------------------------------------------------------------------------- selection


def select_magnitude(weight: torch.Tensor, k: int, salience: torch.Tensor | None = None) -> torch.Tensor:
    """bool ``[R, C]``: in each group the k largest ``|w|`` (or ``salience``) are hi.

    ``weight`` float ``[R, C]``; ``salience`` (optional) non-negative float ``[R, C]``.
    Ties go to the lower position (FORMAT §5). For k <= 4 this takes k rounds of
    ``argmax`` over each group, which returns the first (lowest) position among equal
    maxima, and retires the winner with -1 (below every |w|). For k > 4 each value is
    made unique by appending ``7 - i`` below its bits (non-negative float32 order equals
    int32 bit-pattern order) and the k-th largest key is the threshold, so no tie
    depends on a sort's stability.
    """
    rows, cols = weight.shape
    if k == 0:
        return torch.zeros(rows, cols, dtype=torch.bool, device=weight.device)
    if k == GROUP:
        return torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
    magnitude = weight.float().abs() if salience is None else salience.float()
    if k <= GROUP // 2:
        # abs() also maps -0.0 to +0.0, so signed zeros tie as they should.
        remaining = magnitude.reshape(-1, GROUP)
        if salience is not None:  # the caller's tensor: do not retire values in it
            remaining = remaining.clone()
        mask = torch.zeros(remaining.shape, dtype=torch.bool, device=weight.device)
        for _ in range(k):  # k <= 4 rounds, each vectorised over all groups
            winner = remaining.argmax(-1, keepdim=True)
            mask.scatter_(1, winner, True)
            remaining.scatter_(1, winner, -1.0)
        return mask.view(rows, cols)
    # Clearing the sign also maps -0.0 to +0.0, so signed zeros tie as they should.
    bits = magnitude.view(torch.int32).bitwise_and(0x7FFFFFFF).to(torch.int64)
    positions = _POSITIONS.to(weight.device)
    keys = ((bits.view(rows, cols // GROUP, GROUP) << 3) | (GROUP - 1 - positions))
    # The k-th largest key of each group is the threshold; keys are unique within a group.
    kth = keys.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    return (keys >= kth).view(rows, cols)


def block_scales(weight32: torch.Tensor, mask: torch.Tensor, block: int, lo: LoFormat) -> torch.Tensor:
    """float32 ``[R, C/block]``: absmax over each block's lo elements / MAX (FORMAT §4).

    ``weight32`` float32 ``[R, C]``, ``mask`` bool ``[R, C]`` (True = hi, excluded)."""
    rows, cols = weight32.shape
    lo_abs = weight32.abs().masked_fill_(mask, 0.0)
    amax = lo_abs.view(rows, cols // block, block).amax(-1)
    return amax.div_(lo.max_value)  # float32 / exact float32 constant: IEEE division


def _per_block(scale: torch.Tensor, block: int) -> torch.Tensor:
    """float32 ``[R, C/block]`` -> a ``[R, C/block, 1]`` view that broadcasts over the
    ``[R, C/block, block]`` view of a row-major ``[R, C]`` tensor (no repeat_interleave)."""
    return scale.unsqueeze(-1)


def quantize_lo(weight32: torch.Tensor, scale: torch.Tensor, block: int, lo: LoFormat) -> torch.Tensor:
    """uint8 ``[R, C]``: every element encoded as lo under its block's scale (0 if scale 0).

    ``weight32`` float32 ``[R, C]``; ``scale`` float32 ``[R, C/block]``."""
    rows, cols = weight32.shape
    per_block = _per_block(scale, block)
    scaled = weight32.view(rows, cols // block, block) / per_block
    # x / 0 is inf or nan there; FORMAT §4 says q = 0 where the scale is 0.
    scaled.masked_fill_(per_block == 0, 0.0)
    return encode_lo(scaled.view(rows, cols), lo)


def lo_error(weight32: torch.Tensor, scale: torch.Tensor, block: int, lo: LoFormat) -> torch.Tensor:
    """float32 ``[R, C]``: ``w - decode(encode(w / s)) * s`` for every element."""
    rows, cols = weight32.shape
    decoded = decode_lo(quantize_lo(weight32, scale, block, lo), lo).view(rows, cols // block, block)
    decoded.mul_(_per_block(scale, block))
    return torch.sub(weight32, decoded.view(rows, cols), out=decoded.view(rows, cols))


def select_error(
    weight32: torch.Tensor,
    k: int,
    block: int,
    lo: LoFormat,
    hi: HiFormat,
    channel_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """bool ``[R, C]``: error-greedy selection, never worse than magnitude per block.

    ``weight32`` float32 ``[R, C]``; ``channel_weight`` float32 ``[C]`` (E[x_j^2] per input
    column, ``activation``) or None (``error``: every ``a_j = 1``). The rule, exactly:

    1. Seeds: the magnitude selection ``M0``; with ``channel_weight`` also the salience
       selection ``Ms`` (the k largest ``|w_j| * sqrt(a_j)`` per group, ties toward the
       lower position). The last seed is ``S``, with its absmax scales ``s``.
    2. Under ``s``, every element's gain from going hi is ``a_j * (e_lo^2 - e_hi^2)``:
       its squared lo error (``w - decode(encode(clamp(w / s))) * s``, so clamped
       outliers keep a large gain) minus its squared hi rounding error.
    3. ``M1``: in each group the k largest gains (ties toward the lower position).
    4. For each candidate (``M0``, [``Ms``,] ``M1``) re-derive its absmax scales and its
       weighted squared error per scale block, ``sum_j a_j (w_j - w_hat_j)^2`` (float32);
       per block keep the candidate with the lowest error, the earlier one on ties.

    Step 4 is exact per block because blocks share no scale and no group, so the total
    weighted error is never above magnitude's (nor, for ``activation``, salience's).
    """
    rows, cols = weight32.shape
    if k in (0, GROUP):
        return select_magnitude(weight32, k)
    weights = None if channel_weight is None else channel_weight.float().to(weight32.device).view(1, cols)
    candidates = [select_magnitude(weight32, k)]
    if weights is not None:
        candidates.append(select_magnitude(weight32, k, weight32.abs() * weights.sqrt()))
    hi_err_sq = (weight32 - weight32.to(hi.torch_dtype).float()).square_()
    seed = candidates[-1]
    seed_lo_err_sq = lo_error(weight32, block_scales(weight32, seed, block, lo), block, lo).square_()
    gain = seed_lo_err_sq - hi_err_sq
    if weights is not None:
        gain *= weights
    # Gains may be negative (hi rounding worse than lo): shift so the order is kept.
    gain -= gain.amin()
    candidates.append(select_magnitude(weight32, k, gain))
    del gain

    def blockwise_error(mask: torch.Tensor) -> torch.Tensor:
        if mask is seed:  # its lo errors are the ones the gain was computed from
            lo_err_sq = seed_lo_err_sq
        else:
            lo_err_sq = lo_error(weight32, block_scales(weight32, mask, block, lo), block, lo).square_()
        err = torch.where(mask, hi_err_sq, lo_err_sq)
        if weights is not None:
            err *= weights
        return err.view(rows, cols // block, block).sum(-1)

    errors = torch.stack([blockwise_error(mask) for mask in candidates])
    choice = errors.argmin(0)  # first minimum: the earlier candidate wins ties
    stacked = torch.stack(candidates).view(len(candidates), rows, cols // block, block)
    index = choice.view(1, rows, cols // block, 1).expand(1, rows, cols // block, block)
    return stacked.gather(0, index).view(rows, cols)


# --------------------------------------------------------------------------- quantize


def _check_source(weight: torch.Tensor) -> None:
    """Refuse what cannot be packed: not 2-D, C not a positive multiple of 8, a non-float
    dtype (rules shape / source-dtype), a NaN or infinite value (rule finite)."""
    _source_shape(weight)
    # A sum is one cheap pass and is non-finite whenever an element is (it may also
    # overflow on finite input: only then is the exact element-wise check needed).
    if bool(torch.isfinite(weight.sum(dtype=torch.float32))):
        return
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise UMQError(
            f"value {weight[bad[0], bad[1]].item()} at [{bad[0]}, {bad[1]}] is not finite",
            rule="finite",
        )


def resolve_hi(weight: torch.Tensor, mask: torch.Tensor | None, hi: HiFormat | None) -> HiFormat:
    """``hi=None`` (auto): the source dtype for 16-bit sources; for float32 sources
    float16 when every hi value (``mask`` bool [R, C], needed only then) is finite in
    float16, else bfloat16."""
    if hi is not None:
        return hi
    if weight.dtype == torch.float16:
        return HiFormat.FLOAT16
    if weight.dtype == torch.bfloat16:
        return HiFormat.BFLOAT16
    hi_values = weight[mask]
    if hi_values.numel() and not bool(torch.isfinite(hi_values.to(torch.float16)).all()):
        return HiFormat.BFLOAT16
    return HiFormat.FLOAT16


def check_act_sq(act_sq: torch.Tensor | None, columns: int) -> None:
    """What the ``activation`` selection needs: float ``[C]`` E[x_j^2], finite and >= 0."""
    if act_sq is None:
        raise UMQError(
            "selection 'activation' needs activation statistics (umq calibrate)",
            rule="activation-stats",
        )
    if act_sq.shape != (columns,):
        raise UMQError(
            f"activation statistics have shape {tuple(act_sq.shape)}, expected ({columns},)",
            rule="activation-stats",
        )
    if not bool((torch.isfinite(act_sq) & (act_sq >= 0)).all()):
        raise UMQError(
            "activation statistics (E[x^2] per input channel) must be finite and >= 0",
            rule="activation-stats",
        )


def select(
    weight: torch.Tensor,
    params: QuantParams,
    *,
    act_sq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, HiFormat]:
    """bool ``[R, C]`` hi mask for ``params.selection`` and the resolved hi format."""
    weight = weight.contiguous()
    weight32 = weight.float()
    block = params.resolve_block(weight.shape[1])
    if params.selection is Selection.MAGNITUDE:
        mask = select_magnitude(weight32, params.k)
        return mask, resolve_hi(weight, mask, params.hi)
    if params.selection is Selection.ACTIVATION:
        check_act_sq(act_sq, weight.shape[1])
    # The gain uses the hi rounding error, so resolve hi from the magnitude mask first
    # (only a float32 source with hi auto needs the mask for that).
    needs_mask = params.hi is None and weight.dtype == torch.float32
    hi = resolve_hi(weight, select_magnitude(weight32, params.k) if needs_mask else None, params.hi)
    channel = act_sq if params.selection is Selection.ACTIVATION else None
    mask = select_error(weight32, params.k, block, params.lo, hi, channel)
    if params.hi is None and weight.dtype == torch.float32:
        hi = resolve_hi(weight, mask, None)
    return mask, hi


def quantize(
    weight: torch.Tensor,
    params: QuantParams = QuantParams(),
    *,
    act_sq: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    name: str | None = None,
    fused: bool | None = None,
) -> PackedTensor:
    """Quantize a 2-D float32/float16/bfloat16 tensor into its UMQ v1 representation.

    ``act_sq`` (float32 ``[C]``, E[x_j^2] per input channel) is required by the
    ``activation`` selection; ``mask`` (bool ``[R, C]``, exactly k True per group)
    overrides the selection. Raises :class:`UMQError` naming ``name`` and the rule for
    NaN/Inf input, a bad shape or a hi value that overflows the hi dtype.

    ``fused``: None (default) uses the fused numba pass (:mod:`umqcli._fused`) for the
    ``magnitude`` selection of a CPU tensor of at least :data:`FUSED_MIN_ELEMENTS`
    elements when numba is installed, else the torch reference; True/False force one or
    the other (False = always the reference). Both give identical bytes.
    """
    _check_rounding(params, name)
    # A Parameter is fine (packing is not differentiable); row-major makes every
    # [R, C/B, B] and [R, G, 8] view below valid (a no-op for the usual contiguous input).
    weight = weight.detach().contiguous()
    try:
        if use_fused(fused, weight.device, weight.numel()) and mask is None and params.selection is Selection.MAGNITUDE:
            packed = _quantize_fused(weight, params)
            if packed is not None:
                return packed
        with torch.no_grad():
            return _quantize(weight, params, act_sq, mask)
    except UMQError as exc:
        raise exc.located(tensor=name)


def _check_rounding(params: QuantParams, name: str | None = None) -> None:
    """This codec rounds to nearest under absmax scales; the rest is umqcli.gptq's."""
    if params.method is not Method.RTN or params.scale_rule is not ScaleRule.ABSMAX:
        raise UMQError(
            f"method {params.method.value!r} with scale rule {params.scale_rule.value!r} is "
            f"umqcli.gptq.quantize_gptq's (this codec rounds to nearest under absmax scales)",
            rule="method", tensor=name,
        )


def _quantize(weight, params, act_sq, mask) -> PackedTensor:
    _check_source(weight)
    rows, cols = weight.shape
    block = params.resolve_block(cols)
    weight32 = weight.float()
    if mask is None:
        mask, hi = select(weight, params, act_sq=act_sq)
    else:
        mask = _check_mask(weight, mask, params.k)
        hi = resolve_hi(weight, mask, params.hi)
    scale = block_scales(weight32, mask, block, params.lo)
    return assemble(weight, params, hi, mask, scale, quantize_lo(weight32, scale, block, params.lo))


def assemble(
    weight: torch.Tensor,
    params: QuantParams,
    hi: HiFormat,
    mask: torch.Tensor,
    scale: torch.Tensor,
    lo_bytes: torch.Tensor,
) -> PackedTensor:
    """The packed tensor from its parts, whatever rule made them: the source ``weight``
    ``[R, C]`` (its hi values are stored, rounded to ``hi``), the hi ``mask`` bool
    ``[R, C]``, the block ``scale`` float32 ``[R, C/block]`` and the ``lo_bytes`` uint8
    ``[R, C]`` (entries under the mask are ignored). Raises for a hi value that is not
    finite in ``hi`` (rule ``hi-overflow``)."""
    block = params.resolve_block(weight.shape[1])
    hi_bits = encode_hi(weight, hi)
    _check_hi_finite(weight, mask, hi_bits.view(hi.torch_dtype), hi)
    data = interleave(lo_bytes, hi_bits, mask, params.k)
    mask_bytes = mask_bits(mask)
    return _packed_result(weight, params, hi, block, data, mask_bytes, scale)


def _check_mask(weight: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """A caller's hi mask: bool of the weight's shape with exactly k hi per group."""
    rows, cols = weight.shape
    if mask.shape != weight.shape or mask.dtype != torch.bool:
        raise UMQError(
            f"a given mask must be bool of the weight's shape {tuple(weight.shape)}, "
            f"got {mask.dtype} {tuple(mask.shape)}",
            rule="shape",
        )
    mask = mask.contiguous()
    counts = mask.view(rows, cols // GROUP, GROUP).sum(-1)
    if bool((counts != k).any()):
        raise UMQError(f"a given mask must have exactly {k} hi per group", rule="popcount")
    return mask


def _check_hi_finite(weight: torch.Tensor, mask: torch.Tensor, hi_values: torch.Tensor, hi: HiFormat) -> None:
    """Every hi value (``hi_values`` in the hi dtype, where ``mask``) is finite."""
    hi_overflow = mask & ~torch.isfinite(hi_values)
    if bool(hi_overflow.any()):
        r, c = hi_overflow.nonzero()[0].tolist()
        raise UMQError(
            f"hi value {weight[r, c].item()} at [{r}, {c}] is not finite in {hi.value}",
            rule="hi-overflow", hint="use hi bfloat16 or auto",
        )


def _packed_result(
    weight: torch.Tensor,
    params: QuantParams,
    hi: HiFormat,
    block: int,
    data: torch.Tensor,
    mask_bytes: torch.Tensor,
    scale: torch.Tensor,
) -> PackedTensor:
    """The stored tensors and their ``umq.tensors`` entry (crc32 of each)."""
    spec = TensorSpec(
        shape=tuple(weight.shape),
        dtype=dtype_name(weight.dtype),
        k=params.k,
        lo=params.lo,
        hi=hi,
        block=block,
        selection=params.recorded_selection,
        scale_rule=params.scale_rule.value,
        crc32={"data": crc32(data), "mask": crc32(mask_bytes), "scale": crc32(scale)},
    )
    return PackedTensor(data=data, mask=mask_bytes, scale=scale, spec=spec)


# Below this many elements the torch reference is fast enough that the fused pass's
# one-off cost per process (loading or compiling the numba code) does not pay.
FUSED_MIN_ELEMENTS = 1 << 16


def use_fused(fused: bool | None, device: torch.device, elements: int) -> bool:
    """Whether to run the fused numba pass: ``fused`` True forces it (UMQError if numba
    is missing), False refuses it, None picks it for CPU tensors of at least
    :data:`FUSED_MIN_ELEMENTS` elements when numba is installed and UMQ_FUSED != 0."""
    if fused is False or device.type != "cpu":
        return False
    if fused:
        if not _fused.available():
            raise UMQError("the fused codec needs numba (pip install numba)", rule="fused")
        return True
    return elements >= FUSED_MIN_ELEMENTS and _fused.available()


def _source_shape(weight: torch.Tensor) -> None:
    """The shape/dtype half of :func:`_check_source` (the fused pass checks finiteness)."""
    if weight.dim() != 2:
        raise UMQError(f"expected a 2-D tensor, got shape {tuple(weight.shape)}", rule="shape")
    dtype_name(weight.dtype)
    rows, cols = weight.shape
    if rows == 0 or cols == 0 or cols % GROUP:
        raise UMQError(
            f"shape {tuple(weight.shape)}: the column count must be a positive multiple of 8",
            rule="shape",
        )


def _quantize_fused(weight: torch.Tensor, params: QuantParams) -> PackedTensor | None:
    """The magnitude selection in one fused pass; None when the reference path must run
    to raise its error (non-finite input, hi overflow) with the exact location."""
    _source_shape(weight)
    rows, cols = weight.shape
    block = params.resolve_block(cols)
    if params.hi is not None:
        choices = [params.hi]
    elif weight.dtype == torch.float32:  # auto: float16 unless a hi value overflows it
        choices = [HiFormat.FLOAT16, HiFormat.BFLOAT16]
    else:
        choices = [HiFormat.FLOAT16 if weight.dtype == torch.float16 else HiFormat.BFLOAT16]
    weight = weight.contiguous()
    for hi in choices:
        hi_bits = weight.view(torch.int16) if weight.dtype == hi.torch_dtype else encode_hi(weight, hi)
        data, mask_bytes, scale, status = _fused.quantize_magnitude(
            weight, hi_bits, params.k, block, params.lo.value, hi.value
        )
        worst = int(status.max())
        if worst == 0:
            break
        if worst == 1:
            return None  # a non-finite value: the reference check names it
    else:
        return None  # hi overflow: the reference raises it (or picks bfloat16)
    return _packed_result(weight, params, hi, block, data, mask_bytes, scale)


# --------------------------------------------------------------------------- fake quantize


class FakeQuantizer:
    """The values one weight decodes to under many parameter sets, without the bytes.

    ``values(params, ...)`` equals ``dequantize(quantize(weight, params, act_sq=act_sq,
    mask=mask), dtype)`` bit for bit (``tests/test_codec.py`` checks every lo format,
    selection and source dtype) and raises the same errors; ``select(params)`` equals
    :func:`select`. It uses the codec's own selection, scale and rounding functions and
    skips only the byte interleave and the CRCs. Comparing or searching many
    configurations of one weight (``umq compare``, ``umq calibrate``) shares what does
    not depend on the lo format or the block: the float32 copy, the magnitude mask of
    each k and the hi values of each hi format.
    """

    def __init__(self, weight: torch.Tensor, act_sq: torch.Tensor | None = None) -> None:
        self.weight = weight.detach().contiguous()
        _check_source(self.weight)
        self.weight32 = self.weight.float()
        self.act_sq = act_sq
        self._magnitude: dict[tuple[int, HiFormat | None], tuple[torch.Tensor, HiFormat]] = {}
        self._hi_values: dict[tuple[HiFormat, torch.dtype], torch.Tensor] = {}
        self._hi_finite: dict[HiFormat, bool] = {}
        self._all_fp16: bool | None = None

    def uniform_hi(self) -> HiFormat | None:
        """The hi format that ``hi = auto`` resolves to for every mask of this weight, or
        None when it depends on the mask (a float32 weight with values beyond float16)."""
        if self.weight.dtype != torch.float32:
            return resolve_hi(self.weight, None, None)
        if self._all_fp16 is None:
            self._all_fp16 = bool(torch.isfinite(self.weight.to(torch.float16)).all())
        return HiFormat.FLOAT16 if self._all_fp16 else None

    def _auto_hi(self, mask: torch.Tensor) -> HiFormat:
        """:func:`resolve_hi` with ``hi=None``, without looking at the mask when possible."""
        return self.uniform_hi() or resolve_hi(self.weight, mask, None)

    def magnitude(self, k: int, hi: HiFormat | None = None) -> tuple[torch.Tensor, HiFormat]:
        """The magnitude selection's mask for ``k`` and the resolved hi format (cached)."""
        key = (k, hi)
        if key not in self._magnitude:
            mask = select_magnitude(self.weight32, k)
            self._magnitude[key] = mask, hi or self._auto_hi(mask)
        return self._magnitude[key]

    def select(self, params: QuantParams) -> tuple[torch.Tensor, HiFormat]:
        """What :func:`select` returns for ``params`` (and this weight's ``act_sq``)."""
        magnitude, hi = self.magnitude(params.k, params.hi)
        if params.selection is Selection.MAGNITUDE or params.k in (0, GROUP):
            if params.selection is Selection.ACTIVATION:
                check_act_sq(self.act_sq, self.weight.shape[1])
            return magnitude, hi
        channel = None
        if params.selection is Selection.ACTIVATION:
            check_act_sq(self.act_sq, self.weight.shape[1])
            channel = self.act_sq
        block = params.resolve_block(self.weight.shape[1])
        mask = select_error(self.weight32, params.k, block, params.lo, hi, channel)
        return mask, (params.hi or self._auto_hi(mask))

    def hi_values(self, hi: HiFormat, dtype: torch.dtype) -> torch.Tensor:
        """Every element rounded to ``hi`` then converted to ``dtype`` (cached)."""
        key = (hi, dtype)
        if key not in self._hi_values:
            rounded = self.weight.to(hi.torch_dtype)
            if hi not in self._hi_finite:
                self._hi_finite[hi] = bool(torch.isfinite(rounded).all())
            self._hi_values[key] = rounded.to(dtype)
        return self._hi_values[key]

    def values(self, params: QuantParams, *, mask: torch.Tensor | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[R, C]`` in ``dtype`` (default: the weight's, as :func:`dequantize`)."""
        _check_rounding(params)
        if mask is None:
            mask, hi = self.select(params)
        else:
            mask = _check_mask(self.weight, mask, params.k)
            hi = resolve_hi(self.weight, mask, params.hi)
        target = dtype or self.weight.dtype
        hi_values = self.hi_values(hi, target)
        if not self._hi_finite[hi]:
            _check_hi_finite(self.weight, mask, self.weight.to(hi.torch_dtype), hi)
        rows, cols = self.weight.shape
        block = params.resolve_block(cols)
        scale = block_scales(self.weight32, mask, block, params.lo)
        lo_values = decode_lo(quantize_lo(self.weight32, scale, block, params.lo), params.lo)
        lo_values = lo_values.view(rows, cols // block, block).mul_(_per_block(scale, block)).view(rows, cols)
        return torch.where(mask, hi_values, lo_values.to(target))


def fake_quantize(
    weight: torch.Tensor,
    params: QuantParams = QuantParams(),
    *,
    mask: torch.Tensor | None = None,
    act_sq: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(weight, params, act_sq=act_sq, mask=mask), dtype)``, bit for
    bit, without building the bytes (see :class:`FakeQuantizer`, which also shares work
    across many ``params`` of one weight)."""
    with torch.no_grad():
        return FakeQuantizer(weight, act_sq).values(params, mask=mask, dtype=dtype)


# --------------------------------------------------------------------------- byte layout


def byte_offsets(mask: torch.Tensor, k: int) -> torch.Tensor:
    """int64 ``[R, C]``: where each element's first byte sits in its row of ``data``.

    ``offset(i) = g * (8 + k) + i + popcount(mask & ((1 << i) - 1))`` (FORMAT §3).
    """
    rows, cols = mask.shape
    groups = cols // GROUP
    hi_before = mask.view(rows, groups, GROUP).to(torch.int64).cumsum(-1) - mask.view(rows, groups, GROUP).to(torch.int64)
    base = torch.arange(groups, device=mask.device, dtype=torch.int64).mul_(GROUP + k).view(1, groups, 1)
    return (base + _POSITIONS.to(mask.device) + hi_before).view(rows, cols)


_LAYOUT_TABLES: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _layout_tables(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per mask byte (256 rows), the FORMAT §3 layout of one group, as int64 tables:

    - ``low`` ``[256, 8]``: offset of position i's first byte, ``i + popcount(m & ((1<<i)-1))``;
    - ``high`` ``[256, 8]``: that offset + 1, clamped into the group (used by hi only);
    - ``slots`` ``[256, 8 + k]``: for each payload byte, its slot in the group's 16
      ``(first byte, high byte)`` pairs, i.e. the gather that interleaves (rows of masks
      whose popcount is not k are filled with 0 and never used).

    A 256-row lookup replaces per-element cumsum/offset arithmetic.
    """
    key = (k, str(device))
    if key not in _LAYOUT_TABLES:
        masks = torch.arange(256, dtype=torch.int64).unsqueeze(1)
        bits = (masks >> _POSITIONS) & 1
        low = _POSITIONS + bits.cumsum(1) - bits
        high = (low + 1).clamp_(max=GROUP + k - 1)
        keep = torch.stack((torch.ones_like(bits), bits), -1).view(256, 2 * GROUP).bool()
        slots = torch.zeros(256, GROUP + k, dtype=torch.int64)
        valid = bits.sum(1) == k
        slots[valid] = keep[valid].nonzero()[:, 1].view(-1, GROUP + k)
        _LAYOUT_TABLES[key] = (low.to(device), high.to(device), slots.to(device))
    return _LAYOUT_TABLES[key]


def interleave(lo_bytes: torch.Tensor, hi_bits: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Assemble the payload: uint8 ``[R, G * (8 + k)]`` from per-element lo bytes (uint8),
    hi int16 patterns and the hi mask (bool), all ``[R, C]``, every group with k hi.

    Each element becomes a (first byte, high byte) pair, ``[R, G, 16]``; one gather per
    group through the mask byte's slot table keeps the payload bytes in order."""
    rows, cols = mask.shape
    groups = cols // GROUP
    _, _, slots = _layout_tables(k, mask.device)
    hi_bytes = hi_bits.view(torch.uint8).view(rows, cols, 2)  # little-endian pattern
    first = torch.where(mask, hi_bytes[..., 0], lo_bytes)
    pairs = torch.stack((first, hi_bytes[..., 1]), -1).view(rows, groups, 2 * GROUP)
    index = slots[mask_bits(mask).long()]
    return pairs.gather(-1, index).view(rows, groups * (GROUP + k))


# --------------------------------------------------------------------------- decode


def validate(packed: PackedTensor, *, name: str | None = None, check_crc: bool = True) -> None:
    """Check a packed tensor against FORMAT §2/§7: stored dtypes and shapes, crc32, the
    popcount of every mask byte, every scale finite and >= 0, every lo byte a finite code,
    every hi value finite (§4 forbids writing NaN or infinity; a reader refuses them).

    Costs about one pass over the stored bytes: each rule is first checked with a single
    reduction, and only a failing rule pays for locating the first offender in its
    message. Raises :class:`UMQError` (``tensor=name``) with the rule that failed.
    """
    spec = packed.spec

    def fail(message: str, rule: str) -> UMQError:
        return UMQError(message, rule=rule, tensor=name)

    check_stored_layout(packed, name=name)
    if check_crc:
        for key, tensor in (("data", packed.data), ("mask", packed.mask), ("scale", packed.scale)):
            actual = crc32(tensor)
            if actual != spec.crc32.get(key):
                raise fail(
                    f"crc32 of {key} is {actual}, header says {spec.crc32.get(key)}: the file is corrupted",
                    "crc32",
                )
    counts = POPCOUNT.to(packed.mask.device).take(packed.mask.long())
    low, high = torch.aminmax(counts)
    if not int(low) == int(high) == spec.k:
        r, g = (counts != spec.k).nonzero()[0].tolist()
        raise fail(
            f"mask byte at [{r}, {g}] has {int(counts[r, g])} bits set, expected k={spec.k}",
            "popcount",
        )
    low, high = torch.aminmax(packed.scale)
    if not (math.isfinite(float(low)) and math.isfinite(float(high)) and float(low) >= 0):
        bad_scale = ~torch.isfinite(packed.scale) | (packed.scale < 0)
        r, b = bad_scale.nonzero()[0].tolist()
        raise fail(f"scale at [{r}, {b}] is {packed.scale[r, b].item()}, must be finite and >= 0", "scale")
    _check_lo_codes(packed, fail)
    _check_hi_values(packed, fail)


def _invalid_code(payload: torch.Tensor, lo: LoFormat) -> torch.Tensor:
    """bool, same shape: bytes that are not a finite code of ``lo`` (E4M3: 0x7F/0xFF NaN;
    E5M2: exponent all ones, inf/NaN; int8: -128)."""
    if lo is LoFormat.FP8_E4M3:
        return (payload & 0x7F) == 0x7F
    if lo is LoFormat.FP8_E5M2:
        return (payload & 0x7C) == 0x7C
    return payload == 0x80


def _check_lo_codes(packed: PackedTensor, fail) -> None:
    """Every lo byte is a finite code. One pass finds the payload bytes that would be
    invalid as lo codes; only rows holding such a byte (they may all be hi bytes, whose
    low halves are arbitrary) are looked up in the per-mask-byte table of lo bytes."""
    spec = packed.spec
    suspect_rows = _invalid_code(packed.data, spec.lo).any(1).nonzero().flatten()
    if suspect_rows.numel() == 0:
        return
    data = packed.data.index_select(0, suspect_rows)
    is_lo = _byte_roles(spec.k, data.device)[0][packed.mask.index_select(0, suspect_rows).long()]
    lo_invalid = _invalid_code(data, spec.lo) & is_lo.view(data.shape)
    if bool(lo_invalid.any()):
        r, b = lo_invalid.nonzero()[0].tolist()
        raise fail(
            f"payload byte 0x{int(data[r, b]):02x} at [{int(suspect_rows[r])}, {b}] is a lo byte "
            f"but not a finite {spec.lo.value} code",
            "lo-code",
        )


def _check_hi_values(packed: PackedTensor, fail) -> None:
    """Every hi value is finite in its hi dtype. A hi value is two bytes in a row, low
    byte first; its exponent is all ones (infinity or NaN) when the high byte has bits
    ``0x7C`` set (float16), or ``0x7F`` set and the low byte's top bit (bfloat16). One
    pass over the payload finds the bytes that look like such a high byte; only those are
    looked up in the per-mask-byte table of hi high bytes (lo bytes may look the same)."""
    spec = packed.spec
    if spec.k == 0:
        return
    flat = packed.data.reshape(-1)
    # uint8 0/1 computed in place: one temporary, about half the time of bool masks.
    if spec.hi is HiFormat.FLOAT16:
        looks_non_finite = flat[1:].bitwise_and(0x7C).eq_(0x7C)
    else:
        looks_non_finite = flat[1:].bitwise_and(0x7F).eq_(0x7F).mul_(flat[:-1] >> 7)
    high_at = looks_non_finite.nonzero().flatten() + 1
    if high_at.numel() == 0:
        return
    group_bytes = GROUP + spec.k
    row, column = high_at // packed.data.shape[1], high_at % packed.data.shape[1]
    group, byte = column // group_bytes, column % group_bytes
    is_high = _byte_roles(spec.k, flat.device)[1][packed.mask[row, group].long(), byte]
    if bool(is_high.any()):
        first = int(is_high.nonzero()[0, 0])
        at = int(high_at[first])
        bits = int(flat[at - 1]) | int(flat[at]) << 8
        value = decode_hi(torch.tensor([bits]).to(torch.int16), spec.hi)
        raise fail(
            f"hi value 0x{bits:04x} in group {int(group[first])} of row {int(row[first])} is "
            f"{float(value[0])} in {spec.hi.value}: hi values must be finite",
            "hi-finite",
        )


@functools.lru_cache(maxsize=None)
def _byte_roles(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two bool ``[256, 8 + k]`` tables: per mask byte, which payload bytes of a group are
    lo bytes, and which are the high byte of a hi value."""
    _, _, slots = _layout_tables(k, device)
    position, half = slots // 2, slots % 2
    masks = torch.arange(256, device=device).unsqueeze(1)
    is_hi = (masks >> position) & 1
    return (half == 0) & (is_hi == 0), (half == 1) & (is_hi == 1)


def deinterleave(packed: PackedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`interleave`: (lo bytes uint8, hi int16 patterns, hi mask bool),
    each ``[R, C]``; entries not used by an element's kind are meaningless. Offsets come
    from the per-mask-byte tables of :func:`_layout_tables` (FORMAT §3)."""
    spec = packed.spec
    rows, cols = spec.shape
    groups = cols // GROUP
    low_table, high_table, _ = _layout_tables(spec.k, packed.data.device)
    mask_index = packed.mask.long()
    groups_data = packed.data.reshape(rows, groups, GROUP + spec.k)
    low = groups_data.gather(-1, low_table[mask_index]).view(rows, cols)
    high = groups_data.gather(-1, high_table[mask_index]).view(rows, cols)
    hi_bits = torch.stack((low, high), -1).view(torch.int16).view(rows, cols)
    return low, hi_bits, unpack_mask(packed.mask)


def dequantize(packed: PackedTensor, dtype: torch.dtype | None = None, *, fused: bool | None = None) -> torch.Tensor:
    """Decode to the source dtype (or ``dtype``): hi values as stored, lo values as
    ``decode(q) * scale`` in float32, then cast (FORMAT §4). Returns ``[R, C]``.

    ``fused``: as in :func:`quantize` (None: for large CPU tensors the C++ decode of
    :mod:`umqcli.runtime` when it builds, else the fused numba pass; True: numba's; False:
    the torch reference). All give identical values.
    """
    spec = packed.spec
    target = dtype or spec.torch_dtype
    if use_fused(fused, packed.data.device, spec.rows * spec.columns) and target in _fused.OUT_CODES:
        from . import runtime  # the C++ decode (SIMD) when it builds; numba's otherwise

        if fused is None and runtime.available():
            return runtime.decode(packed, target)
        check_stored_layout(packed)
        out, bad_rows = _fused.dequantize(
            packed.data, packed.mask, packed.scale, spec.k, spec.block, spec.lo.value, spec.hi.value, target
        )
        if bad_rows:
            raise UMQError(
                f"a mask row has more than k={spec.k} hi bits per group: the payload is too short",
                rule="popcount",
            )
        return out
    rows, cols = spec.shape
    check_stored_layout(packed)
    if bool((POPCOUNT.to(packed.mask.device)[packed.mask.long()] != spec.k).any()):
        raise UMQError(f"a mask byte does not have exactly k={spec.k} bits set", rule="popcount")
    low, hi_bits, mask = deinterleave(packed)
    lo_values = decode_lo(low, spec.lo).view(rows, cols // spec.block, spec.block)
    lo_values = lo_values.mul_(_per_block(packed.scale, spec.block)).view(rows, cols)
    hi_values = decode_hi(hi_bits, spec.hi).to(target)
    return torch.where(mask, hi_values, lo_values.to(target))


def check_stored_layout(packed: PackedTensor, *, name: str | None = None) -> None:
    """Dtypes and shapes of the stored tensors (FORMAT §2): the part of :func:`validate`
    that the memory safety of the fused decoder and of the CUDA kernels depends on."""
    spec = packed.spec
    for suffix, tensor, dtype in (
        (DATA_SUFFIX, packed.data, torch.uint8),
        (MASK_SUFFIX, packed.mask, torch.uint8),
        (SCALE_SUFFIX, packed.scale, torch.float32),
    ):
        expected = spec.stored_shapes()[suffix]
        if tensor.dtype != dtype or tuple(tensor.shape) != expected:
            raise UMQError(
                f"{suffix[1:]} is {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {expected} "
                f"for shape {list(spec.shape)}, k={spec.k}, block={spec.block}",
                rule="stored-shape" if tensor.dtype == dtype else "stored-dtype",
                tensor=name,
            )


def weight_error(weight: torch.Tensor, packed: PackedTensor) -> float:
    """Relative Frobenius error ``||W - W_hat|| / ||W||`` of the decoded tensor (0 for W = 0)."""
    w = weight.double()
    norm = torch.linalg.vector_norm(w)
    diff = torch.linalg.vector_norm(w - dequantize(packed, torch.float32).double())
    return 0.0 if norm == 0 else float(diff / norm)
