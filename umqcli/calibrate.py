"""Calibration: real activation statistics, and a per-tensor recipe under a bit budget.

Two halves, usable separately:

1. :func:`collect_stats` runs a Hugging Face model on real text (CPU), hooks the input of
   every ``nn.Linear`` and streams per-channel statistics into a
   :class:`~umqcli.stats.ActivationAccumulator`, keyed by the checkpoint's tensor names.
2. :func:`search_recipe` evaluates candidate :class:`~umqcli.format.QuantParams` for each
   quantizable tensor with the reference codec, predicts each one's activation-weighted
   output error and its exact stored bits, and allocates bits across the model: minimum
   total error under an average bits-per-element budget (a multiple-choice knapsack solved
   greedily on each tensor's lower convex hull), or the cheapest configuration meeting a
   per-tensor error bound.

The predicted error of a tensor ``W [R, C]`` under a candidate with reconstruction ``Ŵ``
is the expected relative output error with the input channels treated as uncorrelated::

    err = sum_j a_j ||W[:, j] - Ŵ[:, j]||^2  /  sum_j a_j ||W[:, j]||^2,   a_j = E[x_j^2]

whose numerator is ``E||(W - Ŵ) x||^2`` up to the cross-channel terms
``E[x_j x_l] e_ij e_il`` (``j != l``); those average out because rounding errors of
different weights have independent signs, and ``a_j`` comes from every calibration token,
not only from the small stored sample. The denominator is then rescaled to the real output
energy ``E||W x||^2`` measured on the stored sample rows (:func:`output_energy_correction`):
it does have coherent cross-channel terms (inputs with a non-zero mean), and without the
rescale the prediction overstates the error of the FFN down-projections up to 4x
(``docs/calibrate.md`` compares prediction and measurement on held-out rows). Without
statistics ``a_j = 1``: the plain relative weight error.

Nothing here prints; progress goes through a ``progress(stage, done, total)`` callback.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import torch

from .codec import block_scales, decode_lo, quantize_lo, resolve_hi, select, select_magnitude
from ._optional import require
from .errors import UMQError
from .format import GROUP, HiFormat, LoFormat, QuantParams, Selection
from .stats import OUTLIER_THRESHOLD, ActivationAccumulator, ChannelStats

if TYPE_CHECKING:
    from .recipe import Recipe

ProgressFn = Callable[[str, int, int], None]
TEXT_SUFFIXES = (".txt", ".md", ".rst")


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


# =========================================================================== text


def read_documents(data: str | Path) -> list[tuple[str, str]]:
    """Calibration text: ``[(file name, text)]`` from one file or, for a directory, every
    ``*.txt`` / ``*.md`` / ``*.rst`` below it in sorted path order (so runs are repeatable).

    Raises :class:`UMQError` (rule ``calibration-data``) for a missing path, a directory
    without text files, text that is not UTF-8, or no text at all.
    """
    data = Path(data)
    if data.is_dir():
        files = sorted(p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise UMQError(
                f"no {'/'.join(TEXT_SUFFIXES)} files in the directory", rule="calibration-data", file=data
            )
    elif data.is_file():
        files = [data]
    else:
        raise UMQError("calibration data not found", rule="calibration-data", file=data)
    documents = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UMQError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", rule="calibration-data",
                           file=path) from None
        if text.strip():
            documents.append((str(path), text))
    if not documents:
        raise UMQError("the calibration text is empty", rule="calibration-data", file=data)
    return documents


def package_readme(distribution: str) -> str:
    """The long description (README) that an installed Python distribution ships in its
    ``METADATA`` file, without the header fields: real prose available offline, used by
    the tests and benchmarks as calibration and held-out text."""
    from importlib import metadata

    try:
        raw = metadata.distribution(distribution).read_text("METADATA") or ""
    except metadata.PackageNotFoundError:
        raise UMQError(f"distribution {distribution!r} is not installed", rule="calibration-data") from None
    _, _, body = raw.partition("\n\n")  # RFC 822 style: headers, one blank line, body
    return body.strip()


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The token ids the tokenizer puts before and after a text (``[CLS]``/``[SEP]``,
    ``<s>``, ...), found by tokenising one word with and without special tokens."""
    probe = "calibration"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return list(full[:start]), list(full[start + len(bare):])
    return [], []


