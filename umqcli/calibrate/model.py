"""Loading the Hugging Face model that calibration runs (local files only, float32, CPU)."""

from __future__ import annotations

from pathlib import Path

import torch

from .._optional import require, transformers_quiet
from ..errors import UMQError


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
    CPU, in eval mode. Uses the architecture named in ``config.json`` (so heads such as
    ``lm_head`` are hooked too), falling back to ``AutoModel``. Never touches the network."""
    transformers = _require_transformers()
    model_dir = Path(model_dir)
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        model_cls = transformers.AutoModel
        for arch in getattr(config, "architectures", None) or []:
            if hasattr(transformers, arch):
                model_cls = getattr(transformers, arch)
                break
        with transformers_quiet():  # no "Loading weights" bar: the core prints nothing
            model = model_cls.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UMQError(f"cannot load the model or tokenizer with transformers ({exc})",
                       rule="model-load", file=model_dir) from None
    model.eval()
    return model, tokenizer
