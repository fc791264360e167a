"""Quality per bit: UMQ configurations against the seed baselines, on one checkpoint.

For every selected weight ``W`` (``[R, C]``, 2-D float, ``C % 8 == 0``) and every format
``F`` (a UMQ configuration or a :mod:`~umqcli.baselines` entry) this measures

- ``bits``: everything ``F`` stores per element of ``W`` (payload, masks, scales, zero
  points, outlier columns and their indices), counted for the full tensor;
- ``rel_error``: the relative Frobenius error of the layer output,
  ``||X (W - Ŵ)^T||_F / ||X W^T||_F``, and ``sqnr_db = -20 log10(rel_error)``, on input rows
  ``X``: real activation rows from a stats file (``umq calibrate``), or seeded standard
  Gaussian rows (for which the expected value is the weight's own relative error);
- ``weight_error``: ``||W - Ŵ||_F / ||W||_F``.

Aggregates over tensors weight each tensor by its element count: bits are
``sum(n_t bits_t) / sum(n_t)``, errors are ``sqrt(sum(n_t e_t^2) / sum(n_t))``.

Cost control (the reason this is not a loop over ``codec.quantize``): UMQ values come
from :class:`codec.FakeQuantizer`, equal to ``dequantize(quantize(...), float32)`` without
byte interleaving or CRCs, one per weight so that what does not depend on the lo format
or block is shared (float32 weight, magnitude masks, hi values); ``X W^T`` is
computed once per weight; and ``workers`` weights are measured at once with one torch
thread each (the ops are small, and OpenMP barriers stall badly on a shared machine).
For very large checkpoints ``weight_rows`` measures a seeded sample of output rows per
weight, exact for row-local formats (all but FP8 128x128 tiles and double-quantized NF4,
which are computed whole and then sampled); it is off by default because rare rows with
large outliers dominate the error of per-row formats and a sample misses them.

Nothing here prints; progress goes through ``progress(stage, done, total)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from . import codec
from .baselines import BASELINES, Baseline
from ._fused import torch_threads
from ._optional import require
from .errors import UMQError
from .format import LoFormat, Method, QuantParams, Selection
from .pareto import pareto_front
from .progress import ProgressFn, no_progress
from .stats import OUTLIER_THRESHOLD

UMQ_KS = (0, 1, 2, 4)
UMQ_LOS = (LoFormat.FP8_E4M3, LoFormat.FP8_E5M2, LoFormat.INT8)
UMQ_BLOCKS = (0, 32)  # 0: one scale per row
UMQ_SELECTIONS = (Selection.MAGNITUDE, Selection.ERROR, Selection.ACTIVATION)
_SEL_SHORT = {Selection.MAGNITUDE: "mag", Selection.ERROR: "err", Selection.ACTIVATION: "act",
              Selection.SALIENCY: "sal"}
# With Hessians in the statistics: plain GPTQ (k = 0, what UMQ's hi slots add on top of)
# and k = 1 with the saliency selection, for each lo format, one scale per row.
GPTQ_CONFIGS = tuple(QuantParams(k=k, lo=lo, selection=Selection.SALIENCY if k else Selection.MAGNITUDE,
                                 method=Method.GPTQ)
                     for k in (0, 1) for lo in (LoFormat.INT8, LoFormat.FP8_E4M3))


# --------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class Format:
    """One compared format: a UMQ configuration (``params``) or a baseline."""

    name: str
    kind: str  # "umq" or "baseline"
    family: str
    params: QuantParams | None = None
    baseline: Baseline | None = None

    def to_json(self) -> dict[str, Any]:
        if self.params is not None:
            detail = self.params.to_json()
            detail.pop("hi", None)
            detail.pop("scale_rule", None)
            if self.params.method is Method.RTN:
                detail.pop("method", None)
        else:
            assert self.baseline is not None
            detail = {"library": self.baseline.library, **self.baseline.params}
        return {"name": self.name, "kind": self.kind, "family": self.family, "params": detail}

    def fake_quantize(
        self, weight: torch.Tensor, *, act_sq: torch.Tensor | None = None, act_absmax: torch.Tensor | None = None
    ) -> torch.Tensor:
        """float32 ``[R, C]``: ``weight`` as this format decodes it, for a dense stand-in
        model. UMQ: ``dequantize(quantize(...))`` decoded to float32, the values a
        ``UMQLinear`` multiplies by (decoding to a bfloat16 source's dtype would round the
        lo values once more)."""
        if self.params is not None:
            return codec.fake_quantize(weight, self.params, act_sq=act_sq, dtype=torch.float32)
        assert self.baseline is not None
        return self.baseline.quantize_dequantize(weight, act_absmax).float()


def umq_name(params: QuantParams) -> str:
    """``umq-k1-fp8_e4m3-row-mag``: k, lo, block (``row`` or ``b32``), selection, and
    ``-gptq`` for the gptq method."""
    block = "row" if params.block == 0 else f"b{params.block}"
    method = "" if params.method is Method.RTN else f"-{params.method.value}"
    return f"umq-k{params.k}-{params.lo.value}-{block}-{_SEL_SHORT[params.selection]}{method}"


def umq_configs(with_activations: bool) -> list[QuantParams]:
    """The UMQ grid: k in {0, 1, 2, 4} x lo x block {row, 32} x selection. ``k = 0`` has
    nothing to select, so it appears once per lo and block (as magnitude); ``activation``
    only with activation statistics."""
    selections = [s for s in UMQ_SELECTIONS if with_activations or s is not Selection.ACTIVATION]
    out = []
    for k in UMQ_KS:
        for lo in UMQ_LOS:
            for block in UMQ_BLOCKS:
                for selection in selections if k else (Selection.MAGNITUDE,):
                    out.append(QuantParams(k=k, lo=lo, block=block, selection=selection))
    return out


def default_formats(with_activations: bool, with_hessians: bool = False) -> list[Format]:
    """The UMQ grid, the gptq configurations when the statistics hold Hessians (family
    ``gptq k=K``), and every baseline."""
    formats = [
        Format(umq_name(p), "umq", f"umq k={p.k}", params=p) for p in umq_configs(with_activations)
    ]
    if with_hessians:
        formats += [Format(umq_name(p), "umq", f"gptq k={p.k}", params=p) for p in GPTQ_CONFIGS]
    formats += [Format(b.name, "baseline", b.family, baseline=b) for b in BASELINES.values()]
    return formats


# --------------------------------------------------------------------------- results


@dataclass
class TensorMeasurement:
    """What one format does to one tensor: stored bits per element, relative output
    error and relative weight error."""

    bits: float
    rel_error: float
    weight_error: float

    @property
    def sqnr_db(self) -> float:
        return _sqnr_db(self.rel_error)


@dataclass
class FormatResult:
    """A format over all selected tensors; ``bits``/``rel_error`` are the aggregates
    (``None`` when the format does not apply to every tensor: see ``note``)."""

    format: Format
    per_tensor: dict[str, TensorMeasurement] = field(default_factory=dict)
    bits: float | None = None
    rel_error: float | None = None
    weight_error: float | None = None
    pareto: bool = False
    note: str = ""
    perplexity: float | None = None  # of the model with every compared weight in this format

    @property
    def name(self) -> str:
        return self.format.name

    @property
    def sqnr_db(self) -> float | None:
        return None if self.rel_error is None else _sqnr_db(self.rel_error)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.format.to_json(),
            "bits": self.bits,
            "rel_error": self.rel_error,
            "sqnr_db": self.sqnr_db,
            "weight_error": self.weight_error,
            "pareto": self.pareto,
            "note": self.note,
            "perplexity": self.perplexity,
            "per_tensor": {
                name: {
                    "bits": r.bits,
                    "rel_error": r.rel_error,
                    "sqnr_db": r.sqnr_db,
                    "weight_error": r.weight_error,
                }
                for name, r in self.per_tensor.items()
            },
        }


@dataclass(frozen=True)
class Budget:
    """At most ``bits`` per element: the most accurate UMQ config and baseline that fit."""

    bits: float
    best_umq: str | None
    best_umq_error: float | None
    best_baseline: str | None
    best_baseline_error: float | None
    best_umq_bits: float | None = None
    best_baseline_bits: float | None = None

    @property
    def winner(self) -> str | None:
        """The more accurate of the two; within ``PARETO_RTOL`` the cheaper one."""
        if self.best_umq is None or self.best_baseline is None:
            return self.best_umq or self.best_baseline
        u, b = self.best_umq_error, self.best_baseline_error
        if u * (1 + PARETO_RTOL) < b:
            return self.best_umq
        if b * (1 + PARETO_RTOL) < u:
            return self.best_baseline
        return self.best_umq if self.best_umq_bits < self.best_baseline_bits else self.best_baseline

    def to_json(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "best_umq": self.best_umq,
            "best_umq_rel_error": self.best_umq_error,
            "best_umq_bits": self.best_umq_bits,
            "best_baseline": self.best_baseline,
            "best_baseline_rel_error": self.best_baseline_error,
            "best_baseline_bits": self.best_baseline_bits,
            "winner": self.winner,
        }


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, int]
    dtype: str
    weight_rows: int  # output rows the errors were measured on
    x_rows: int  # input rows X
    outlier_columns: int | None = None  # input channels with activation absmax > 6

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "weight_rows": self.weight_rows,
            "x_rows": self.x_rows,
            "outlier_columns": self.outlier_columns,
        }


@dataclass
class CompareReport:
    source: str
    activations: str | None
    inputs: str  # "activations" or "gaussian"
    seed: int
    tensors: list[TensorInfo]
    formats: list[FormatResult]  # sorted by aggregate bits
    budgets: list[Budget]
    skipped_tensors: dict[str, str]
    skipped_formats: dict[str, str]
    seconds: float = 0.0
    # Of the unquantized model, when measured (add_perplexity): {reference, text, tokens, window}.
    perplexity: dict[str, Any] | None = None

    @property
    def elements(self) -> int:
        return sum(t.shape[0] * t.shape[1] for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "activations": self.activations,
            "inputs": self.inputs,
            "seed": self.seed,
            "elements": self.elements,
            "seconds": self.seconds,
            "tensors": [t.to_json() for t in self.tensors],
            "formats": [f.to_json() for f in self.formats],
            "budgets": [b.to_json() for b in self.budgets],
            "skipped_tensors": self.skipped_tensors,
            "skipped_formats": self.skipped_formats,
            "perplexity": self.perplexity,
        }


def _sqnr_db(rel_error: float) -> float:
    return math.inf if rel_error == 0 else -20.0 * math.log10(rel_error)


# --------------------------------------------------------------------------- measuring


def relative_output_error(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    """``||x (approx - weight)^T||_F / ||y||_F`` with ``y = x weight^T`` precomputed.

    ``x`` float32 ``[N, C]``, ``y`` float32 ``[N, R]``, ``weight``/``approx`` float32 ``[R, C]``.
    The difference is formed before the matmul, so the result does not suffer from
    cancellation between two large products.
    """
    denominator = torch.linalg.vector_norm(y.double())
    numerator = torch.linalg.vector_norm((x @ (approx - weight).T).double())
    return 0.0 if float(denominator) == 0 else float(numerator / denominator)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` (float32 tensors; torch's reductions sum pairwise)."""
    denominator = torch.linalg.vector_norm(b)
    numerator = torch.linalg.vector_norm(a - b)
    return 0.0 if float(denominator) == 0 else float(numerator / denominator)