def make_sequences(
    tokenizer, documents: Sequence[tuple[str, str]], *, samples: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences for calibration: int64 ``input_ids [N, L]`` and ``attention_mask
    [N, L]`` with ``N <= samples``, ``L <= seq_len``.

    The documents are tokenised and concatenated (separator token between documents) into
    one stream, cut into chunks that fill ``seq_len`` together with the model's special
    tokens; when there are more chunks than ``samples``, evenly spaced chunks are taken, so
    the sequences cover the whole text, not just its beginning.
    """
    if samples < 1 or seq_len < 8:
        raise UMQError(f"need samples >= 1 and seq_len >= 8, got {samples} and {seq_len}", rule="calibration-data")
    prefix, suffix = _special_tokens(tokenizer)
    special = len(prefix) + len(suffix)
    body = seq_len - special
    if body < 1:
        raise UMQError(f"seq_len {seq_len} leaves no room next to {special} special tokens", rule="calibration-data")
    separator = [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else (
        [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    stream: list[int] = []
    for _, text in documents:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if stream and ids:
            stream.extend(separator)
        stream.extend(ids)
    chunks = [stream[i:i + body] for i in range(0, len(stream), body)]
    if len(chunks) > 1 and len(chunks[-1]) < body:
        chunks.pop()  # a short tail would only add padding
    if len(chunks) > samples:
        step = len(chunks) / samples
        chunks = [chunks[int(i * step)] for i in range(samples)]
    rows = [prefix + c + suffix for c in chunks]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    attention = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
        attention[i, : len(r)] = 1
    return input_ids, attention


# =========================================================================== model


def _require_transformers():
    return require(
        "transformers",
        extra="hf",
        purpose="collecting activation statistics",
        hint="or pass --stats from an earlier run, or calibrate on weights alone",
    )


def is_hf_model_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def load_hf_model(model_dir: str | Path):
    """``(model, tokenizer)`` from a local Hugging Face model directory, float32, on the
    CPU, in eval mode. Uses the architecture named in ``config.json`` (so heads such as
    ``lm_head`` are hooked too), falling back to ``AutoModel``. Never touches the network."""
    transformers = _require_transformers()
    model_dir = Path(model_dir)
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        model_cls = transformers.AutoModel
        for arch in getattr(config, "architectures", None) or []:
            if hasattr(transformers, arch):
                model_cls = getattr(transformers, arch)
                break
        model = model_cls.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UMQError(f"cannot load the model or tokenizer with transformers ({exc})",
                       rule="model-load", file=model_dir) from None
    model.eval()
    return model, tokenizer


def match_weight_names(module_names: Iterable[str], checkpoint_names: Iterable[str]) -> dict[str, str]:
    """Map ``nn.Linear`` module names to checkpoint weight names by suffix.

    Module names and checkpoint keys often differ by a prefix (``bert.`` in a checkpoint
    of ``BertForMaskedLM`` loaded as ``BertModel``, or ``model.`` the other way round).
    ``m`` matches checkpoint key ``k`` when ``m + ".weight"`` equals ``k``, or one is the
    other with a leading ``"<prefix>."``. A module with no match or several matches is left
    out (its tensor then gets weights-only statistics), never guessed.
    """
    checkpoint = [n for n in checkpoint_names if n.endswith(".weight")]
    exact = set(checkpoint)
    by_last: dict[str, list[str]] = {}
    for key in checkpoint:
        by_last.setdefault(key.rsplit(".", 2)[-2] if key.count(".") else key, []).append(key)
    mapping: dict[str, str] = {}
    for module in module_names:
        wanted = module + ".weight"
        if wanted in exact:
            mapping[module] = wanted
            continue
        last = wanted.rsplit(".", 2)[-2] if wanted.count(".") else wanted
        hits = [k for k in by_last.get(last, []) if k.endswith("." + wanted) or wanted.endswith("." + k)]
        if len(hits) == 1:
            mapping[module] = hits[0]
    # Two modules must not claim one tensor (e.g. tied weights under two names).
    claimed: dict[str, list[str]] = {}
    for module, key in mapping.items():
        claimed.setdefault(key, []).append(module)
    return {m: k for m, k in mapping.items() if len(claimed[k]) == 1}


@dataclass
class StatsRun:
    """What :func:`collect_stats` measured: statistics per checkpoint weight name, the
    metadata for the stats file, and which linear modules could not be mapped."""

    stats: dict[str, ChannelStats]
    metadata: dict[str, str]
    unmatched_modules: list[str]
    peak_state_bytes: int


def collect_stats(
    model_dir: str | Path,
    data: str | Path,
    *,
    checkpoint_names: Iterable[str],
    samples: int = 128,
    seq_len: int = 128,
    batch_size: int = 8,
    sample_rows: int = 128,
    seed: int = 0,
    progress: ProgressFn = _no_progress,
) -> StatsRun:
    """Run the model on the calibration text and record the input statistics of every
    ``nn.Linear`` (see :mod:`umqcli.stats`), keyed by checkpoint weight name.

    Padding positions are excluded (the attention mask selects real tokens). The model
    runs under ``torch.inference_mode`` in batches of ``batch_size`` sequences; the hooks
    fold each batch into running sums at once, so memory does not grow with ``samples``.
    """
    model, tokenizer = load_hf_model(model_dir)
    documents = read_documents(data)
    input_ids, attention = make_sequences(tokenizer, documents, samples=samples, seq_len=seq_len)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    mapping = match_weight_names(linear_names, checkpoint_names)
    accumulator = ActivationAccumulator(sample_rows=sample_rows, seed=seed)
    current_mask: list[torch.Tensor | None] = [None]

    def make_hook(weight_name: str):
        def hook(module, args):
            x = args[0]
            token_mask = current_mask[0]
            if token_mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(token_mask.shape):
                x = x[token_mask]
            accumulator.update(weight_name, x)

        return hook

    modules = dict(model.named_modules())
    handles = [modules[m].register_forward_pre_hook(make_hook(k)) for m, k in mapping.items()]
    total = input_ids.shape[0]
    peak = 0
    try:
        with torch.inference_mode():
            for start in range(0, total, batch_size):
                ids = input_ids[start:start + batch_size]
                mask = attention[start:start + batch_size]
                current_mask[0] = mask.bool()
                model(input_ids=ids, attention_mask=mask)
                peak = max(peak, accumulator.nbytes)
                progress("calibrate", min(start + batch_size, total), total)
    finally:
        for handle in handles:
            handle.remove()
    stats = accumulator.result()
    tokens = int(attention.sum())
    metadata = {
        "tokens": str(tokens),
        "samples": str(total),
        "seq_len": str(input_ids.shape[1]),
        "seed": str(seed),
        "source": f"model={Path(model_dir).name}; data={Path(data).name} ({len(documents)} files)",
        "outlier_threshold": str(OUTLIER_THRESHOLD),
    }
    unmatched = sorted(set(linear_names) - set(mapping))
    return StatsRun(stats=stats, metadata=metadata, unmatched_modules=unmatched, peak_state_bytes=peak)


# =========================================================================== candidates


@dataclass(frozen=True)
class CandidateSpace:
    """The configurations tried for every tensor (the cross product, minus duplicates:
    k = 8 has no lo elements, k = 0 has no selection)."""

    ks: tuple[int, ...] = tuple(range(GROUP + 1))
    los: tuple[LoFormat, ...] = (LoFormat.FP8_E4M3, LoFormat.INT8)
    blocks: tuple[int, ...] = (0, 32, 128)
    selections: tuple[Selection, ...] = (Selection.MAGNITUDE, Selection.ACTIVATION)

    @classmethod
    def parse(cls, text: str) -> "CandidateSpace":
        """``"k=0-4,lo=fp8_e4m3+int8,block=row+32,selection=magnitude+activation"``; keys
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
                else:
                    raise ValueError(f"unknown key {key!r} (k, lo, block, selection)")
            except ValueError as exc:
                raise UMQError(f"bad candidate option {part!r}: {exc}", rule="candidates") from None
        return cls(**{**space.__dict__, **changes})

    def params_for(self, columns: int, *, have_stats: bool) -> list[QuantParams]:
        """Every distinct candidate for a tensor with ``columns`` columns. Blocks that do
        not divide ``columns`` are skipped; without statistics ``activation`` becomes
        ``error`` (the same rule with a_j = 1)."""
        selections = []
        for s in self.selections:
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
                            out.append(QuantParams(k=k, lo=lo_, block=block_, selection=s_))
        return out


def reconstruct(weight: torch.Tensor, params: QuantParams, act_sq: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``[R, C]``: what ``dequantize(quantize(weight, params), float32)`` returns,
    computed with the codec's own selection, scale and lo/hi rounding functions but
    without interleaving bytes (the search only needs the values)."""
    return _TensorEvaluator(weight, act_sq).reconstruct(params)


def weighted_error(weight: torch.Tensor, approx: torch.Tensor, act_sq: torch.Tensor) -> float:
    """``sum_j a_j ||W[:, j] - Ŵ[:, j]||^2 / sum_j a_j ||W[:, j]||^2`` (float64 sums)."""
    w = weight.double()
    a = act_sq.double()
    num = ((w - approx.double()).square().sum(0) * a).sum()
    den = (w.square().sum(0) * a).sum()
    return 0.0 if float(den) == 0.0 else float(num / den)


MIN_SAMPLE_ROWS = 16  # fewer real rows than this: keep the diagonal denominator


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


def lower_hull(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The lower-left convex hull of (bits, error): the candidates a Lagrangian allocation
    can pick, cheapest first, each strictly more accurate than the one before."""
    pareto: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (c.bits, c.error)):
        if not pareto or c.error < pareto[-1].error:
            pareto.append(c)
    hull: list[Candidate] = []
    for c in pareto:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a-c: drop it (slopes must increase along the hull).
            if (b.error - a.error) * (c.bits - a.bits) >= (c.error - a.error) * (b.bits - a.bits):
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


class _TensorEvaluator:
    """Reconstructions of one weight under many candidates, sharing what they share:
    the float32 copy, the hi rounding, and the magnitude masks (one per k)."""

    def __init__(self, weight: torch.Tensor, act_sq: torch.Tensor | None) -> None:
        self.weight = weight
        self.weight32 = weight.float()
        self.act_sq = act_sq
        self._masks: dict[int, torch.Tensor] = {}
        # hi = auto resolves per mask, but for the common case (every value finite in the
        # auto hi dtype) it is the same for all masks: decide once.
        self._fixed_hi = None
        if weight.dtype != torch.float32 or bool(torch.isfinite(weight.to(torch.float16)).all()):
            self._fixed_hi = resolve_hi(weight, torch.ones_like(weight, dtype=torch.bool), None)
        self._hi_values: dict[HiFormat, torch.Tensor] = {}

    def magnitude_mask(self, k: int) -> torch.Tensor:
        if k not in self._masks:
            self._masks[k] = select_magnitude(self.weight32, k)
        return self._masks[k]

    def hi_values(self, hi: HiFormat) -> torch.Tensor:
        if hi not in self._hi_values:
            self._hi_values[hi] = self.weight.to(hi.torch_dtype).float()
        return self._hi_values[hi]

    def reconstruct(self, params: QuantParams) -> torch.Tensor:
        """float32 ``[R, C]``, equal to ``dequantize(quantize(weight, params), float32)``."""
        if params.selection is Selection.MAGNITUDE and params.hi is None:
            mask = self.magnitude_mask(params.k)
            hi = self._fixed_hi or resolve_hi(self.weight, mask, None)
        else:
            mask, hi = select(self.weight, params, act_sq=self.act_sq)
        block = params.resolve_block(self.weight.shape[1])
        scale = block_scales(self.weight32, mask, block, params.lo)
        lo_values = decode_lo(quantize_lo(self.weight32, scale, block, params.lo), params.lo)
        lo_values = lo_values * scale.repeat_interleave(block, dim=1)
        return torch.where(mask, self.hi_values(hi), lo_values)


def evaluate_tensor(
    name: str,
    weight: torch.Tensor,
    stats: ChannelStats | None,
    space: CandidateSpace,
    *,
    max_rows: int = 0,
    refine: int = 2,
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
    """
    rows, cols = weight.shape
    act_sq = stats.act_sq.float() if stats is not None else torch.ones(cols)
    subset = weight[_row_subset(rows, max_rows)]
    evaluator = _TensorEvaluator(subset, act_sq)
    all_params = space.params_for(cols, have_stats=stats is not None)
    candidates: list[Candidate] = []
    energy_fix = output_energy_correction(subset, act_sq, None if stats is None else stats.sample)

    def run(params: QuantParams) -> Candidate:
        approx = evaluator.reconstruct(params)
        error = weighted_error(subset, approx, act_sq) * energy_fix
        cand = Candidate(params, params.bits_per_element(cols), error)
        candidates.append(cand)
        return cand

    magnitude = [p for p in all_params if p.selection is Selection.MAGNITUDE]
    others = [p for p in all_params if p.selection is not Selection.MAGNITUDE]
    by_k: dict[int, list[Candidate]] = {}
    for params in magnitude:
        by_k.setdefault(params.k, []).append(run(params))
    magnitude_keys = {(p.k, p.lo, p.block) for p in magnitude}
    for params in others:
        key = (params.k, params.lo, params.block)
        if refine > 0 and key in magnitude_keys:
            best = sorted(by_k[params.k], key=lambda c: c.error)[:refine]
            if key not in {(c.params.k, c.params.lo, c.params.block) for c in best}:
                continue
        run(params)
    mean = float(act_sq.mean())
    return TensorChoice(
        name=name,
        shape=(rows, cols),
        candidates=candidates,
        hull=lower_hull(candidates),
        outlier_channels=stats.outlier_channels if stats is not None else 0,
        act_peak_ratio=float(act_sq.max()) / mean if mean > 0 else 1.0,
    )


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates no other candidate beats on both bits and error, cheapest first."""
    front: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (c.bits, c.error)):
        if not front or c.error < front[-1].error:
            front.append(c)
    return front


def allocate_budget(choices: Sequence[TensorChoice], budget_bits: float, *, slots: int = 20000) -> None:
    """Pick one candidate per tensor minimising ``sum_t n_t err_t`` subject to
    ``sum_t n_t bits_t <= budget_bits * sum_t n_t`` (``n_t`` = elements).

    A multiple-choice knapsack, solved exactly by dynamic programming over the budget
    above the cheapest mix, cut into ``slots`` units; each candidate's extra cost is
    rounded *up* to whole units, so the result always fits the real budget and is optimal
    for any budget ``T`` units smaller (``T`` = number of tensors; 37 of 20000 units for
    MiniLM). Leftover bits are then spent greedily on the upgrades with the best error
    saved per bit that still fit, in exact arithmetic.

    Why not only a Lagrangian / greedy walk on each tensor's convex hull: that is exact
    only up to the last hull step that does not fit, and it never picks a candidate
    above the hull, while one step of one large tensor (+1 bit on a 1536x384 matrix is
    5% of MiniLM's elements) can matter. The DP costs ``O(candidates * slots)`` vector
    operations: well under a second for MiniLM.
    """
    import numpy as np

    total_elements = sum(c.numel for c in choices)
    limit = budget_bits * total_elements
    floor = sum(min(x.bits for x in c.candidates) * c.numel for c in choices)
    if floor > limit * (1 + 1e-12):
        raise UMQError(
            f"budget {budget_bits:.3f} bits/element is below the cheapest candidate mix "
            f"({floor / total_elements:.3f} bits/element)",
            rule="budget",
        )
    spare = max(limit - floor, 0.0)
    unit = spare / slots if spare > 0 else 1.0
    best = np.zeros(slots + 1)  # best[s]: least error of the tensors so far within s units
    tables = []
    for c in choices:
        front = pareto_front(c.candidates)
        base = front[0].bits
        costs = [int(math.ceil((x.bits - base) * c.numel / unit - 1e-9)) for x in front]
        new = np.full(slots + 1, np.inf)
        arg = np.full(slots + 1, -1, dtype=np.int32)
        for i, (x, cost) in enumerate(zip(front, costs)):
            if cost > slots:
                continue
            trial = np.full(slots + 1, np.inf)
            trial[cost:] = best[: slots + 1 - cost] + x.error * c.numel
            better = trial < new
            new[better] = trial[better]
            arg[better] = i
        best = new
        tables.append((front, costs, arg))
    units = slots
    for c, (front, costs, arg) in zip(reversed(choices), reversed(tables)):
        i = int(arg[units])
        assert i >= 0, "the cheapest mix always fits"
        c.chosen = front[i]
        units -= costs[i]
    # Spend what the rounding left: exact costs, best error saved per bit first.
    spent = sum(c.chosen.bits * c.numel for c in choices)
    while True:
        upgrades = [
            ((c.chosen.error - x.error) * c.numel / ((x.bits - c.chosen.bits) * c.numel), c, x)
            for c in choices for x in pareto_front(c.candidates)
            if x.bits > c.chosen.bits and x.error < c.chosen.error
            and spent + (x.bits - c.chosen.bits) * c.numel <= limit
        ]
        if not upgrades:
            break
        _, c, x = max(upgrades, key=lambda u: u[0])
        spent += (x.bits - c.chosen.bits) * c.numel
        c.chosen = x


def allocate_max_error(choices: Sequence[TensorChoice], max_rel_error: float) -> None:
    """Per tensor, the cheapest candidate whose predicted relative output error
    (``rel_error``, not squared) is <= ``max_rel_error`` (the most accurate one if none is)."""
    for c in choices:
        fitting = [x for x in c.candidates if x.rel_error <= max_rel_error]
        c.chosen = (min(fitting, key=lambda x: (x.bits, x.error)) if fitting
                    else min(c.candidates, key=lambda x: (x.error, x.bits)))


def explain(choices: Sequence[TensorChoice]) -> None:
    """Fill each choice's ``reason``: how its k compares with the model's median k, what
    the extra (or fewer) hi slots buy in predicted error, and what about the tensor's
    inputs (outlier channels, uneven E[x^2]) makes it so."""
    ks = sorted(c.chosen.params.k for c in choices if c.chosen is not None)
    if not ks:
        return
    median_k = ks[len(ks) // 2]
    for c in choices:
        chosen = c.chosen
        assert chosen is not None
        k = chosen.params.k
        facts = []
        if c.outlier_channels:
            facts.append(f"{c.outlier_channels} outlier input channels (|x|>{OUTLIER_THRESHOLD:g})")
        if c.act_peak_ratio >= 10:
            facts.append(f"E[x^2] peak {c.act_peak_ratio:.0f}x mean")
        at_median = [x for x in c.candidates if x.params.k == median_k]
        # compare like with like: the same lo, block and selection at the median k if
        # that was evaluated, so the bit difference is the hi slots alone
        same = [x for x in at_median if (x.params.lo, x.params.block, x.params.selection)
                == (chosen.params.lo, chosen.params.block, chosen.params.selection)]
        ref = min(same or at_median, key=lambda x: (x.error, x.bits)) if at_median else None
        if k > median_k and ref is not None:
            why = (f"k={k}, more hi slots than the median k={median_k}: {chosen.bits - ref.bits:+.2f} bits "
                   f"cut the predicted error from {ref.rel_error:.2e} to {chosen.rel_error:.2e}, "
                   f"a hi slot saves more error per bit here than elsewhere")
        elif k < median_k and ref is not None:
            why = (f"k={k}, fewer hi slots than the median k={median_k}: saves {ref.bits - chosen.bits:.2f} "
                   f"bits for a predicted error of {chosen.rel_error:.2e} instead of {ref.rel_error:.2e}, "
                   f"a hi slot saves less error per bit here than elsewhere")
        else:
            why = f"k={k} (median)"
        c.reason = "; ".join([why] + facts)


@dataclass
class SearchResult:
    choices: list[TensorChoice]
    mode: str  # "budget" or "max-error"
    target: float
    stats_source: str  # "activations" or "weights-only"

    @property
    def elements(self) -> int:
        return sum(c.numel for c in self.choices)

    @property
    def average_bits(self) -> float:
        return sum(c.chosen.bits * c.numel for c in self.choices) / max(self.elements, 1)

    @property
    def average_error(self) -> float:
        """Element-weighted mean predicted error energy (what the budget search minimises)."""
        return sum(c.chosen.error * c.numel for c in self.choices) / max(self.elements, 1)

    @property
    def rms_rel_error(self) -> float:
        """``sqrt(average_error)``: the model's element-weighted RMS relative output error."""
        return math.sqrt(self.average_error)


@contextmanager
def _torch_threads(threads: int | None):
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def search_recipe(
    weights: Mapping[str, torch.Tensor],
    stats: Mapping[str, ChannelStats] | None,
    *,
    budget_bits: float | None = None,
    max_rel_error: float | None = None,
    space: CandidateSpace = CandidateSpace(),
    max_rows: int = 0,
    threads: int | None = 1,
    progress: ProgressFn = _no_progress,
) -> SearchResult:
    """Evaluate every candidate for every weight and allocate bits across the model.

    ``weights``: name -> 2-D float tensor (only the tensors to quantize; may be a lazy
    mapping that reads each tensor when asked, see :class:`CheckpointWeights`). ``stats``: name ->
    :class:`ChannelStats` (``None`` or a missing name: weights only, a_j = 1). Exactly one
    of ``budget_bits`` (average stored bits per element over these tensors) and
    ``max_rel_error`` (per tensor) must be given.

    ``threads``: torch intra-op threads during the search (restored afterwards; ``None``
    leaves them alone). The default is 1: the search runs many small element-wise ops
    (at most ``max_rows`` rows each), which gain nothing from threads and, on a busy
    machine, lose 10-40x to OpenMP workers spinning for a core (measured on 2 shared
    cores: 1.0 s against 10-55 s per MiniLM tensor).
    """
    if (budget_bits is None) == (max_rel_error is None):
        raise UMQError("give exactly one of --budget-bits and --max-rel-error", rule="target")
    choices = []
    total = len(weights)
    with _torch_threads(threads):
        for i, name in enumerate(weights):
            weight = weights[name]  # a lazy mapping reads one tensor at a time
            item = None if stats is None else stats.get(name)
            if item is not None and item.channels != weight.shape[1]:
                raise UMQError(f"statistics have {item.channels} channels, the weight has {weight.shape[1]} columns",
                               rule="activation-stats", tensor=name)
            choices.append(evaluate_tensor(name, weight, item, space, max_rows=max_rows))
            progress("search", i + 1, total)
    if not choices:
        raise UMQError("no quantizable tensors", rule="plan")
    if budget_bits is not None:
        allocate_budget(choices, budget_bits)
        mode, target = "budget", budget_bits
    else:
        allocate_max_error(choices, max_rel_error)
        mode, target = "max-error", max_rel_error
    explain(choices)
    have = stats is not None and any(c.name in stats for c in choices)
    return SearchResult(choices, mode, float(target), "activations" if have else "weights-only")


# =========================================================================== end to end


class CheckpointWeights(Mapping):
    """A read-only mapping name -> tensor over an open checkpoint that reads each tensor
    only when asked, so the search holds one weight in memory at a time."""

    def __init__(self, checkpoint, names: Sequence[str]) -> None:
        self.checkpoint = checkpoint
        self._names = list(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self.checkpoint.get(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclass
class CalibrationResult:
    """What :func:`calibrate` did: the search, the recipe it wrote, where the statistics
    came from, and the tensors it left to pack's defaults."""

    search: SearchResult
    recipe: "Recipe"
    stats_run: StatsRun | None
    stats_path: Path | None
    recipe_path: Path | None
    excluded: dict[str, str] = field(default_factory=dict)  # name -> why not searched


def to_recipe(result: SearchResult, *, source: str, stats_file: str | None = None) -> "Recipe":
    """The :class:`~umqcli.recipe.Recipe` for ``umq pack --recipe``: one entry per searched
    tensor with its parameters, predicted error, bits and reason."""
    from .recipe import Recipe, RecipeEntry

    tensors = {
        c.name: RecipeEntry(
            params=c.chosen.params,
            predicted_rel_error=float(c.chosen.rel_error),
            bits_per_element=float(c.chosen.bits),
            reason=c.reason,
        )
        for c in result.choices
    }
    extra: dict[str, object] = {
        "search": {
            "mode": result.mode,
            "target": result.target,
            "statistics": result.stats_source,
            "average_bits_per_element": result.average_bits,
            "rms_predicted_rel_error": result.rms_rel_error,
            "error_metric": "sqrt(sum_j E[x_j^2] ||W[:,j]-W_hat[:,j]||^2 / sum_j E[x_j^2] ||W[:,j]||^2)",
        }
    }
    if stats_file is not None:
        extra["stats"] = stats_file
    return Recipe(
        tensors=tensors,
        budget_bits=result.target if result.mode == "budget" else None,
        source=source,
        extra=extra,
    )


def calibrate(
    source: str | Path,
    *,
    data: str | Path | None = None,
    stats_in: str | Path | None = None,
    stats_out: str | Path | None = None,
    recipe_out: str | Path | None = None,
    budget_bits: float | None = None,
    max_rel_error: float | None = None,
    space: CandidateSpace = CandidateSpace(),
    samples: int = 128,
    seq_len: int = 128,
    batch_size: int = 8,
    sample_rows: int = 128,
    seed: int = 0,
    max_rows: int = 0,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    progress: ProgressFn = _no_progress,
) -> CalibrationResult:
    """``umq calibrate``: statistics (from ``data`` through the model, or ``stats_in``, or
    none: weights only), then the recipe search over the tensors ``umq pack`` would
    quantize (:func:`umqcli.plan.make_plan` with the same include/exclude rules), then
    the recipe (and the statistics) written atomically.

    ``source``: a HF model directory (needed with ``data``) or a ``.safetensors`` file.
    """
    from .io import open_checkpoint
    from .plan import make_plan
    from .stats import load_stats, read_stats_metadata, save_stats

    source = Path(source)
    if data is not None and stats_in is not None:
        raise UMQError("give --data (measure statistics) or --stats (reuse them), not both", rule="options")
    if data is not None and not is_hf_model_dir(source):
        raise UMQError("--data needs a Hugging Face model directory (config.json, tokenizer, weights) to run",
                       rule="model-load", file=source)
    if stats_out is not None and data is None:
        raise UMQError("--stats-out needs --data: there is nothing measured to save", rule="options")
    with open_checkpoint(source) as checkpoint:
        plan = make_plan(checkpoint, include=include, exclude=exclude)
        names = [t.name for t in plan.packed]
        excluded = {t.name: t.reason for t in plan.passthrough}
        stats_run = None
        stats: dict[str, ChannelStats] | None = None
        stats_label = None
        if data is not None:
            stats_run = collect_stats(source, data, checkpoint_names=checkpoint.names(), samples=samples,
                                      seq_len=seq_len, batch_size=batch_size, sample_rows=sample_rows,
                                      seed=seed, progress=progress)
            stats = stats_run.stats
            if stats_out is not None:
                save_stats(stats_out, stats, stats_run.metadata)
                stats_label = str(stats_out)
        elif stats_in is not None:
            read_stats_metadata(stats_in)
            stats = load_stats(stats_in)
            stats_label = str(stats_in)
        if stats is not None and not any(n in stats for n in names):
            raise UMQError("the statistics cover none of the tensors to quantize (another model?)",
                           rule="activation-stats", file=stats_out or stats_in or source)

        result = search_recipe(CheckpointWeights(checkpoint, names), stats, budget_bits=budget_bits, max_rel_error=max_rel_error,
                               space=space, max_rows=max_rows, progress=progress)
    recipe = to_recipe(result, source=source.name, stats_file=stats_label)
    if recipe_out is not None:
        recipe.save(recipe_out)
    return CalibrationResult(result, recipe, stats_run, None if stats_label is None else Path(stats_label),
                             None if recipe_out is None else Path(recipe_out), excluded)
