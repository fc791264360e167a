"""Second-order error feedback (GPTQ) and error-minimising scales for the lo part.

The reference codec (:mod:`umqcli.codec`) rounds every lo value to nearest on its own
under the block's absmax scale. Here, for a weight ``W [R, C]`` and its layer's input
Hessian ``H = E[x x^T]`` ``[C, C]`` (float32, from ``umq calibrate``):

1. **hi positions first** (:func:`select_hi`): magnitude, error, activation (E[x_j^2] =
   ``H_jj`` unless statistics are given) or ``saliency``, the GPTQ/SpQR criterion: the
   error-greedy rule of ``codec.select_error`` with channel weights ``1 / [H^-1]_jj``,
   seeded with the k largest ``w^2 / [H^-1]_jj`` per group.
2. **scales** (:func:`search_scales`): absmax, or a clip-ratio grid per block minimising
   the plain (``clip``) or ``H_jj``-weighted (``clip-hessian``) squared lo error. Scales are
   fixed before the sweep (GPTQ's "static groups"), so columns can be visited in any
   order.
3. **the sweep** (:func:`_sweep`): columns in order of decreasing ``H_jj`` (GPTQ's act
   order), in blocks of 128. Each column is rounded (lo: to nearest under its scale; hi:
   the source value in the hi dtype, untouched, FORMAT §4), and its error, divided by the
   diagonal of ``U`` (upper Cholesky factor of the damped ``H^-1``), is pushed into the
   columns not yet visited: ``W[:, j+1:] -= err_j U[j, j+1:]``, lazily per block. A hi
   element cannot absorb its share, so the deviation it collected is pushed on when its
   column comes (its "rounding" returns the source value), as GPTQ does for any rounding
   rule.
4. **a per-row guard**: rows are independent (scales, groups and selection never cross a
   row), so each row keeps the sweep's result only where its ``e^T H e`` (undamped H) is
   below round-to-nearest's under the same mask and scales; the output error is never
   above RTN's.

The result is FORMAT v1 bytes through :func:`codec.assemble`; ``selection`` records
``"<selection>+gptq"`` and ``scale_rule`` the scale rule. With ``H = I`` nothing is pushed
and the bytes equal ``codec.quantize``'s. Float32, vectorised over rows; nothing prints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codec import (
    PackedTensor,
    _check_source,
    assemble,
    block_scales,
    decode_lo,
    quantize,
    quantize_lo,
    select,
)
from .errors import UMQError
from .format import GROUP, HiFormat, LoFormat, Method, QuantParams, ScaleRule, Selection

DAMP = 0.01  # GPTQ's default: 1% of the mean Hessian diagonal on the diagonal
SWEEP_BLOCK = 128  # columns per lazy update (GPTQ's block size)
# Clip ratios tried per block: absmax first (ties keep it), then down to half.
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))


@dataclass(frozen=True)
class PreparedHessian:
    """What the sweep needs from one ``H [C, C]``, computed once per layer input and
    shared by every slab of rows and every layer that reads the same input.

    - ``hessian``: float32 ``[C, C]``, as given (the guard's objective).
    - ``order``: int64 ``[C]``, the column visiting order (decreasing ``H_jj``).
    - ``inverse_factor``: float32 ``[C, C]``, upper Cholesky factor ``U`` of the damped
      ``H^-1`` in that order (``H^-1 = U^T U``).
    - ``inverse_diagonal``: float32 ``[C]``, ``[H^-1]_jj`` of the damped H, source order.
    """

    hessian: torch.Tensor
    order: torch.Tensor
    inverse_factor: torch.Tensor
    inverse_diagonal: torch.Tensor

    @property
    def diagonal(self) -> torch.Tensor:
        return self.hessian.diagonal()


def prepare_hessian(hessian: torch.Tensor, *, damp: float = DAMP) -> PreparedHessian:
    """Damp and invert ``H`` (float ``[C, C]``, symmetric positive semi-definite).

    Dead columns (``H_jj == 0``: an input that is always zero) get ``H_jj = 1``, as in
    GPTQ; the damping ``damp * mean(H_jj)`` is raised tenfold until the Cholesky
    factorisations succeed. Raises :class:`UMQError` (rule ``hessian``) for a non-square
    or non-finite H.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise UMQError(f"the Hessian must be square, got shape {tuple(hessian.shape)}", rule="hessian")
    h = hessian.detach().to(torch.float32)
    if not bool(torch.isfinite(h).all()):
        raise UMQError("the Hessian holds non-finite values", rule="hessian")
    work = h.clone()
    diagonal = work.diagonal()
    dead = diagonal <= 0
    diagonal[dead] = 1.0
    order = torch.argsort(diagonal, descending=True, stable=True)
    work = work[order][:, order]
    mean = float(work.diagonal().mean())
    eye = torch.eye(work.shape[0], dtype=torch.float32)
    for attempt in range(6):
        damped = work + (damp * 10**attempt * mean) * eye
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            factor, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                break
    else:
        raise UMQError("the Hessian is not positive definite even after damping", rule="hessian")
    inverse_diagonal = torch.empty_like(diagonal)
    inverse_diagonal[order] = inverse.diagonal()
    return PreparedHessian(h, order, factor.contiguous(), inverse_diagonal)


# --------------------------------------------------------------------------- selection


def select_hi(
    weight: torch.Tensor,
    params: QuantParams,
    hessian: PreparedHessian | None,
    act_sq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, HiFormat]:
    """bool ``[R, C]`` hi mask and the resolved hi format for ``params.selection``.

    ``activation`` uses ``act_sq`` when given, else the Hessian diagonal (both are
    E[x_j^2]); ``saliency`` is ``codec.select_error`` with channel weights
    ``1 / [H^-1]_jj`` (needs ``hessian``)."""
    if params.selection is Selection.SALIENCY:
        if hessian is None:
            raise UMQError("selection 'saliency' needs the layer's Hessian (umq calibrate)", rule="hessian")
        inverse_diagonal = hessian.inverse_diagonal
        return select(weight, params.with_(selection=Selection.ACTIVATION, method=Method.RTN),
                      act_sq=1.0 / inverse_diagonal)
    if params.selection is Selection.ACTIVATION and act_sq is None and hessian is not None:
        act_sq = hessian.diagonal.clamp(min=0)
    return select(weight, params.with_(method=Method.RTN), act_sq=act_sq)


# --------------------------------------------------------------------------- scales


def search_scales(
    weight32: torch.Tensor,
    mask: torch.Tensor,
    block: int,
    lo: LoFormat,
    channel_weight: torch.Tensor | None = None,
    ratios: tuple[float, ...] = CLIP_RATIOS,
) -> torch.Tensor:
    """float32 ``[R, C/block]``: per block, ``absmax scale * ratio`` for the ratio with the
    least ``sum_j a_j (w_j - w_hat_j)^2`` over the block's lo elements (``a_j`` from
    ``channel_weight`` float ``[C]``, or 1). The first ratio wins ties, so with 1.0 first
    a block is never worse than absmax."""
    rows, cols = weight32.shape
    absmax = block_scales(weight32, mask, block, lo)
    lo_weight = (~mask).float()
    if channel_weight is not None:
        lo_weight = lo_weight * channel_weight.float().view(1, cols)
    best_scale = absmax
    best_error = None
    for ratio in ratios:
        scale = absmax * ratio
        decoded = decode_lo(quantize_lo(weight32, scale, block, lo), lo).view(rows, cols // block, block)
        decoded.mul_(scale.unsqueeze(-1))
        error = (weight32.view(rows, cols // block, block) - decoded).square_()
        error = (error * lo_weight.view(rows, cols // block, block)).sum(-1)
        if best_error is None:
            best_error = error
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


def scales_for(
    weight32: torch.Tensor,
    mask: torch.Tensor,
    params: QuantParams,
    hessian: PreparedHessian | None,
    act_sq: torch.Tensor | None,
) -> torch.Tensor:
    """The block scales of ``params.scale_rule`` (float32 ``[R, C/block]``)."""
    block = params.resolve_block(weight32.shape[1])
    if params.scale_rule is ScaleRule.ABSMAX:
        return block_scales(weight32, mask, block, params.lo)
    channel_weight = None
    if params.scale_rule is ScaleRule.CLIP_HESSIAN:
        if act_sq is None and hessian is None:
            raise UMQError("scale rule 'clip-hessian' needs activation statistics (umq calibrate)",
                           rule="activation-stats")
        channel_weight = (act_sq if act_sq is not None else hessian.diagonal).clamp(min=0)
    return search_scales(weight32, mask, block, params.lo, channel_weight)


# --------------------------------------------------------------------------- sweep


def _sweep(
    weight32: torch.Tensor,
    mask: torch.Tensor,
    hi_values: torch.Tensor,
    scale_per_column: torch.Tensor,
    lo: LoFormat,
    hessian: PreparedHessian,
    sweep_block: int = SWEEP_BLOCK,
) -> torch.Tensor:
    """float32 ``[R, C]``: the value each lo element had when its column was rounded
    (source order); its lo byte is ``quantize_lo`` of it. ``scale_per_column`` float32
    ``[R, C]``, ``hi_values`` float32 ``[R, C]`` (the decoded hi values).

    Works on the transpose (one visited column = one contiguous row) so that the
    per-column steps are a handful of contiguous vector ops."""
    order = hessian.order
    factor = hessian.inverse_factor
    work = weight32.t()[order].contiguous()  # [C, R], visiting order
    is_hi = mask.t()[order].contiguous()
    hi_sorted = hi_values.t()[order].contiguous()
    scales = scale_per_column.t()[order].contiguous()
    # A zero scale decodes every lo value to 0 (FORMAT §4); dividing by 1 there keeps
    # the vector ops free of inf/nan and the product with the zero scale gives the 0.
    divisors = torch.where(scales == 0, torch.ones_like(scales), scales)
    limit = lo.max_value
    cols, rows = work.shape
    rounded_from = torch.empty_like(work)
    for start in range(0, cols, sweep_block):
        stop = min(start + sweep_block, cols)
        part = work[start:stop]  # a view: updated in place
        errors = torch.empty(stop - start, rows, dtype=torch.float32)
        local = factor[start:stop, start:stop]
        for i in range(stop - start):
            j = start + i
            # The block's earlier errors reach this column now (lazily: one matrix-vector
            # product reads them, where a rank-1 update per column would rewrite the block).
            column = rounded_from[j]
            torch.addmv(part[i], errors[:i].t(), local[:i, i], alpha=-1.0, out=column)
            scaled = (column / divisors[j]).clamp_(-limit, limit)
            if lo is LoFormat.INT8:
                decoded = scaled.round_()
            else:
                decoded = scaled.to(lo.torch_dtype).float()
            decoded = torch.where(is_hi[j], hi_sorted[j], decoded.mul_(scales[j]))
            torch.sub(column, decoded, out=errors[i]).div_(local[i, i])
        if stop < cols:
            work[stop:].addmm_(factor[start:stop, stop:].t(), errors, alpha=-1.0)
    result = torch.empty_like(weight32)
    result[:, order] = rounded_from.t()
    return result


def _row_energy(error: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """float64 ``[R]``: ``e_r^T H e_r`` per row (float32 matmul, float64 sum)."""
    return ((error @ hessian) * error).double().sum(1)


@dataclass
class _Parts:
    """One configuration's rounding of one weight before error feedback: the hi mask and
    format, the block scales and the lo bytes rounded to nearest."""

    params: QuantParams
    mask: torch.Tensor
    hi: HiFormat
    scale: torch.Tensor
    lo_bytes: torch.Tensor

    def row_energy(self, weight32: torch.Tensor, hi_values: torch.Tensor, lo_bytes: torch.Tensor,
                   hessian: PreparedHessian) -> torch.Tensor:
        """Each row's ``e^T H e`` (float64 ``[R]``), ``e`` the weight minus its decode
        with these parts and ``lo_bytes``."""
        block = self.params.resolve_block(weight32.shape[1])
        decoded = _decoded(lo_bytes, self.scale, block, self.params.lo, self.mask, hi_values)
        return _row_energy(weight32 - decoded, hessian.hessian)


def _rounded_parts(weight: torch.Tensor, params: QuantParams, hessian: PreparedHessian | None,
                   act_sq: torch.Tensor | None) -> _Parts:
    block = params.resolve_block(weight.shape[1])
    weight32 = weight.float()
    mask, hi = select_hi(weight, params, hessian, act_sq)
    scale = scales_for(weight32, mask, params, hessian, act_sq)
    return _Parts(params, mask, hi, scale, quantize_lo(weight32, scale, block, params.lo))


def _error_feedback(weight: torch.Tensor, parts: list[_Parts],
                    hessian: PreparedHessian) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per configuration: the lo bytes after the sweep and the guard, and each row's
    ``e^T H e`` (float64 ``[R]``) under them. Configurations with one lo format run in
    one sweep with their rows stacked (rows are independent): the sweep's per-column
    steps are then paid once, not once per configuration."""
    weight32 = weight.float()
    rows, cols = weight32.shape
    out: list = [None] * len(parts)
    by_lo: dict[LoFormat, list[int]] = {}
    for i, part in enumerate(parts):
        by_lo.setdefault(part.params.lo, []).append(i)
    for lo, members in by_lo.items():
        hi_values = [weight.to(parts[i].hi.torch_dtype).float() for i in members]
        blocks = [parts[i].params.resolve_block(cols) for i in members]
        swept_from = _sweep(weight32.repeat(len(members), 1),
                            torch.cat([parts[i].mask for i in members]),
                            torch.cat(hi_values),
                            torch.cat([parts[i].scale.repeat_interleave(b, dim=1) for i, b in zip(members, blocks)]),
                            lo, hessian)
        for n, (i, block, hi_value) in enumerate(zip(members, blocks, hi_values)):
            part = parts[i]
            swept_bytes = quantize_lo(swept_from[n * rows:(n + 1) * rows], part.scale, block, lo)
            # The guard: per row, keep the sweep only where it lowers e^T H e.
            rtn_energy = part.row_energy(weight32, hi_value, part.lo_bytes, hessian)
            swept_energy = part.row_energy(weight32, hi_value, swept_bytes, hessian)
            better = swept_energy < rtn_energy
            out[i] = (torch.where(better.unsqueeze(1), swept_bytes, part.lo_bytes),
                      torch.where(better, swept_energy, rtn_energy))
    return out


def quantize_gptq(
    weight: torch.Tensor,
    params: QuantParams,
    hessian: torch.Tensor | PreparedHessian | None = None,
    *,
    act_sq: torch.Tensor | None = None,
    name: str | None = None,
) -> PackedTensor:
    """Quantize ``weight`` (2-D float) with ``params``: the gptq method needs ``hessian``
    (float32 ``[C, C]`` or a :class:`PreparedHessian`); the rtn method with a non-absmax
    scale rule rounds to nearest under the searched scales. ``act_sq`` (float32 ``[C]``)
    as for ``codec.quantize``. Raises :class:`UMQError` naming ``name`` and the rule."""
    weight = weight.detach().contiguous()
    try:
        if params.method is Method.RTN and params.scale_rule is ScaleRule.ABSMAX:
            return quantize(weight, params, act_sq=act_sq, name=name)
        with torch.no_grad():
            hessian = _checked_hessian(weight, params, hessian)
            part = _rounded_parts(weight, params, hessian, act_sq)
            lo_bytes = part.lo_bytes
            if params.method is Method.GPTQ and params.k < GROUP:
                lo_bytes = _error_feedback(weight, [part], hessian)[0][0]
            return assemble(weight, params, part.hi, part.mask, part.scale, lo_bytes)
    except UMQError as exc:
        raise exc.located(tensor=name)


def gptq_error_energies(
    weight: torch.Tensor,
    configurations: list[QuantParams],
    hessian: torch.Tensor | PreparedHessian,
    *,
    act_sq: torch.Tensor | None = None,
) -> list[float]:
    """``tr(E H E^T)`` (float64 sums) of each gptq configuration's result, ``E = W - Ŵ``
    with ``Ŵ`` what :func:`quantize_gptq` packs (the same bytes, tested), ``H`` undamped.
    The calibration search's cost model for gptq candidates; the sweeps of
    configurations sharing a lo format run stacked (:func:`_error_feedback`)."""
    weight = weight.detach().contiguous()
    with torch.no_grad():
        hessian = _checked_hessian(weight, next((p for p in configurations if p.method is Method.GPTQ), None), hessian)
        parts = [_rounded_parts(weight, p, hessian, act_sq) for p in configurations]
        swept = [i for i, p in enumerate(configurations) if p.method is Method.GPTQ and p.k < GROUP]
        energies: list[float] = []
        results = dict(zip(swept, _error_feedback(weight, [parts[i] for i in swept], hessian)))
        weight32 = weight.float()
        for i, part in enumerate(parts):
            if i in results:
                energies.append(float(results[i][1].sum()))
            else:
                hi_values = weight.to(part.hi.torch_dtype).float()
                energies.append(float(part.row_energy(weight32, hi_values, part.lo_bytes, hessian).sum()))
    return energies


def _checked_hessian(weight: torch.Tensor, params: QuantParams | None,
                     hessian: torch.Tensor | PreparedHessian | None) -> PreparedHessian | None:
    _check_source(weight)
    cols = weight.shape[1]
    if hessian is not None and not isinstance(hessian, PreparedHessian):
        hessian = prepare_hessian(hessian)
    if hessian is not None and tuple(hessian.hessian.shape) != (cols, cols):
        raise UMQError(f"the Hessian has shape {tuple(hessian.hessian.shape)}, expected ({cols}, {cols})",
                       rule="hessian")
    if params is not None and params.method is Method.GPTQ and hessian is None:
        raise UMQError("the gptq method needs the layer's Hessian (umq calibrate statistics)", rule="hessian")
    return hessian


def _decoded(lo_bytes, scale, block, lo, mask, hi_values) -> torch.Tensor:
    """float32 ``[R, C]``: what a reader decodes from these parts (FORMAT §4)."""
    rows, cols = lo_bytes.shape
    lo_values = decode_lo(lo_bytes, lo).view(rows, cols // block, block).mul_(scale.unsqueeze(-1))
    return torch.where(mask, hi_values, lo_values.view(rows, cols))
