"""Explanation writing: why each tensor got its configuration, and the recipe file that
carries the choices, their predicted errors and those reasons to ``umq pack --recipe``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ..stats import OUTLIER_THRESHOLD
from .candidates import ERROR_METRIC, TensorChoice

if TYPE_CHECKING:
    from ..recipe import Recipe
    from .search import SearchResult


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
            plural = "" if c.outlier_channels == 1 else "s"
            facts.append(f"{c.outlier_channels} outlier input channel{plural} (|x|>{OUTLIER_THRESHOLD:g})")
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


def to_recipe(result: SearchResult, *, source: str, stats_file: str | None = None,
              stats_sha256: str | None = None) -> "Recipe":
    """The :class:`~umqcli.recipe.Recipe` for ``umq pack --recipe``: one entry per searched
    tensor with its parameters, predicted error, bits and reason."""
    from ..recipe import Recipe, RecipeEntry

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
            "error_metric": ERROR_METRIC,
        }
    }
    if stats_file is not None:
        extra["stats"] = stats_file
    if stats_sha256 is not None:
        extra["stats_sha256"] = stats_sha256
    return Recipe(
        tensors=tensors,
        budget_bits=result.target if result.mode == "budget" else None,
        source=source,
        extra=extra,
    )
