"""Recipes: per-tensor quantization parameters, as ``umq calibrate`` writes them and
``umq pack --recipe`` reads them.

A recipe is a human-readable, versioned JSON file::

    {
      "umq_recipe": 1,
      "format_version": 1,
      "defaults": {"k": 1, "lo": "fp8_e4m3", "hi": "auto", "block": 0,
                   "selection": "magnitude", "scale_rule": "absmax"},
      "budget_bits": 10.0,                      # optional, informational
      "source": "all-MiniLM-L6-v2",             # optional, informational
      "tensors": {
        "encoder.layer.0.attention.self.query.weight": {
          "params": {"k": 2, "lo": "fp8_e4m3", "hi": "auto", "block": 128,
                     "selection": "activation", "scale_rule": "absmax"},
          "predicted_rel_error": 0.0123,        # float or null
          "bits_per_element": 11.25,            # payload + mask + scale bits (FORMAT §6)
          "reason": "3 outlier input channels; k=2 halves the output error"
        },
        "pooler.dense.weight": {"params": null, "reason": "kept 16-bit: too sensitive"}
      }
    }

- ``umq_recipe`` is the schema version (this module reads and writes 1).
- ``defaults`` (optional) are the parameters for tensors the recipe does not name; flags
  given on the ``umq pack`` command line take precedence over them.
- ``params: null`` means "do not quantize this tensor" (it passes through, with ``reason``).
- Unknown top-level keys are kept in :attr:`Recipe.extra` (round-tripped), unknown keys
  inside an entry are refused: a typo must not silently change what gets packed.
- ``stats`` / ``stats_sha256`` (written by ``umq calibrate``): the activation statistics
  the recipe was calibrated with, as a path relative to the recipe file, and the SHA-256
  of their bytes. ``umq pack --recipe`` uses that file when no other is given, and
  refuses statistics whose hash differs (:meth:`Recipe.statistics_file`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import UMQError
from .format import FORMAT_VERSION, Method, QuantParams, ScaleRule, Selection

RECIPE_VERSION = 1
_ENTRY_KEYS = {"params", "predicted_rel_error", "bits_per_element", "reason"}


@dataclass(frozen=True)
class RecipeEntry:
    """What the recipe says about one tensor.

    - ``params``: its parameters, or ``None`` to leave it unquantized.
    - ``predicted_rel_error``: the calibration's predicted relative output (or weight)
      error for these parameters, ``None`` when not predicted.
    - ``bits_per_element``: stored bits per element (payload + mask + scale), ``None`` if
      unknown (e.g. hand-written recipes; pack computes the real value anyway).
    - ``reason``: one human sentence on why these parameters.
    """

    params: QuantParams | None
    predicted_rel_error: float | None = None
    bits_per_element: float | None = None
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "params": None if self.params is None else self.params.to_json(),
            "predicted_rel_error": self.predicted_rel_error,
            "bits_per_element": self.bits_per_element,
            "reason": self.reason,
        }


@dataclass
class Recipe:
    """Per-tensor :class:`QuantParams` (``tensors``) plus defaults for the others."""

    tensors: dict[str, RecipeEntry] = field(default_factory=dict)
    defaults: QuantParams | None = None
    budget_bits: float | None = None
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)  # the file it was loaded from

    @property
    def uses_activations(self) -> bool:
        """Whether some tensor (or the defaults) needs the statistics: activation or
        saliency selection, the gptq method, or Hessian-weighted clipping."""
        params = [p for p in [e.params for e in self.tensors.values()] + [self.defaults] if p is not None]
        return any(p.selection in (Selection.ACTIVATION, Selection.SALIENCY) or p.method is Method.GPTQ
                   or p.scale_rule is ScaleRule.CLIP_HESSIAN for p in params)

    def statistics_file(self, given: str | Path | None = None) -> Path | None:
        """The activation statistics to pack with: ``given``, else (when some tensor
        needs them) the file recorded at calibration, relative to the recipe file. Either
        must hash to the recorded ``stats_sha256`` when the recipe has one."""
        recorded, digest = self.extra.get("stats"), self.extra.get("stats_sha256")
        if given is None:
            if not isinstance(recorded, str) or not self.uses_activations:
                return None
            given = (self.path.parent if self.path is not None else Path()) / recorded
            if not Path(given).is_file():
                raise UMQError("the activation statistics this recipe was calibrated with are missing",
                               rule="stats-file", file=given, hint="give the statistics file")
        given = Path(given)
        if isinstance(digest, str):
            from .stats import stats_sha256

            actual = stats_sha256(given)
            if actual != digest:
                raise UMQError(
                    f"not the statistics the recipe {self.path or ''} was calibrated with (sha256 {actual[:12]}..., "
                    f"the recipe records {digest[:12]}...)", rule="stats-mismatch", file=given)
        return given

    def params_for(self, name: str, default: QuantParams | None) -> QuantParams | None:
        """The parameters for tensor ``name``: its entry's (``None`` = keep unquantized),
        else ``default`` (the caller's defaults, e.g. from CLI flags), else the recipe's."""
        entry = self.tensors.get(name)
        if entry is not None:
            return entry.params
        return default if default is not None else self.defaults

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"umq_recipe": RECIPE_VERSION, "format_version": FORMAT_VERSION}
        if self.defaults is not None:
            obj["defaults"] = self.defaults.to_json()
        if self.budget_bits is not None:
            obj["budget_bits"] = self.budget_bits
        if self.source is not None:
            obj["source"] = self.source
        obj.update(self.extra)
        obj["tensors"] = {name: entry.to_json() for name, entry in self.tensors.items()}
        return obj

    def save(self, path: str | Path) -> Path:
        """Write the recipe as indented JSON, atomically (temp file + rename)."""
        from .io import atomic_output

        path = Path(path)
        text = json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"
        with atomic_output(path, force=True) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, obj: Any, *, file: str | Path | None = None) -> "Recipe":
        """Parse and validate; every problem is a :class:`UMQError` with rule ``recipe``."""

        def fail(message: str, tensor: str | None = None) -> UMQError:
            return UMQError(message, rule="recipe", file=file, tensor=tensor)

        if not isinstance(obj, dict):
            raise fail("a recipe is a JSON object")
        if "umq_recipe" not in obj:
            raise fail('not a umq recipe (no "umq_recipe" version key)')
        version = obj["umq_recipe"]
        if version != RECIPE_VERSION:
            raise fail(f"recipe version {version!r} is not supported (this umq reads {RECIPE_VERSION})")
        fmt = obj.get("format_version", FORMAT_VERSION)
        if fmt != FORMAT_VERSION:
            raise fail(f"recipe targets FORMAT v{fmt}, this umq writes v{FORMAT_VERSION}")
        defaults = None
        if obj.get("defaults") is not None:
            defaults = _params(obj["defaults"], fail, None)
        tensors_obj = obj.get("tensors")
        if not isinstance(tensors_obj, dict):
            raise fail('"tensors" must be an object mapping tensor names to entries')
        tensors: dict[str, RecipeEntry] = {}
        for name, entry in tensors_obj.items():
            if not isinstance(entry, dict) or "params" not in entry:
                raise fail('entry must be an object with a "params" key', name)
            unknown = set(entry) - _ENTRY_KEYS
            if unknown:
                raise fail(f"unknown entry key(s) {sorted(unknown)}", name)
            params = None if entry["params"] is None else _params(entry["params"], fail, name)
            error = _number(entry.get("predicted_rel_error"), "predicted_rel_error", fail, name)
            bits = _number(entry.get("bits_per_element"), "bits_per_element", fail, name)
            reason = entry.get("reason", "")
            if not isinstance(reason, str):
                raise fail("reason must be a string", name)
            tensors[name] = RecipeEntry(params, error, bits, reason)
        budget = _number(obj.get("budget_bits"), "budget_bits", fail, None)
        source = obj.get("source")
        known = {"umq_recipe", "format_version", "defaults", "tensors", "budget_bits", "source"}
        extra = {k: v for k, v in obj.items() if k not in known}
        return cls(tensors=tensors, defaults=defaults, budget_bits=budget,
                   source=None if source is None else str(source), extra=extra)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.exists():
            raise UMQError("no such recipe file", rule="missing", file=path)
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UMQError(f"recipe is not valid JSON ({exc})", rule="recipe", file=path) from None
        recipe = cls.from_json(obj, file=path)
        recipe.path = path
        return recipe


def _params(obj: Any, fail, tensor: str | None) -> QuantParams:
    if not isinstance(obj, Mapping):
        raise fail("params must be an object", tensor)
    try:
        return QuantParams.from_json(obj)
    except UMQError as exc:
        raise fail(f"bad params: {exc.message}", tensor) from None
    except TypeError as exc:
        raise fail(f"bad params: {exc}", tensor) from None


def _number(value: Any, what: str, fail, tensor: str | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(f"{what} must be a finite number or null, got {value!r}", tensor)
    return float(value)
