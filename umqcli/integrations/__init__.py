"""Integrations with other libraries, each imported only when that library is in use.

``umqcli.integrations.transformers`` holds the ``"umq"`` quantization method of Hugging
Face transformers. Importing ``umqcli`` calls :func:`register_when_transformers_loads`,
which costs no transformers import: it registers at once when transformers' quantizer
table is already loaded, else it waits for that module's first import (a one-name
``sys.meta_path`` finder) and registers right after it runs. A plain
``AutoModelForCausalLM.from_pretrained(packed_dir)`` then uses the umq quantizer.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
import warnings

# transformers' table of quantization methods (AUTO_QUANTIZER_MAPPING lives here); every
# from_pretrained imports it before reading a quantization_config.
TRANSFORMERS_QUANTIZER_TABLE = "transformers.quantizers.auto"

_HOOK_LOCK = threading.Lock()


def _register_transformers() -> None:
    from .transformers import register

    register()


def _register_transformers_quietly() -> None:
    """The import-time follow-up: a failure here must not break ``import transformers``
    for everything else; it is reported as a warning and again, as an error, by
    ``load_hf`` (which registers explicitly)."""
    if f"{__name__}.transformers" in sys.modules:
        return  # that module is importing transformers now and registers when it finishes
    try:
        _register_transformers()
    except Exception as exc:  # noqa: BLE001 - any failure, re-raised by load_hf's own register()
        warnings.warn(f"umq could not register its transformers quantizer: {exc}", RuntimeWarning, stacklevel=2)


class _RunAfterImport(importlib.abc.Loader):
    """Wraps the real loader of one module: runs it, then the follow-up."""

    def __init__(self, loader: importlib.abc.Loader, follow_up) -> None:
        self._loader = loader
        self._follow_up = follow_up

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._follow_up()

    def __getattr__(self, name: str):  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, name)


class _TransformersQuantizerWatch(importlib.abc.MetaPathFinder):
    """Finds nothing itself; for transformers' quantizer table it lends the spec the other
    finders give, with a loader that registers umq right after the module runs."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TRANSFORMERS_QUANTIZER_TABLE:
            return None
        _remove_watch(self)  # once: from here on the module is in sys.modules
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RunAfterImport(spec.loader, _register_transformers_quietly)
        return spec


def _remove_watch(watch: _TransformersQuantizerWatch) -> None:
    with _HOOK_LOCK:
        if watch in sys.meta_path:
            sys.meta_path.remove(watch)


def register_when_transformers_loads() -> None:
    """Make ``from_pretrained`` know ``quant_method: "umq"`` without importing transformers now."""
    with _HOOK_LOCK:
        if any(isinstance(finder, _TransformersQuantizerWatch) for finder in sys.meta_path):
            return
        if TRANSFORMERS_QUANTIZER_TABLE not in sys.modules:
            sys.meta_path.insert(0, _TransformersQuantizerWatch())
            return
    _register_transformers()
