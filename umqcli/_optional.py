"""Optional dependencies: import them where a feature needs them, or say which extra to
install (a UMQError, so the CLI prints one line and exits 2 instead of a traceback)."""

from __future__ import annotations

import importlib
from types import ModuleType

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