def sample_rows(rows: int, count: int, seed: int, name: str) -> torch.Tensor:
    """int64 sorted indices of ``count`` distinct output rows out of ``rows`` (all when
    ``count <= 0`` or ``count >= rows``), seeded by ``(seed, name)``."""
    if count <= 0 or count >= rows:
        return torch.arange(rows)
    import zlib

    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randperm(rows, generator=generator)[:count].sort().values


def gaussian_inputs(rows: int, columns: int, seed: int) -> torch.Tensor:
    """float32 ``[rows, columns]`` standard Gaussian rows, the same for every tensor with
    ``columns`` input channels."""
    generator = torch.Generator().manual_seed(seed * 7919 + columns)
    return torch.randn(rows, columns, generator=generator)


def measure_tensor(
    name: str,
    weight: torch.Tensor,
    formats: Sequence[Format],
    x: torch.Tensor,
    *,
    act_sq: torch.Tensor | None = None,
    act_absmax: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    weight_rows: int = 0,
    seed: int = 0,
) -> tuple[dict[str, TensorMeasurement], dict[str, str], int]:
    """Measure every format on one weight.

    ``weight``: float ``[R, C]``; ``x``: float32 ``[N, C]`` input rows; ``act_sq`` /
    ``act_absmax``: float32 ``[C]`` or ``None``; ``hessian``: float32 ``[C, C]`` (the gptq
    configurations need it) or ``None``. Returns (results by format name, reasons
    for formats that do not apply to this tensor, number of output rows measured).
    """
    rows, cols = weight.shape
    if not bool(torch.isfinite(weight).all()):
        raise UMQError("the weight holds NaN or infinite values", rule="finite", tensor=name)
    index = sample_rows(rows, weight_rows, seed, name)
    sampled = weight.index_select(0, index) if index.numel() < rows else weight
    reference = sampled.float()
    y = x @ reference.T
    umq = codec.FakeQuantizer(sampled, act_sq)  # shares per-weight work across the UMQ configs
    prepared = None  # the factored Hessian, made for the first gptq configuration
    results: dict[str, TensorMeasurement] = {}
    skipped: dict[str, str] = {}
    for fmt in formats:
        if fmt.params is not None:
            params = fmt.params
            if cols % (params.block or cols):
                skipped[fmt.name] = f"block {params.block} does not divide {cols} columns"
                continue
            if params.method is Method.GPTQ:
                if hessian is None:
                    skipped[fmt.name] = "needs the input Hessian (statistics from umq calibrate --hessian)"
                    continue
                from .gptq import prepare_hessian, quantize_gptq

                if prepared is None:
                    prepared = prepare_hessian(hessian)
                approx = codec.dequantize(quantize_gptq(sampled, params, prepared, act_sq=act_sq), torch.float32)
            else:
                approx = umq.values(params, dtype=torch.float32)
            bits = params.bits_per_element(cols)
        else:
            baseline = fmt.baseline
            assert baseline is not None
            if baseline.needs_activations and act_absmax is None:
                skipped[fmt.name] = "needs activation statistics (--activations)"
                continue
            reason = baseline.unsupported((rows, cols))
            if reason:
                skipped[fmt.name] = reason
                continue
            if baseline.row_local((rows, cols)) or index.numel() == rows:
                approx = baseline.quantize_dequantize(sampled, act_absmax)
            else:
                approx = baseline.quantize_dequantize(weight, act_absmax).index_select(0, index)
            bits = baseline.bits_per_element((rows, cols), act_absmax)
        results[fmt.name] = TensorMeasurement(
            bits=bits,
            rel_error=relative_output_error(x, y, reference, approx),
            weight_error=_relative(approx, reference),
        )
    return results, skipped, int(index.numel())


