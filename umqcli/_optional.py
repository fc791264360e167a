"""Optional dependencies: import them where a feature needs them, or say which extra to
install (a UMQError, so the CLI prints one line and exits 2 instead of a traceback)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
from types import ModuleType
from typing import Iterator

from .errors import UMQError


def require(module: str, *, extra: str, purpose: str, hint: str = "") -> ModuleType:
    """Import ``module`` or raise ``UMQError(rule="missing-dependency")`` naming the
    ``umq[extra]`` that provides it, what it is needed for, and ``hint``: another way."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UMQError(
            f"{purpose} needs the '{module.split('.')[0]}' package: pip install 'umq[{extra}]'"
            + (f" ({hint})" if hint else ""),
            rule="missing-dependency",
        ) from None


# CuPy ships one wheel per CUDA major, all importing as `cupy`; the right one is the one
# matching the machine's CUDA, so umq accepts any of them and names both extras.
CUPY_DISTRIBUTIONS = ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy")
CUPY_EXTRAS = {"cuda": "cupy-cuda12x", "cuda13": "cupy-cuda13x"}


def cupy_distribution() -> str | None:
    """The installed distribution that provides ``cupy`` (e.g. ``cupy-cuda13x``), or None."""
    for name in CUPY_DISTRIBUTIONS:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        return name
    return None


def require_cupy(purpose: str) -> ModuleType:
    """``import cupy`` from whichever CUDA build is installed, or a UMQError naming the
    extras (``umq[cuda]`` for CUDA 12, ``umq[cuda13]`` for CUDA 13)."""
    try:
        return importlib.import_module("cupy")
    except ImportError as exc:
        installed = cupy_distribution()
        found = f"; {installed} is installed but does not import ({exc})" if installed else ""
        choices = " or ".join(f"'umq[{extra}]' ({package})" for extra, package in CUPY_EXTRAS.items())
        raise UMQError(f"{purpose} needs CuPy: pip install {choices}{found}", rule="missing-dependency") from None


@contextlib.contextmanager
def transformers_quiet() -> Iterator[None]:
    """transformers with its own progress bars ("Loading weights", "Writing model
    shards") off: the library prints nothing; the CLI draws its own bar. Restores the
    previous setting afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
