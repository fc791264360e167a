"""Which tensors get quantized, with which parameters, and why the others pass through.

A tensor is *quantizable* when it is 2-D, float32 / float16 / bfloat16, non-empty, and its
column count (input features, the matmul's reduction axis) divides by 8. Of those,
``umq pack`` quantizes every one except the default exclusions below, narrowed by
``--include`` and widened by ``--exclude``; a recipe gives per-tensor parameters. Every
tensor that is not quantized passes through byte for byte, and the plan says why.

Default exclusions (``DEFAULT_EXCLUSIONS``), because umq targets the weights of matmuls:

- ``*embed*``, ``*wte*``, ``*wpe*``: embedding tables (token, position, token-type). They
  are row lookups, not matmuls: no kernel multiplies by them, each token reads one row,
  and their rows are the model's vocabulary — a quantized row is an error every time that
  token appears. In small models they are also where most parameters are, so keeping
  them 16-bit is a visible size choice: pack them with ``--include '*embeddings*'``.
- ``lm_head*``: the output projection. It is often tied to the token embedding (the same
  tensor) and its errors land directly on the logits.

Patterns are shell globs on the full tensor name (``fnmatch``, case-sensitive, ``*``
crosses dots) or, with a ``re:`` prefix, Python regular expressions searched anywhere in
the name (``re:layer\\.(0|1)\\.``). Rules, in order:

1. ``--exclude`` wins over everything.
2. With ``--include``, only matching tensors are quantized; an ``--include`` match also
   lifts the default exclusions (``--include '*embeddings*'`` packs embeddings).
3. A recipe entry names its tensor explicitly: it lifts the default exclusions too, and its
   ``params`` (``null`` = keep 16-bit) replace the defaults. A recipe that names a tensor
   the checkpoint lacks, or one that cannot be quantized, is an error (a stale recipe must
   not silently pack something else).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from .errors import UMQError
from .format import GROUP, QuantParams, TensorSpec
from .io import Checkpoint, TensorEntry
from .recipe import Recipe, RecipeEntry

FLOAT_CODES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

DEFAULT_EXCLUSIONS: dict[str, str] = {
    "*embed*": "embedding table: a row lookup, not a matmul (pack it with --include)",
    "*wte*": "token embedding table (GPT-2 naming): a row lookup, not a matmul",
    "*wpe*": "position embedding table (GPT-2 naming): a row lookup, not a matmul",
    "lm_head*": "output projection: often tied to the embeddings, errors land on the logits",
}


class Pattern:
    """A tensor-name pattern: a glob, or a regex after ``re:``."""

    def __init__(self, text: str) -> None:
        self.text = text
        if text.startswith("re:"):
            try:
                self._regex = re.compile(text[3:])
            except re.error as exc:
                raise UMQError(f"bad regular expression {text[3:]!r}: {exc}", rule="pattern") from None
        else:
            self._regex = re.compile(fnmatch.translate(text))

    def matches(self, name: str) -> bool:
        if self.text.startswith("re:"):
            return self._regex.search(name) is not None
        return self._regex.match(name) is not None

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"


def _first_match(patterns: Sequence[Pattern], name: str) -> Pattern | None:
    return next((p for p in patterns if p.matches(name)), None)


@dataclass(frozen=True)
class TensorPlan:
    """The decision for one stored tensor of the source.

    ``params`` is ``None`` for a pass-through; ``reason`` says why (pass-through) or where
    the parameters come from (``"flags"``, ``"recipe"``, ``"recipe defaults"``).
    """

    name: str
    entry: TensorEntry
    params: QuantParams | None
    reason: str
    predicted_rel_error: float | None = None

    @property
    def quantize(self) -> bool:
        return self.params is not None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape

    @property
    def bytes_in(self) -> int:
        return self.entry.nbytes

    def stored_shapes(self) -> dict[str, tuple[int, int]]:
        """Shapes of the three stored tensors (they depend only on shape, k and block)."""
        assert self.params is not None
        return self.placeholder_spec().stored_shapes()

    def placeholder_spec(self) -> TensorSpec:
        """A spec with this tensor's shapes and the widest possible JSON (crc32 = 2^32-1,
        hi = bfloat16): the writer reserves header room from it."""
        assert self.params is not None
        rows, cols = self.entry.shape
        return TensorSpec(
            shape=(rows, cols),
            dtype=FLOAT_CODES[self.entry.dtype],
            k=self.params.k,
            lo=self.params.lo,
            hi=self.params.hi or _widest_hi(),
            block=self.params.resolve_block(cols),
            selection=self.params.recorded_selection,
            scale_rule=self.params.scale_rule.value,
            crc32={"data": 2**32 - 1, "mask": 2**32 - 1, "scale": 2**32 - 1},
        )

    @property
    def bytes_out(self) -> int:
        return self.placeholder_spec().stored_bytes if self.params is not None else self.entry.nbytes


def _widest_hi():
    from .format import HiFormat

    return HiFormat.BFLOAT16  # "bfloat16" is the longer name


@dataclass
class Plan:
    """Decisions for every stored tensor, in checkpoint order."""

    tensors: list[TensorPlan] = field(default_factory=list)

    @property
    def packed(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.quantize]

    @property
    def passthrough(self) -> list[TensorPlan]:
        return [t for t in self.tensors if not t.quantize]

    @property
    def bytes_in(self) -> int:
        return sum(t.bytes_in for t in self.tensors)

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {
                "name": t.name,
                "dtype": t.entry.dtype,
                "shape": list(t.shape),
                "action": "pack" if t.quantize else "pass",
                "params": None if t.params is None else t.params.to_json(),
                "reason": t.reason,
            }
            for t in self.tensors
        ]


def quantizable(entry: TensorEntry) -> str | None:
    """``None`` if the tensor can be quantized, else the reason it cannot."""
    if entry.dtype not in FLOAT_CODES:
        return f"dtype {entry.dtype} is not a float type umq quantizes (F32, F16, BF16)"
    if len(entry.shape) != 2:
        return f"{len(entry.shape)}-D; only 2-D matrices are quantized"
    rows, cols = entry.shape
    if rows == 0 or cols == 0:
        return f"empty (shape {list(entry.shape)})"
    if cols % GROUP:
        return f"column count {cols} is not a multiple of {GROUP}"
    return None


def make_plan(
    checkpoint: Checkpoint,
    defaults: QuantParams = QuantParams(),
    *,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    recipe: Recipe | None = None,
    default_exclusions: Mapping[str, str] = DEFAULT_EXCLUSIONS,
) -> Plan:
    """Decide every tensor of ``checkpoint`` (see the module docstring for the rules).

    Raises :class:`UMQError` for an already-packed source (rule ``already-packed``), a bad
    pattern (``pattern``) and a recipe entry that names a missing or unquantizable tensor
    or whose block does not divide its columns (``recipe-tensor``).
    """
    if checkpoint.specs:
        raise UMQError(
            f"already packed ({len(checkpoint.specs)} umq tensors); pack the original checkpoint",
            rule="already-packed", file=checkpoint.path,
        )
    includes = [Pattern(p) for p in include]
    excludes = [Pattern(p) for p in exclude]
    default_ex = [(Pattern(p), why) for p, why in default_exclusions.items()]
    recipe_entries = recipe.tensors if recipe is not None else {}
    _check_recipe_entries(checkpoint, recipe_entries)
    recipe_defaults = recipe.defaults if recipe is not None else None
    plan = Plan()
    for name in checkpoint.names():
        plan.tensors.append(_decide(name, checkpoint.entry(name), defaults, includes, excludes, default_ex,
                                    recipe_entries, recipe_defaults))
    return plan


def _check_recipe_entries(checkpoint: Checkpoint, recipe_entries: Mapping[str, RecipeEntry]) -> None:
    """Every tensor a recipe names exists, and the quantized ones can be (rule
    ``recipe-tensor``: 2-D float, a block that divides the columns)."""
    for name, item in recipe_entries.items():
        if name not in checkpoint:
            raise UMQError("the recipe names a tensor this checkpoint does not have",
                           rule="recipe-tensor", file=checkpoint.path, tensor=name)
        why_not = quantizable(checkpoint.entry(name))
        if item.params is not None and why_not:
            raise UMQError(f"the recipe quantizes it, but it is {why_not}",
                           rule="recipe-tensor", file=checkpoint.path, tensor=name)
        if item.params is not None:
            try:
                item.params.resolve_block(checkpoint.entry(name).shape[1])
            except UMQError as exc:
                raise exc.located(file=checkpoint.path, tensor=name)


def _decide(name: str, entry: TensorEntry, defaults: QuantParams, includes: list[Pattern], excludes: list[Pattern],
            default_ex: list[tuple[Pattern, str]], recipe_entries: Mapping[str, RecipeEntry],
            recipe_defaults: QuantParams | None) -> TensorPlan:
    """One tensor's fate, first rule that applies wins (see the module docstring)."""

    def passthrough(reason: str) -> TensorPlan:
        return TensorPlan(name, entry, None, reason)

    why_not = quantizable(entry)
    if why_not:
        return passthrough(why_not)
    hit = _first_match(excludes, name)
    if hit:
        return passthrough(f"excluded by the pattern {hit.text}")
    item = recipe_entries.get(name)
    if item is not None:
        if item.params is None:
            return passthrough(f"recipe keeps it 16-bit{': ' + item.reason if item.reason else ''}")
        return TensorPlan(name, entry, item.params, "recipe", item.predicted_rel_error)
    included = _first_match(includes, name)
    if includes and not included:
        return passthrough("not matched by any include pattern")
    if not included:
        default_hit = next(((p, why) for p, why in default_ex if p.matches(name)), None)
        if default_hit:
            return passthrough(f"default exclusion {default_hit[0].text}: {default_hit[1]}")
    cols = entry.shape[1]
    block = defaults.block or cols
    if cols % block:
        return passthrough(f"block {block} does not divide its {cols} columns")
    return TensorPlan(name, entry, defaults, "recipe defaults" if recipe_defaults is defaults else "flags")