# --------------------------------------------------------------------------- aggregation


#: A format that costs more bits counts as better only when its error is lower by more
#: than this fraction: UMQ k=0 with a row scale and INT8 per channel decode to the same
#: values up to last-bit rounding of the scale (divide vs multiply), for example.
PARETO_RTOL = 1e-3


def _bits(result: FormatResult) -> float:
    return result.bits


def _rel_error(result: FormatResult) -> float:
    return result.rel_error


def budgets(results: Sequence[FormatResult]) -> list[Budget]:
    """Budget lines at each level of stored bits: formats are grouped by the integer part
    of their bits (4.x: INT4/NF4, 8.x: FP8/MXFP8/INT8, 9.x..14.x: the UMQ levels; 16-bit
    references left out) and each group's most expensive member sets the budget. Each
    line names the most accurate UMQ config and baseline that fit under it."""
    usable = [r for r in results if r.bits is not None and r.format.family != "16-bit"]
    levels: dict[int, float] = {}
    for r in usable:
        level = math.floor(r.bits)
        levels[level] = max(levels.get(level, 0.0), r.bits)
    out = []
    for bits in sorted(levels.values()):
        fit = [r for r in usable if r.bits <= bits + 1e-9]
        umq = min((r for r in fit if r.format.kind == "umq"), key=lambda r: r.rel_error, default=None)
        base = min((r for r in fit if r.format.kind == "baseline"), key=lambda r: r.rel_error, default=None)
        out.append(
            Budget(
                bits=bits,
                best_umq=umq.name if umq else None,
                best_umq_error=umq.rel_error if umq else None,
                best_baseline=base.name if base else None,
                best_baseline_error=base.rel_error if base else None,
                best_umq_bits=umq.bits if umq else None,
                best_baseline_bits=base.bits if base else None,
            )
        )
    return out


