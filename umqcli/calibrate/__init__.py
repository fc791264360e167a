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

One module per job: :mod:`.corpus` (reading the text), :mod:`.tokens` (tokenising),
:mod:`.model` (loading the model), :mod:`.hooks` (statistics through forward hooks),
:mod:`.candidates` (evaluating configurations of one weight), :mod:`.search` (allocating
bits across tensors), :mod:`.explain` (the reasons and the recipe). This module holds the
end-to-end :func:`calibrate` and re-exports the public names of all of them.

Nothing here prints; progress goes through a ``progress(stage, done, total)`` callback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import torch

from ..errors import UMQError
from ..progress import ProgressFn, no_progress
from ..stats import ChannelStats
from .candidates import (
    MIN_SAMPLE_ROWS,
    Candidate,
    CandidateSpace,
    TensorChoice,
    evaluate_tensor,
    lower_hull,
    output_energy_correction,
    output_error,
    reconstruct,
    weighted_error,
)
from .corpus import TEXT_SUFFIXES, package_readme, read_documents
from .explain import explain, to_recipe
from .hooks import StatsRun, collect_stats, match_weight_names
from .model import is_hf_model_dir, load_hf_model
from .search import SearchResult, allocate_budget, allocate_max_error, candidate_front, check_budget_fits, search_recipe
from .tokens import make_sequences

if TYPE_CHECKING:
    from ..recipe import Recipe

__all__ = [
    "MIN_SAMPLE_ROWS", "TEXT_SUFFIXES", "Candidate", "CandidateSpace", "CalibrationResult",
    "CheckpointWeights", "ProgressFn", "SearchResult", "StatsRun", "TensorChoice", "allocate_budget",
    "allocate_max_error", "calibrate", "check_budget_fits", "collect_stats", "evaluate_tensor", "explain",
    "is_hf_model_dir", "load_hf_model", "lower_hull", "make_sequences", "match_weight_names",
    "output_energy_correction", "output_error", "package_readme", "candidate_front", "read_documents",
    "reconstruct", "search_recipe", "to_recipe", "weighted_error",
]


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
    hessian: bool = False,
    progress: ProgressFn = no_progress,
) -> CalibrationResult:
    """``umq calibrate``: statistics (from ``data`` through the model, or ``stats_in``, or
    none: weights only), then the recipe search over the tensors ``umq pack`` would
    quantize (:func:`umqcli.plan.make_plan` with the same include/exclude rules), then
    the recipe (and the statistics) written atomically.

    ``source``: a HF model directory (needed with ``data``) or a ``.safetensors`` file.
    ``hessian``: also collect each linear input's Hessian (for the gptq method).
    """
    from ..io import open_checkpoint
    from ..plan import make_plan
    from ..stats import load_stats, read_stats_metadata, save_stats

    source = Path(source)
    if data is not None and stats_in is not None:
        raise UMQError("give data (measure statistics) or stats_in (reuse them), not both", rule="data-and-stats")
    if data is not None and not is_hf_model_dir(source):
        raise UMQError("calibration data needs a Hugging Face model directory (config.json, tokenizer, weights) "
                       "to run",
                       rule="model-load", file=source)
    if stats_out is not None and data is None:
        raise UMQError("stats_out needs data: there is nothing measured to save", rule="stats-out-without-data")
    with open_checkpoint(source) as checkpoint:
        plan = make_plan(checkpoint, include=include, exclude=exclude)
        names = [t.name for t in plan.packed]
        if budget_bits is not None and names:
            check_budget_fits([tuple(t.shape) for t in plan.packed], space, budget_bits)
        excluded = {t.name: t.reason for t in plan.passthrough}
        stats_run = None
        stats: dict[str, ChannelStats] | None = None
        stats_label = None
        if data is not None:
            stats_run = collect_stats(source, data, checkpoint_names=checkpoint.names(), samples=samples,
                                      seq_len=seq_len, batch_size=batch_size, sample_rows=sample_rows,
                                      seed=seed, hessian=hessian, progress=progress)
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
    stats_file, stats_digest = stats_label, None
    if stats_label is not None:
        from ..stats import stats_sha256

        stats_digest = stats_sha256(stats_label)
        if recipe_out is not None:  # pack finds it relative to the recipe, from any directory
            stats_file = os.path.relpath(Path(stats_label).resolve(), Path(recipe_out).resolve().parent)
    recipe = to_recipe(result, source=source.name, stats_file=stats_file, stats_sha256=stats_digest)
    if recipe_out is not None:
        recipe.save(recipe_out)
    return CalibrationResult(result, recipe, stats_run, None if stats_label is None else Path(stats_label),
                             None if recipe_out is None else Path(recipe_out), excluded)
