"""Candidate evaluation: for one weight, every configuration of the candidate space with
its exact stored bits and its predicted activation-weighted output error (the error
model is described in :mod:`umqcli.calibrate`). Needs no model: a weight and, optionally,
its :class:`~umqcli.stats.ChannelStats`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .._fused import candidate_errors
from ..codec import FakeQuantizer, check_act_sq, dequantize, fake_quantize, use_fused
from ..errors import UMQError
from ..format import GROUP, LoFormat, Method, QuantParams, Selection
from ..pareto import pareto_front
from ..stats import ChannelStats


@dataclass(frozen=True)
class CandidateSpace:
    """The configurations tried for every tensor (the cross product, minus duplicates:
    k = 8 has no lo elements, k = 0 has no selection)."""

    ks: tuple[int, ...] = tuple(range(GROUP + 1))
    los: tuple[LoFormat, ...] = (LoFormat.FP8_E4M3, LoFormat.INT8)
    blocks: tuple[int, ...] = (0, 32, 128)
    selections: tuple[Selection, ...] = (Selection.MAGNITUDE, Selection.ACTIVATION)
    methods: tuple[Method, ...] = (Method.RTN,)

    @classmethod
    def parse(cls, text: str) -> "CandidateSpace":
        """``"k=0-4,lo=fp8_e4m3+int8,block=row+32,selection=magnitude+activation,method=rtn+gptq"``; keys
        left out keep their defaults. ``all`` for a key means every value."""
        space = cls()
        changes: dict[str, tuple] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, eq, value = part.partition("=")
            key = key.strip().lower()
            if not eq or not value:
                raise UMQError(f"candidate option {part!r} is not KEY=VALUES", rule="candidates")
            values = [v.strip() for v in value.split("+") if v.strip()]
            try:
                if key == "k":
                    ks: list[int] = []
                    for v in values:
                        a, dash, b = v.partition("-")
                        ks.extend(range(int(a), int(b) + 1) if dash else [int(a)])
                    bad = [k for k in ks if not 0 <= k <= GROUP]
                    if bad:
                        raise ValueError(f"k {bad} outside 0..8")
                    changes["ks"] = tuple(sorted(set(ks)))
                elif key == "lo":
                    changes["los"] = tuple(LoFormat) if values == ["all"] else tuple(LoFormat(v) for v in values)
                elif key == "block":
                    blocks = [0 if v == "row" else int(v) for v in values]
                    if any(b < 0 or b % GROUP for b in blocks):
                        raise ValueError("block must be 'row' or a multiple of 8")
                    changes["blocks"] = tuple(dict.fromkeys(blocks))
                elif key == "selection":
                    changes["selections"] = (tuple(Selection) if values == ["all"]
                                             else tuple(Selection(v) for v in values))
                elif key == "method":
                    changes["methods"] = tuple(Method) if values == ["all"] else tuple(Method(v) for v in values)
                else:
                    raise ValueError(f"unknown key {key!r} (k, lo, block, selection, method)")
            except ValueError as exc:
                raise UMQError(f"bad candidate option {part!r}: {exc}", rule="candidates") from None
        return cls(**{**space.__dict__, **changes})

    def params_for(self, columns: int, *, have_stats: bool, have_hessian: bool = False) -> list[QuantParams]:
        """Every distinct candidate for a tensor with ``columns`` columns. Blocks that do
        not divide ``columns`` are skipped; without statistics ``activation`` becomes
        ``error`` (the same rule with a_j = 1). ``gptq`` candidates only with the tensor's
        Hessian; ``saliency`` only with ``gptq`` (it needs the Hessian)."""
        out: list[QuantParams] = []
        for method in self.methods:
            if method is Method.GPTQ and not have_hessian:
                continue
            selections = [s for s in self.selections if s is not Selection.SALIENCY or method is Method.GPTQ]
            out += self._params_for(columns, selections, have_stats, method)
        return out

    def _params_for(self, columns: int, chosen: Sequence[Selection], have_stats: bool,
                    method: Method) -> list[QuantParams]:
        selections = []
        for s in chosen:
            s = Selection.ERROR if (s is Selection.ACTIVATION and not have_stats) else s
            if s not in selections:
                selections.append(s)
        blocks = [b for b in self.blocks if b == 0 or (b < columns and columns % b == 0)]
        out: list[QuantParams] = []
        seen = set()
        for k in self.ks:
            for lo in self.los:
                for block in blocks:
                    for s in selections:
                        if k == GROUP:
                            key = (k,)  # all hi: lo, block and selection change nothing but bits
                            lo_, block_, s_ = self.los[0], 0, Selection.MAGNITUDE
                        elif k == 0:
                            key = (k, lo, block)  # nothing to select
                            lo_, block_, s_ = lo, block, Selection.MAGNITUDE
                        else:
                            key = (k, lo, block, s)
                            lo_, block_, s_ = lo, block, s
                        if key not in seen:
                            seen.add(key)
                            out.append(QuantParams(k=k, lo=lo_, block=block_, selection=s_, method=method))
        return out


def reconstruct(weight: torch.Tensor, params: QuantParams, act_sq: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``[R, C]``: ``dequantize(quantize(weight, params), float32)``, the values the
    runtime multiplies with and ``umq verify`` measures (:func:`umqcli.codec.fake_quantize`)."""
    return fake_quantize(weight, params, act_sq=act_sq, dtype=torch.float32)