def aggregate(results: Sequence[FormatResult], tensors: Sequence[TensorInfo]) -> None:
    """Fill each result's aggregate bits/errors (element-count weighted) and Pareto flag."""
    numel = {t.name: t.shape[0] * t.shape[1] for t in tensors}
    total = sum(numel.values())
    for r in results:
        missing = [t.name for t in tensors if t.name not in r.per_tensor]
        if missing:
            if not r.note:
                r.note = f"does not apply to {len(missing)} of {len(tensors)} tensors (e.g. {missing[0]})"
            continue
        r.bits = sum(numel[n] * t.bits for n, t in r.per_tensor.items()) / total
        r.rel_error = math.sqrt(sum(numel[n] * t.rel_error**2 for n, t in r.per_tensor.items()) / total)
        r.weight_error = math.sqrt(sum(numel[n] * t.weight_error**2 for n, t in r.per_tensor.items()) / total)
    front = pareto_front((r for r in results if r.bits is not None), bits=_bits, error=_rel_error, rtol=PARETO_RTOL)
    for r in results:
        r.pareto = any(r is f for f in front)


# --------------------------------------------------------------------------- the command body


def select_tensors(checkpoint, patterns: Sequence[str], with_stats: Mapping[str, Any] | None) -> tuple[list[str], dict[str, str]]:
    """Names to compare, and reasons for the matched-but-unusable ones.

    With ``patterns`` (globs, or regexes after ``re:``): every matching tensor, each of
    which must be quantizable (else it is listed as skipped). Without: every quantizable
    tensor except the default exclusions of :mod:`umqcli.plan` (embedding tables,
    ``lm_head``), restricted to tensors with statistics when ``with_stats`` is given.
    """
    from .plan import DEFAULT_EXCLUSIONS, Pattern, quantizable

    compiled = [Pattern(p) for p in patterns]
    excluded = [Pattern(p) for p in DEFAULT_EXCLUSIONS]
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for name in checkpoint.names():
        if compiled:
            if not any(p.matches(name) for p in compiled):
                continue
        elif any(p.matches(name) for p in excluded):
            continue
        entry = checkpoint.entry(name)
        reason = quantizable(entry)
        if reason is not None:
            # Only 2-D matrices are worth a note: vectors (biases, norms) never quantize.
            if compiled and len(entry.shape) == 2:
                skipped[name] = reason
            continue
        if with_stats is not None and name not in with_stats:
            if compiled:
                raise UMQError(
                    "no activation statistics for this tensor in the stats file",
                    hint="compare it without activations, or leave it out of the tensor patterns",
                    rule="activation-stats",
                    tensor=name,
                )
            skipped[name] = "no activation statistics"
            continue
        chosen.append(name)
    if not chosen:
        what = f"matching {', '.join(patterns)}" if patterns else "(2-D float, columns % 8 == 0)"
        raise UMQError(f"no tensor to compare {what}", rule="no-tensors", file=checkpoint.path)
    return chosen, skipped


