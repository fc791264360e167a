"""The transformers integration (umqcli/integrations/transformers.py): registration on
``import umqcli``, plain ``from_pretrained`` of packed directories, models whose
``_init_weights`` touches child weights by name (CLIP)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from umqcli.errors import UMQError
from umqcli.format import QuantParams
from umqcli.io import open_checkpoint
from umqcli.nn import UMQLinear, quantize_model, umq_linears
from umqcli.pack import pack

transformers = pytest.importorskip("transformers")
integration = pytest.importorskip("umqcli.integrations.transformers")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _tiny_llama(directory: Path) -> Path:
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(directory)
    return directory


def _tiny_clip(directory: Path) -> Path:
    transformers.logging.set_verbosity_error()
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).eval().save_pretrained(directory)
    return directory


def _assert_holds_file_bytes(model: torch.nn.Module, packed_dir: Path) -> int:
    """Every packed tensor of the file sits, byte for byte, in a UMQLinear of ``model``."""
    layers = {f"{name}.weight": layer for name, layer in umq_linears(model)}
    with open_checkpoint(packed_dir) as checkpoint:
        assert set(checkpoint.specs) == set(layers)
        for name in checkpoint.specs:
            stored, held = checkpoint.packed(name), layers[name].packed
            assert torch.equal(stored.data, held.data) and torch.equal(stored.mask, held.mask), name
            assert torch.equal(stored.scale, held.scale), name
    return len(layers)


def test_import_umqcli_registers_for_a_plain_from_pretrained_without_importing_transformers(tmp_path):
    packed_dir = tmp_path / "llama.umq"
    pack(_tiny_llama(tmp_path / "llama"), packed_dir, params=QuantParams(k=1), with_error=False)
    # The same directory with its weights behind an index that is not JSON (which
    # transformers parses before any quantizer hook): umq's error, not transformers'.
    broken_dir = tmp_path / "broken.umq"
    shutil.copytree(packed_dir, broken_dir)
    (broken_dir / "model.safetensors").rename(broken_dir / "model-00001-of-00001.safetensors")
    (broken_dir / "model.safetensors.index.json").write_text('{"weight_map": {')
    script = f"""
import json, sys, torch
import umqcli
loaded_early = "transformers" in sys.modules
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(packed_dir)!r})
ids = torch.arange(12).view(1, 12)
with torch.no_grad():
    logits = model(input_ids=ids).logits
torch.save(logits, {str(tmp_path / "logits.pt")!r})
try:
    AutoModelForCausalLM.from_pretrained({str(broken_dir)!r})
    broken = "loaded"
except umqcli.UMQError as exc:
    broken = exc.rule
print(json.dumps({{"loaded_early": loaded_early, "broken_index": broken,
                   "umq_layers": sum(type(m).__name__ == "UMQLinear" for m in model.modules())}}))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == {"loaded_early": False, "broken_index": "index", "umq_layers": 2 * 7}  # q k v o gate up down per layer
    # Same model as the documented helper gives (the lm_head is tied to the embedding, not packed).
    helper = integration.load_hf(packed_dir)
    assert _assert_holds_file_bytes(helper, packed_dir) == 14
    with torch.no_grad():
        want = helper(input_ids=torch.arange(12).view(1, 12)).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), want)


def test_registration_is_idempotent_and_refuses_a_foreign_umq_method(monkeypatch):
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    integration.register()
    integration.register()
    assert AUTO_QUANTIZER_MAPPING["umq"] is integration.UMQHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["umq"] is integration.UMQConfig
    monkeypatch.setitem(AUTO_QUANTIZER_MAPPING, "umq", object)
    with pytest.raises(UMQError) as caught:
        integration.register()
    assert caught.value.rule == "quantizer-registration"


def test_clip_loads_packed_and_its_init_weights_leave_packed_bytes_alone(tmp_path):
    source = _tiny_clip(tmp_path / "clip")
    packed_dir = tmp_path / "clip.umq"
    pack(source, packed_dir, params=QuantParams(k=1), with_error=False)
    model = transformers.CLIPModel.from_pretrained(packed_dir).eval()
    assert isinstance(model.text_model.encoder.layers[0].self_attn.q_proj, UMQLinear)
    # CLIP's _init_weights writes init.normal_(module.q_proj.weight) by name: run it on
    # every module again, as a user's init_weights() or resize would.
    for module in model.modules():
        model._init_weights(module)
    assert _assert_holds_file_bytes(model, packed_dir) == 2 * 2 * 6 + 2  # + text/visual projections
    # The packed model computes what the dense model with decoded weights computes.
    reference = transformers.CLIPModel.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, layer in umq_linears(model):
            reference.get_submodule(name).weight.copy_(layer.decoded_weight(torch.float32))
        ids = torch.arange(10).view(1, 10)
        pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        got, want = model(input_ids=ids, pixel_values=pixels), reference(input_ids=ids, pixel_values=pixels)
    torch.testing.assert_close(got.logits_per_image, want.logits_per_image, rtol=1e-4, atol=1e-4)


def test_init_weights_of_a_fresh_packed_clip_do_not_touch_packed_weights():
    """Without transformers' loader (which flags loaded tensors), a model quantized in
    memory still survives its own _init_weights: the packed weight says it is initialised."""
    transformers.logging.set_verbosity_error()
    config = transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(config).eval()
    packed = quantize_model(model, QuantParams(k=1))
    attention = next(m for m in model.modules() if type(m).__name__ == "CLIPAttention")
    model._init_weights(attention)  # init.normal_(attention.q_proj.weight, ...)
    name = next(n for n in packed if n.endswith("layers.0.self_attn.q_proj.weight"))
    assert torch.equal(attention.q_proj.packed.data, packed[name].data)
