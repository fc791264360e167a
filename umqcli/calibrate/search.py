"""The budget search: allocate bits across a model's tensors from their evaluated
candidates (a multiple-choice knapsack under an average-bits budget, or the cheapest
configuration under a per-tensor error bound). Needs weights and, optionally, statistics;
never a model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .._fused import torch_threads
from ..errors import UMQError
from ..progress import ProgressFn, no_progress
from ..stats import ChannelStats
from ..format import Method
from .candidates import (CandidateSpace, TensorChoice, candidate_front, evaluate_gptq, evaluate_tensor,
                         gptq_configurations)
from .explain import explain


def _check_budget(budget_bits: float, floor: float, total_elements: int) -> None:
    """``floor``: stored bits of the cheapest candidate of every tensor, summed."""
    if floor > budget_bits * total_elements * (1 + 1e-12):
        raise UMQError(
            f"budget {budget_bits:.3f} bits/element is below the cheapest candidate mix "
            f"({floor / total_elements:.3f} bits/element)",
            rule="budget",
        )


def check_budget_fits(shapes: Sequence[tuple[int, int]], space: CandidateSpace, budget_bits: float) -> None:
    """Refuse a budget below the cheapest candidate mix from the tensor shapes alone (a
    candidate's stored bits depend only on its parameters and column count), before any
    statistics are gathered or any candidate is evaluated."""
    total = sum(rows * cols for rows, cols in shapes)
    floor = sum(min(p.bits_per_element(cols) for p in space.params_for(cols, have_stats=True)) * rows * cols
                for rows, cols in shapes)
    _check_budget(budget_bits, floor, total)


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
    _check_budget(budget_bits, floor, total_elements)
    spare = max(limit - floor, 0.0)
    unit = spare / slots if spare > 0 else 1.0
    best = np.zeros(slots + 1)  # best[s]: least error of the tensors so far within s units
    fronts = [candidate_front(c.candidates) for c in choices]
    tables = []
    for c, front in zip(choices, fronts):
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
            for c, front in zip(choices, fronts) for x in front
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



def _add_gptq_candidates(choices: Sequence[TensorChoice], weights: Mapping[str, torch.Tensor],
                         stats: Mapping[str, ChannelStats], space: CandidateSpace, max_rows: int,
                         progress: ProgressFn, workers: int) -> None:
    """gptq candidates for every tensor that has a Hessian. Tensors sharing one Hessian
    (q/k/v, gate/up) form one job that factors it once; jobs run on ``workers`` threads
    (each sweep is many small single-threaded torch ops, which release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from ..gptq import prepare_hessian

    groups: dict[int, list[TensorChoice]] = {}
    for choice in choices:
        item = stats.get(choice.name)
        if item is not None and item.hessian is not None and gptq_configurations(choice, space):
            groups.setdefault(id(item.hessian), []).append(choice)

    def job(group: list[TensorChoice]) -> int:
        prepared = prepare_hessian(stats[group[0].name].hessian)
        for choice in group:
            try:
                evaluate_gptq(choice, weights[choice.name], stats[choice.name], space, max_rows=max_rows,
                              prepared=prepared)
            except UMQError as exc:
                raise exc.located(tensor=choice.name)
        return len(group)

    done = 0
    total = sum(len(g) for g in groups.values())
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for finished in pool.map(job, groups.values()):
            done += finished
            progress("search gptq", done, total)


def search_recipe(
    weights: Mapping[str, torch.Tensor],
    stats: Mapping[str, ChannelStats] | None,
    *,
    budget_bits: float | None = None,
    max_rel_error: float | None = None,
    space: CandidateSpace = CandidateSpace(),
    max_rows: int = 0,
    threads: int | None = 1,
    progress: ProgressFn = no_progress,
) -> SearchResult:
    """Evaluate every candidate for every weight and allocate bits across the model.

    ``weights``: name -> 2-D float tensor (only the tensors to quantize; may be a lazy
    mapping that reads each tensor when asked, see :class:`CheckpointWeights`). ``stats``: name ->
    :class:`ChannelStats` (``None`` or a missing name: weights only, a_j = 1). Exactly one
    of ``budget_bits`` (average stored bits per element over these tensors) and
    ``max_rel_error`` (per tensor) must be given.

    ``threads``: torch intra-op threads during the search (restored afterwards; ``None``
    leaves them alone). The default is 1: the torch reference path runs many small
    element-wise ops, which gain nothing from threads and, on a busy machine, lose
    10-40x to OpenMP workers spinning for a core (measured on 2 shared cores: 1.0 s
    against 10-55 s per MiniLM tensor). The fused error pass, which does almost all of
    the work, runs its rows on the thread count torch had before (one parallel loop
    per tensor, no such stalls).
    """
    if (budget_bits is None) == (max_rel_error is None):
        raise UMQError("give exactly one of budget_bits and max_rel_error", rule="target")
    choices = []
    total = len(weights)
    fused_threads = torch.get_num_threads()
    with torch_threads(threads):
        for i, name in enumerate(weights):
            weight = weights[name]  # a lazy mapping reads one tensor at a time
            item = None if stats is None else stats.get(name)
            if item is not None and item.channels != weight.shape[1]:
                raise UMQError(f"statistics have {item.channels} channels, the weight has {weight.shape[1]} columns",
                               rule="activation-stats", tensor=name)
            try:
                choices.append(evaluate_tensor(name, weight, item, space, max_rows=max_rows,
                                               fused_threads=fused_threads))
            except UMQError as exc:
                raise exc.located(tensor=name)
            progress("search", i + 1, total)
    if not choices:
        raise UMQError("no quantizable tensors", rule="plan")

    def allocate() -> None:
        if budget_bits is not None:
            allocate_budget(choices, budget_bits)
        else:
            allocate_max_error(choices, max_rel_error)

    allocate()
    if Method.GPTQ in space.methods and stats is not None:
        # Error feedback around the rtn allocation, then allocate again with both.
        with torch_threads(threads):  # many small ops per column: one torch thread (see above) per worker
            _add_gptq_candidates(choices, weights, stats, space, max_rows, progress, workers=fused_threads)
        allocate()
    mode, target = ("budget", budget_bits) if budget_bits is not None else ("max-error", max_rel_error)
    explain(choices)
    have = stats is not None and any(c.name in stats for c in choices)
    return SearchResult(choices, mode, float(target), "activations" if have else "weights-only")
