"""The Pareto front of (bits, error): what neither ``umq compare`` nor the calibration
search should ever prefer over something cheaper and at least as accurate."""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

T = TypeVar("T")


def pareto_front(items: Iterable[T], *, bits: Callable[[T], float], error: Callable[[T], float],
                 rtol: float = 0.0) -> list[T]:
    """The items no other item dominates, cheapest first (equal bits: lower error first,
    then input order). ``q`` dominates ``p`` when ``bits(q) <= bits(p)`` and
    ``error(q) <= error(p) * (1 + rtol)``, and ``q`` is strictly cheaper or strictly
    (beyond ``rtol``) more accurate; identical points do not dominate each other, so
    both stay. ``rtol`` > 0 keeps a costlier item off the front when it is only
    marginally more accurate."""
    points = sorted(((bits(x), error(x), i, x) for i, x in enumerate(items)), key=lambda p: p[:3])
    front = []
    for b, e, i, x in points:
        dominated = any(
            j != i and b2 <= b and e2 <= e * (1 + rtol) and (b2 < b or e2 * (1 + rtol) < e)
            for b2, e2, j, _ in points
        )
        if not dominated:
            front.append(x)
    return front