def weighted_error(weight: torch.Tensor, approx: torch.Tensor, act_sq: torch.Tensor) -> float:
    """``sum_j a_j ||W[:, j] - Ŵ[:, j]||^2 / sum_j a_j ||W[:, j]||^2`` (float64 sums)."""
    w = weight.double()
    a = act_sq.double()
    num = ((w - approx.double()).square().sum(0) * a).sum()
    den = (w.square().sum(0) * a).sum()
    return 0.0 if float(den) == 0.0 else float(num / den)


MIN_SAMPLE_ROWS = 16  # fewer real rows than this: keep the diagonal denominator
#: The predicted error as the recipe states it (docs/calibrate.md, "error model").
ERROR_METRIC = (
    "sqrt(sum_j E[x_j^2] ||W[:,j]-W_hat[:,j]||^2 / mean_s ||W x_s||^2), x_s the stored sample rows; "
    f"with fewer than {MIN_SAMPLE_ROWS} of them (or weights only) the denominator is "
    "sum_j E[x_j^2] ||W[:,j]||^2"
)


def output_energy_correction(weight: torch.Tensor, act_sq: torch.Tensor, sample: torch.Tensor | None) -> float:
    """``sum_j a_j ||W[:, j]||^2 / mean_s ||W x_s||^2``: turns the diagonal relative error
    into one relative to the real output energy.

    The quantization error adds up incoherently across input channels (independent
    rounding signs), so its energy is the diagonal ``sum_j a_j ||ΔW[:, j]||^2``. The output
    itself does not: inputs with a common mean (GELU outputs are mostly positive) add up
    coherently, and ``E||Wx||^2`` can be many times the diagonal sum. The real output
    energy is measured once per tensor on the stored sample rows (float ``[S, C]``); 1.0
    without a sample (weights only) or with fewer than 16 rows.
    """
    if sample is None or sample.shape[0] < MIN_SAMPLE_ROWS:
        return 1.0
    w = weight.double()
    diagonal = float((w.square().sum(0) * act_sq.double()).sum())
    real = float((sample.double() @ w.T).square().sum()) / sample.shape[0]
    return 1.0 if real <= 0.0 or diagonal <= 0.0 else diagonal / real


