"""Shared fixtures for the umq test suite.

The conformance vectors live in ``shared/vectors`` beside the repository (CI clones
``main`` with ``shared/`` next to it). They are the independent truth the codec is
measured against, so their absence is a failure, never a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The CLI's consoles are made when umqcli.cli is first imported: a COLUMNS inherited from
# the shell (or set by a CI runner) would reflow the tables the CLI tests read (tensor
# names, headers). Without it, captured output gets the CLI's fixed piped width.
os.environ.pop("COLUMNS", None)

REPO_ROOT = Path(__file__).resolve().parents[1]
# UMQ_VECTORS_DIR lets a checkout that is not laid out like CI point at the vectors.
VECTORS_DIR = Path(os.environ.get("UMQ_VECTORS_DIR", REPO_ROOT.parent / "shared" / "vectors"))


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    """``Path`` of the FORMAT v1 conformance vectors (``../shared/vectors``); fails loudly
    when they are missing so that no conformance test is silently skipped."""
    if not (VECTORS_DIR / "source.safetensors").is_file():
        pytest.fail(
            f"conformance vectors not found at {VECTORS_DIR} (expected shared/vectors beside "
            f"the repository root {REPO_ROOT}, or UMQ_VECTORS_DIR)",
            pytrace=False,
        )
    return VECTORS_DIR


def _load_example(name: str):
    """Import ``examples/<name>.py`` by path (examples/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"umq_example_{name}", REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def smollm2():
    """The ``examples/smollm2.py`` module: ``cached_dir()``, ``convert()``, ``prose_split()``."""
    return _load_example("smollm2")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2) -> Path:
    """SmolLM2-135M-Instruct as bfloat16 safetensors, converted once into ~/.cache/umq."""
    return smollm2.cached_dir()