def _tensor_inputs(
    name: str,
    columns: int,
    stats: Mapping[str, Any] | None,
    activations: str | Path | None,
    x_rows: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(X float32 ``[N, C]``, act_sq ``[C]`` or None, act absmax ``[C]`` or None)."""
    if stats is None:
        return gaussian_inputs(x_rows, columns, seed), None, None
    entry = stats[name]
    if entry.channels != columns:
        raise UMQError(
            f"statistics cover {entry.channels} input channels, the weight has {columns}",
            rule="activation-stats", file=activations, tensor=name,
        )
    if entry.sample.shape[0] == 0:
        raise UMQError(
            "the stats file holds no sample rows for this tensor (re-run umq calibrate)",
            rule="activation-stats", file=activations, tensor=name,
        )
    x = entry.sample[:x_rows] if x_rows > 0 else entry.sample
    return x.float().contiguous(), entry.act_sq.float(), entry.absmax.float()


def compare_checkpoint(
    src: str | Path,
    *,
    activations: str | Path | None = None,
    patterns: Sequence[str] = (),
    x_rows: int = 256,
    weight_rows: int = 0,
    seed: int = 0,
    formats: Sequence[Format] | None = None,
    workers: int = 2,
    progress: ProgressFn = no_progress,
) -> CompareReport:
    """Compare UMQ configurations with the baselines on the weights of ``src``.

    ``activations``: a stats file of ``umq calibrate`` (``umqcli.stats``): its ``sample``
    rows are the inputs ``X`` (at most ``x_rows`` of them), its ``act_sq`` drives the
    ``activation`` selection and its ``absmax`` LLM.int8's outlier columns. Without it,
    ``X`` is ``x_rows`` seeded Gaussian rows. ``weight_rows``: output rows sampled per
    tensor (0: all; sampling is faster but misses rare rows with outliers, which
    dominate the error of per-row formats). ``workers`` tensors are measured at once,
    each with one torch thread (the ops are small: one thread per tensor avoids OpenMP
    barrier stalls on a busy machine); the previous thread count is restored.

    Raises :class:`UMQError` for unreadable inputs, stats that do not fit the weights, or
    an empty selection.
    """
    import time

    from .io import open_checkpoint

    started = time.perf_counter()
    stats = None
    if activations is not None:
        from .stats import load_stats

        stats = load_stats(activations)
    if formats is None:
        formats = default_formats(with_activations=stats is not None,
                                  with_hessians=stats is not None and any(s.hessian is not None for s in stats.values()))
    if any(f.baseline is not None and f.baseline.library == "bitsandbytes" for f in formats):
        from .baselines import bitsandbytes_functional

        bitsandbytes_functional()  # import once here, not racing in the worker threads

    with open_checkpoint(src) as checkpoint:
        names, skipped_tensors = select_tensors(checkpoint, patterns, stats)

        def measure(name: str) -> TensorOutcome:
            return _measure_named(checkpoint, name, formats, stats, activations, src=src, x_rows=x_rows,
                                  weight_rows=weight_rows, seed=seed)

        # Largest weights first, so that no big one is left running alone at the end.
        numel = {n: math.prod(checkpoint.info(n)[1]) for n in names}
        outcomes = _run_in_threads(measure, sorted(names, key=lambda n: -numel[n]), workers, progress)
    tensors = [outcomes[n][0] for n in names]  # the report keeps the checkpoint's order
    results, skipped_formats = _format_results(formats, [outcomes[n] for n in names])
    aggregate(results, tensors)
    present = [r for r in results if r.per_tensor]
    present.sort(key=lambda r: (r.bits if r.bits is not None else math.inf, r.rel_error or 0.0))
    return CompareReport(
        source=str(src),
        activations=None if activations is None else str(activations),
        inputs="activations" if stats is not None else "gaussian",
        seed=seed,
        tensors=tensors,
        formats=present,
        budgets=budgets(present),
        skipped_tensors=skipped_tensors,
        skipped_formats=skipped_formats,
        seconds=time.perf_counter() - started,
    )


#: One tensor's outcome: its description, a measurement per format, and the formats that
#: do not apply to it (name -> reason).
TensorOutcome = tuple[TensorInfo, dict[str, TensorMeasurement], dict[str, str]]


def _measure_named(checkpoint, name: str, formats: Sequence[Format], stats: Mapping[str, Any] | None,
                   activations: str | Path | None, *, src: str | Path, x_rows: int, weight_rows: int,
                   seed: int) -> TensorOutcome:
    """Read one tensor, build its inputs and measure every format on it."""
    weight = checkpoint.get(name)
    x, act_sq, act_absmax = _tensor_inputs(name, weight.shape[1], stats, activations, x_rows, seed)
    try:
        measured, skipped, used_rows = measure_tensor(
            name, weight, formats, x, act_sq=act_sq, act_absmax=act_absmax,
            hessian=None if stats is None else stats[name].hessian, weight_rows=weight_rows, seed=seed,
        )
    except UMQError as exc:
        raise exc.located(file=src, tensor=name)
    info = TensorInfo(
        name=name,
        shape=tuple(weight.shape),
        dtype=str(weight.dtype).replace("torch.", ""),
        weight_rows=used_rows,
        x_rows=int(x.shape[0]),
        outlier_columns=None if act_absmax is None else int((act_absmax > OUTLIER_THRESHOLD).sum()),
    )
    return info, measured, skipped


def _run_in_threads(measure: Callable[[str], TensorOutcome], names: Sequence[str], workers: int,
                    progress: ProgressFn) -> dict[str, TensorOutcome]:
    """``measure`` each name on ``workers`` threads, one torch thread each (restored
    afterwards), reporting progress as tensors finish; the first error cancels the rest."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    with torch_threads(1):
        progress("compare", 0, len(names))
        done: dict[str, TensorOutcome] = {}
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {pool.submit(measure, n): n for n in names}
            try:
                for count, future in enumerate(as_completed(futures), start=1):
                    done[futures[future]] = future.result()
                    progress("compare", count, len(names))
            except BaseException:
                # A bad tensor or Ctrl-C: do not start the queued ones.
                for future in futures:
                    future.cancel()
                raise
        return done


def _format_results(formats: Sequence[Format], outcomes: Sequence[TensorOutcome]
                    ) -> tuple[list[FormatResult], dict[str, str]]:
    """Per format, its measurements on every tensor and a note where it did not apply;
    also the formats that applied to no tensor at all, with the first reason."""
    results = {f.name: FormatResult(f) for f in formats}
    first_reason: dict[str, str] = {}
    skip_counts: dict[str, int] = {}
    for info, measured, skipped in outcomes:
        for fmt_name, result in measured.items():
            results[fmt_name].per_tensor[info.name] = result
        for fmt_name, reason in skipped.items():
            first_reason.setdefault(fmt_name, f"{info.name}: {reason}")
            skip_counts[fmt_name] = skip_counts.get(fmt_name, 0) + 1
    for r in results.values():
        if r.name in first_reason:
            r.note = (
                f"not applicable to {skip_counts[r.name]} of {len(outcomes)} tensors "
                f"({first_reason[r.name]}); no aggregate"
            )
    never = {k: v for k, v in first_reason.items() if not results[k].per_tensor}
    return list(results.values()), never


# --------------------------------------------------------------------------- plot


def add_perplexity(
    report: CompareReport,
    text_file: str | Path,
    *,
    window: int | None = None,
    max_tokens: int | None = None,
    progress: ProgressFn = no_progress,
) -> None:
    """Fill ``perplexity`` of every measured format: the source model (a Hugging Face
    directory) with every compared weight fake-quantized by that format, on ``text_file``
    (:mod:`umqcli.perplexity`'s protocol), and ``report.perplexity`` for the unquantized model."""
    from . import perplexity as ppl

    stats = None
    if report.activations is not None:
        from .stats import load_stats

        stats = load_stats(report.activations)

    def quantizer(fmt: Format):
        def fake_quantize(name: str, weight: torch.Tensor) -> torch.Tensor:
            entry = stats[name] if stats is not None else None
            return fmt.fake_quantize(weight, act_sq=None if entry is None else entry.act_sq.float(),
                                     act_absmax=None if entry is None else entry.absmax.float())
        return fake_quantize

    measured = [r for r in report.formats if r.rel_error is not None]
    window = window or ppl.DEFAULT_WINDOW
    reference, results = ppl.fake_quantized_perplexities(
        report.source, text_file, {r.name: quantizer(r.format) for r in measured}, [t.name for t in report.tensors],
        window=window, max_tokens=max_tokens or ppl.DEFAULT_MAX_TOKENS, progress=progress,
    )
    for r in measured:
        r.perplexity = results[r.name].value
    report.perplexity = {"reference": reference.value, "text": str(text_file), "tokens": reference.tokens,
                         "window": reference.window}


def plot_report(report: CompareReport, path: str | Path) -> None:
    """Error (relative output Frobenius, log scale) against bits per element: one point
    per format, the UMQ configurations' Pareto front as a line. Writes a PNG to ``path``
    (the caller makes the write atomic)."""
    matplotlib = require("matplotlib", extra="plot", purpose="--png plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [r for r in report.formats if r.bits is not None and r.rel_error and r.rel_error > 0]
    fig, ax = plt.subplots(figsize=(10, 6.2), dpi=120)
    umq = [r for r in usable if r.format.kind == "umq"]
    markers = {"mag": "o", "err": "s", "act": "^"}
    colors = {"fp8_e4m3": "tab:blue", "fp8_e5m2": "tab:orange", "int8": "tab:green"}
    for r in umq:
        p = r.format.params
        ax.scatter(
            r.bits, r.rel_error, s=22, alpha=0.55,
            marker=markers[_SEL_SHORT[p.selection]], color=colors[p.lo.value],
            facecolors="none" if p.block == 0 else colors[p.lo.value],
        )
    umq_front = pareto_front(umq, bits=_bits, error=_rel_error, rtol=PARETO_RTOL)
    ax.plot([r.bits for r in umq_front], [r.rel_error for r in umq_front], "-", color="black", lw=1.4,
            label="UMQ Pareto front", zorder=3)
    for r in umq_front:
        ax.annotate(r.name.removeprefix("umq-"), (r.bits, r.rel_error), fontsize=6.5, xytext=(4, 3),
                    textcoords="offset points", color="black")
    baselines = [r for r in usable if r.format.kind == "baseline"]
    for r in baselines:
        ax.scatter(r.bits, r.rel_error, s=46, marker="D", color="tab:red", edgecolors="black", zorder=4)
    # Labels of a cluster (same integer bits) stacked at least a factor 1.2 apart in y, so
    # that the 8-bit formats, which sit close together, stay readable.
    clusters: dict[int, list[FormatResult]] = {}
    for r in baselines:
        clusters.setdefault(math.floor(r.bits), []).append(r)
    for level, members in clusters.items():
        members.sort(key=lambda r: r.rel_error, reverse=True)
        label_y = math.inf
        # The 4-bit cluster sits at the left edge: label it on its right.
        label_x = level + 0.9 if level < 6 else level - 1.9
        for r in members:
            label_y = min(r.rel_error, label_y / 1.22)
            ax.annotate(
                f"{r.name} ({r.bits:.2f})", (r.bits, r.rel_error), xytext=(label_x, label_y),
                textcoords="data", fontsize=7, color="tab:red", va="center",
                arrowprops={"arrowstyle": "-", "color": "tab:red", "lw": 0.5, "alpha": 0.6},
            )
    # Legend proxies: lo format by colour, selection by marker, block by fill.
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="black", lw=1.4, label="UMQ Pareto front"),
               Line2D([], [], marker="D", ls="", color="tab:red", markeredgecolor="black", label="baseline")]
    handles += [Line2D([], [], marker="o", ls="", color=c, label=f"UMQ lo={lo}") for lo, c in colors.items()]
    handles += [Line2D([], [], marker=m, ls="", color="gray", label=f"selection {s}") for s, m in markers.items()
                if any(_SEL_SHORT[r.format.params.selection] == s for r in umq)]
    handles += [Line2D([], [], marker="o", ls="", color="gray", markerfacecolor="none", label="block = row"),
                Line2D([], [], marker="o", ls="", color="gray", label="block = 32")]
    ax.legend(handles=handles, fontsize=7.5, loc="upper right")
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per weight element (payload + masks + scales + outliers)")
    inputs = "real activation rows" if report.inputs == "activations" else "seeded Gaussian inputs"
    ax.set_ylabel(rf"relative output error $\|X(W-\hat W)^T\| / \|XW^T\|$  ({inputs})")
    ax.set_title(f"{Path(report.source).name}: {len(report.tensors)} weights, "
                 f"{report.elements / 1e6:.1f}M elements", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