def output_error(weight: torch.Tensor, approx: torch.Tensor, rows: torch.Tensor) -> float:
    """Relative output error measured on real input rows ``X [S, C]``:
    ``||X (W - Ŵ)^T||^2 / ||X W^T||^2``."""
    x = rows.double()
    w = weight.double()
    den = (x @ w.T).square().sum()
    num = (x @ (w - approx.double()).T).square().sum()
    return 0.0 if float(den) == 0.0 else float(num / den)


# =========================================================================== search


@dataclass(frozen=True)
class Candidate:
    """One configuration of one tensor: ``bits`` stored per element (payload + mask +
    scale) and ``error``, the predicted relative output error *energy*
    ``E||(W-Ŵ)x||^2 / E||Wx||^2`` (squared errors add up across tensors, so the
    allocation works with this); ``rel_error`` is its square root, the
    ``||Y - Y_ref|| / ||Y_ref||`` that ``umq verify`` measures."""

    params: QuantParams
    bits: float
    error: float

    @property
    def rel_error(self) -> float:
        return math.sqrt(self.error)


@dataclass
class TensorChoice:
    """The search's record for one tensor: every candidate, the hull, and the pick."""

    name: str
    shape: tuple[int, int]
    candidates: list[Candidate]
    hull: list[Candidate]
    chosen: Candidate | None = None
    reason: str = ""
    outlier_channels: int = 0
    act_peak_ratio: float = 1.0  # max_j a_j / mean_j a_j: how uneven the input channels are

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def _row_subset(rows: int, max_rows: int) -> torch.Tensor:
    if max_rows <= 0 or rows <= max_rows:
        return torch.arange(rows)
    return torch.linspace(0, rows - 1, max_rows).round().long().unique()


def candidate_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no other one beats on both bits and error, cheapest first."""
    return pareto_front(candidates, bits=lambda c: c.bits, error=lambda c: c.error)


def lower_hull(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The lower-left convex hull of (bits, error): the candidates a Lagrangian allocation
    can pick, cheapest first, each strictly more accurate than the one before."""
    hull: list[Candidate] = []
    for c in candidate_front(candidates):
        if hull and (c.bits, c.error) == (hull[-1].bits, hull[-1].error):
            continue  # an identical point adds nothing to the hull
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a-c: drop it (slopes must increase along the hull).
            if (b.error - a.error) * (c.bits - a.bits) >= (c.error - a.error) * (b.bits - a.bits):
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


def _reference_numerator(evaluator: FakeQuantizer, act_sq: torch.Tensor, params: QuantParams) -> float:
    """``sum_j a_j ||W[:, j] - Ŵ[:, j]||^2`` from the codec's values (float64)."""
    approx = evaluator.values(params, dtype=torch.float32)
    return float(((evaluator.weight32.double() - approx.double()).square().sum(0) * act_sq.double()).sum())


def _fused_errors_possible(evaluator: FakeQuantizer, fused: bool | None) -> bool:
    """The fused pass needs one hi format for every mask (else: the reference) and,
    unless forced, a weight large enough to be worth it (the codec's own rule)."""
    if evaluator.uniform_hi() is None:
        return False
    return use_fused(fused, evaluator.weight.device, evaluator.weight.numel())


def _fused_numerators(evaluator: FakeQuantizer, act_sq: torch.Tensor, batch: Sequence[QuantParams],
                      threads: int | None) -> list[float]:
    hi = evaluator.uniform_hi()
    hi32 = evaluator.hi_values(hi, torch.float32)
    cols = evaluator.weight.shape[1]
    for params in batch:
        if params.selection is Selection.ACTIVATION:
            check_act_sq(act_sq, cols)
    keys = [(p.k, p.resolve_block(cols), p.lo, p.selection.value) for p in batch]
    return candidate_errors(evaluator.weight32, hi32, act_sq, keys, threads=threads).tolist()


