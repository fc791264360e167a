"""Loading the Hugging Face model that calibration runs (local files only, float32, CPU)."""

from __future__ import annotations

from pathlib import Path

from .._optional import require


def _require_transformers():
    return require(
        "transformers",
        extra="hf",
        purpose="collecting activation statistics",
        hint="or pass --stats from an earlier run, or calibrate on weights alone",
    )


def is_hf_model_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def load_hf_model(model_dir: str | Path):
    """``(model, tokenizer)`` from a local Hugging Face model directory, float32, on the
    CPU, in eval mode (:func:`umqcli.integrations.transformers.load_dense_model`)."""
    _require_transformers()
    from ..integrations.transformers import load_dense_model

    return load_dense_model(model_dir)
