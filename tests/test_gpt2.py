"""GPT-2 style ``Conv1D`` weights and tied embeddings through pack and both load paths.

``transformers.pytorch_utils.Conv1D`` stores its weight ``[in, out]`` (y = x @ W + b).
``umq pack`` packs the tensor as stored (FORMAT v1 is layout-agnostic: groups of 8 then
run along output channels, one scale per input channel); it is no ``nn.Linear``, so the
loader decodes it into the module's dense ``[in, out]`` parameter (docs/pack.md, "GPT-2
Conv1D and tied embeddings"). The tiny GPT-2 is randomly initialised, structure only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import umqcli
from umqcli.codec import dequantize
from umqcli.format import QuantParams
from umqcli.io import open_checkpoint
from umqcli.pack import pack

transformers = pytest.importorskip("transformers")
integration = pytest.importorskip("umqcli.integrations.transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

CONV1D_WEIGHTS = {  # name -> stored shape [in, out]
    f"transformer.h.{i}.{name}.weight": shape
    for i in range(2)
    for name, shape in (("attn.c_attn", (64, 192)), ("attn.c_proj", (64, 64)),
                        ("mlp.c_fc", (64, 256)), ("mlp.c_proj", (256, 64)))
}
TOKENS = (torch.arange(48).reshape(2, 24) * 37 + 5) % 256


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("gpt2") / "src"
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(directory)
    return directory


def _dense_with_dequantized(src: Path, packed_dir: Path) -> torch.nn.Module:
    """The dense source model with every packed tensor replaced by its ``dequantize``."""
    model = transformers.GPT2LMHeadModel.from_pretrained(src).eval()
    params = dict(model.named_parameters(remove_duplicate=False))
    with open_checkpoint(packed_dir) as checkpoint, torch.no_grad():
        for name in checkpoint.specs:
            params[name].copy_(dequantize(checkpoint.packed(name), torch.float32))
    return model


def _loaders(packed_dir: Path):
    yield "load_hf", umqcli.load_hf(packed_dir)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(packed_dir, output_loading_info=True)
    # Tensors decoded after loading are neither reported MISSING ("newly initialized")
    # nor their packed parts UNEXPECTED.
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    yield "from_pretrained", model.eval()


def test_conv1d_packed_as_stored_and_decoded_in_its_layout(gpt2_dir, tmp_path):
    out = tmp_path / "packed"
    summary = pack(gpt2_dir, out, params=QuantParams(lo="int8"))
    assert {t.name: t.shape for t in summary.packed} == CONV1D_WEIGHTS
    reasons = {t.name: t.reason for t in summary.passthrough}
    assert reasons["transformer.wte.weight"].startswith("default exclusion *wte*")
    assert reasons["transformer.wpe.weight"].startswith("default exclusion *wpe*")
    with open_checkpoint(out) as checkpoint:
        assert {n: s.shape for n, s in checkpoint.specs.items()} == CONV1D_WEIGHTS
        decoded = {n: dequantize(checkpoint.packed(n), torch.float32) for n in checkpoint.specs}
    source = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    reference = _dense_with_dequantized(gpt2_dir, out)
    with torch.no_grad():
        expected = reference(TOKENS).logits
        assert not torch.equal(expected, source(TOKENS).logits)  # quantization did change the model
        for how, model in _loaders(out):
            for name, weight in decoded.items():
                layer = model.get_submodule(name.removesuffix(".weight"))
                assert isinstance(layer, Conv1D), (how, name)
                assert torch.equal(layer.weight, weight), (how, name)  # [in, out], exact
            # Same weights, same ops: the logits are bit-identical, not merely close.
            assert torch.equal(model(TOKENS).logits, expected), how


def test_tied_lm_head_follows_the_token_embedding(gpt2_dir, tmp_path):
    source = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    # Default: wte passes through 16-bit (exclusion), lm_head is not stored and stays tied.
    default = tmp_path / "default"
    pack(gpt2_dir, default)
    for how, model in _loaders(default):
        assert model.lm_head.weight is model.transformer.wte.weight, how
        assert torch.equal(model.lm_head.weight, source.transformer.wte.weight), how
    # --include '*wte*' (plus the blocks): wte is packed, decoded on load, and lm_head
    # (the same parameter) carries the decoded values too.
    with_wte = tmp_path / "with_wte"
    summary = pack(gpt2_dir, with_wte, include=["*wte*", "*.h.*"])
    assert "transformer.wte.weight" in {t.name for t in summary.packed}
    assert "lm_head.weight" not in {t.name for t in summary.tensors}  # tied: never stored
    reference = _dense_with_dequantized(gpt2_dir, with_wte)
    assert not torch.equal(reference.transformer.wte.weight, source.transformer.wte.weight)
    with torch.no_grad():
        expected = reference(TOKENS).logits
        for how, model in _loaders(with_wte):
            assert model.lm_head.weight is model.transformer.wte.weight, how
            assert torch.equal(model.lm_head.weight, reference.transformer.wte.weight), how
            assert torch.equal(model(TOKENS).logits, expected), how