def evaluate_tensor(
    name: str,
    weight: torch.Tensor,
    stats: ChannelStats | None,
    space: CandidateSpace,
    *,
    max_rows: int = 0,
    refine: int = 2,
    fused: bool | None = None,
    fused_threads: int | None = None,
) -> TensorChoice:
    """Predict error and bits of the candidates for one ``[R, C]`` weight.

    Rows are quantized independently (scales, groups and selection never cross a row),
    so ``max_rows > 0`` estimates the error on that many evenly spaced rows. The default
    (0) uses every row: on MiniLM's FFN down-projections a few output rows with outlier
    weights dominate the error, and a 96-row subset misjudged it by up to 10x.

    Pruning: the magnitude selection is cheap (one mask per k serves every lo and block),
    the error/activation selections cost several codec passes each. So every candidate is
    first evaluated with magnitude selection; then, for each k, only the ``refine``
    (lo, block) pairs with the lowest magnitude error are re-evaluated with the other
    selections (``refine <= 0``: all of them). At equal bits those selections are never
    worse than magnitude (``codec.select_error``), so this only decides how far to look.

    ``fused``: None (default) computes the errors in the fused numba pass
    (:func:`umqcli._fused.candidate_errors`) for CPU weights of at least
    ``codec.FUSED_MIN_ELEMENTS`` elements when numba is installed; False always with the
    reference (:class:`~umqcli.codec.FakeQuantizer` values and a float64 sum); True
    forces the fused pass (on ``fused_threads`` threads; default: torch's count). Both predict the same errors: to ~1e-15 for magnitude, and
    for error/activation up to a tie in float32 between two masks of one block (tested).
    """
    rows, cols = weight.shape
    act_sq = stats.act_sq.float() if stats is not None else torch.ones(cols)
    subset = weight[_row_subset(rows, max_rows)]
    evaluator = FakeQuantizer(subset, act_sq)
    # gptq candidates come later, around the rtn allocation (evaluate_gptq).
    all_params = [p for p in space.params_for(cols, have_stats=stats is not None) if p.method is Method.RTN]
    candidates: list[Candidate] = []
    energy_fix = output_energy_correction(subset, act_sq, None if stats is None else stats.sample)
    w = subset.double()
    denominator = float((w.square().sum(0) * act_sq.double()).sum())
    use_fused_pass = _fused_errors_possible(evaluator, fused)

    def run(batch: Sequence[QuantParams]) -> list[Candidate]:
        if use_fused_pass and all(p.hi is None for p in batch):
            numerators = _fused_numerators(evaluator, act_sq, batch, fused_threads)
        else:
            numerators = [_reference_numerator(evaluator, act_sq, params) for params in batch]
        out = [Candidate(p, p.bits_per_element(cols), 0.0 if denominator == 0.0 else n / denominator * energy_fix)
               for p, n in zip(batch, numerators)]
        candidates.extend(out)
        return out

    magnitude = [p for p in all_params if p.selection is Selection.MAGNITUDE]
    by_k: dict[int, list[Candidate]] = {}
    for cand in run(magnitude):
        by_k.setdefault(cand.params.k, []).append(cand)
    magnitude_keys = {(p.k, p.lo, p.block) for p in magnitude}
    others = []
    for params in all_params:
        if params.selection is Selection.MAGNITUDE:
            continue
        key = (params.k, params.lo, params.block)
        if refine > 0 and key in magnitude_keys:
            best = sorted(by_k[params.k], key=lambda c: c.error)[:refine]
            if key not in {(c.params.k, c.params.lo, c.params.block) for c in best}:
                continue
        others.append(params)
    run(others)
    mean = float(act_sq.mean())
    return TensorChoice(
        name=name,
        shape=(rows, cols),
        candidates=candidates,
        hull=lower_hull(candidates),
        outlier_channels=stats.outlier_channels if stats is not None else 0,
        act_peak_ratio=float(act_sq.max()) / mean if mean > 0 else 1.0,
    )


def gptq_configurations(choice: TensorChoice, space: CandidateSpace) -> list[QuantParams]:
    """The gptq candidates worth a sweep for a tensor whose rtn candidates are allocated
    (``choice.chosen`` set): the keys (k, lo, block) of the chosen candidate and of its
    two neighbours on the tensor's rtn front (one cheaper, one dearer), each with the
    ``saliency`` selection when the space offers it (the GPTQ/SpQR criterion, which won
    on MiniLM, docs/gptq.md), else with the key's best rtn selection. Every other key
    would need the allocation to move further than error feedback's common gain moves
    it; a sweep per candidate of the full space costs far more than the rest of the
    search (docs/gptq.md, "cost")."""
    if Method.GPTQ not in space.methods or choice.chosen is None:
        return []
    front = candidate_front([c for c in choice.candidates if c.params.method is Method.RTN])
    at = next((i for i, c in enumerate(front) if c is choice.chosen), None)
    if at is None:  # the chosen one is off the rtn front (a gptq candidate): nothing new
        return []
    out: list[QuantParams] = []
    for c in front[max(at - 1, 0):at + 2]:
        p = c.params
        if p.k == GROUP:
            continue  # no lo element to feed errors into
        selection = p.selection
        if Selection.SALIENCY in space.selections and p.k > 0:
            selection = Selection.SALIENCY
        gptq = p.with_(method=Method.GPTQ, selection=selection)
        if gptq not in out:
            out.append(gptq)
    return out


GPTQ_SEARCH_ROWS = 256  # rows a gptq candidate's gain is measured on (evenly spaced)


def evaluate_gptq(choice: TensorChoice, weight: torch.Tensor, stats: ChannelStats, space: CandidateSpace, *,
                  max_rows: int = 0, prepared=None) -> None:
    """Add ``choice``'s gptq candidates (:func:`gptq_configurations`) with their errors.

    A gptq candidate's predicted error is that of the key's best rtn candidate (same k,
    lo, block; the model of :mod:`umqcli.calibrate`, every row) times the gain of error
    feedback, ``tr(E H E^T)`` of the gptq result over that of the rtn one, both measured
    with H on up to ``GPTQ_SEARCH_ROWS`` evenly spaced rows. With H, not its diagonal:
    error feedback correlates the errors of one row on purpose (they cancel through H's
    off-diagonal terms). As a gain on the rtn prediction it stays comparable with the rtn
    candidates, and the sweep runs on a fraction of the rows of the large layers.
    ``prepared``: ``gptq.prepare_hessian(stats.hessian)`` if already made (layers reading
    one input share it)."""
    from ..gptq import gptq_error_energies, prepare_hessian

    configurations = gptq_configurations(choice, space)
    if not configurations or stats is None or stats.hessian is None:
        return
    rows, cols = weight.shape
    limit = GPTQ_SEARCH_ROWS if max_rows <= 0 else min(max_rows, GPTQ_SEARCH_ROWS)
    subset = weight[_row_subset(rows, limit)]
    prepared = prepared if prepared is not None else prepare_hessian(stats.hessian)
    references = []
    for p in configurations:
        same_key = [c for c in choice.candidates if c.params.method is Method.RTN
                    and (c.params.k, c.params.lo, c.params.block) == (p.k, p.lo, p.block)]
        references.append(min(same_key, key=lambda c: c.error))
    energies = gptq_error_energies(subset, configurations + [r.params for r in references], prepared,
                                   act_sq=stats.act_sq.float())
    n = len(configurations)
    for p, reference, gptq_energy, rtn_energy in zip(configurations, references, energies[:n], energies[n:]):
        gain = 1.0 if rtn_energy <= 0.0 else max(gptq_energy, 0.0) / rtn_energy
        choice.candidates.append(Candidate(p, p.bits_per_element(cols), reference.error * gain))
    choice.hull = lower_hull(choice.candidates)
