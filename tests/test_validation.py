"""Every reader refuses the same damaged packed checkpoints, the same way.

A tiny BERT (float32, so hi values are float16) is saved in several shards and packed
once per session. Each case damages a copy (the index, a header, a spec, the values) and
every reader must refuse it with :class:`UMQError` naming the rule: the CLI commands
(``unpack``, ``verify``, ``inspect --check``: exit 2, one line naming file and rule, no
output left), ``load_hf``, and plain ``from_pretrained`` through the registered quantizer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from typer.testing import CliRunner

from checkpoints import rewrite_header
from umqcli.cli import app
from umqcli.codec import byte_offsets, crc32, unpack_mask
from umqcli.errors import UMQError
from umqcli.format import META_TENSORS, META_TENSORS_CRC, QuantParams
from umqcli.io import INDEX_NAME, read_header
from umqcli.integrations.transformers import load_hf, register
from umqcli.nn import UMQLinear, umq_linears

os.environ.setdefault("HF_HUB_OFFLINE", "1")
runner = CliRunner()
LAYER = "encoder.layer.1.intermediate.dense.weight"


@pytest.fixture(scope="session")
def packed_bert(tmp_path_factory) -> Path:
    """A float32 BERT in >= 3 shards, packed with k = 2 / fp8_e4m3 / block 32."""
    import transformers

    from umqcli.pack import pack

    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("validation")
    transformers.BertModel(config).eval().save_pretrained(root / "dense", max_shard_size="100KB")
    pack(root / "dense", root / "packed", params=QuantParams(k=2, block=32), with_error=False)
    assert len(list((root / "packed").glob("*.safetensors"))) >= 3
    return root / "packed"


# --------------------------------------------------------------------------- damage helpers


def _shard_of(directory: Path, tensor: str) -> Path:
    index = json.loads((directory / INDEX_NAME).read_text())
    return directory / index["weight_map"][tensor]


def mutate_spec(file: Path, name: str, change: Callable[[dict[str, Any]], None], *, keep_checksum: bool = False) -> None:
    """Change one ``umq.tensors`` entry; the entries' checksums are dropped (a writer
    without them) unless ``keep_checksum``, so the rule under test is the one that fires."""

    def mutate(header: dict[str, Any]) -> None:
        specs = json.loads(header["__metadata__"][META_TENSORS])
        change(specs[name])
        header["__metadata__"][META_TENSORS] = json.dumps(specs)
        if not keep_checksum:
            header["__metadata__"].pop(META_TENSORS_CRC)

    rewrite_header(file, mutate)


def set_hi_value(directory: Path, name: str, bits: int) -> None:
    """Store the 16-bit pattern ``bits`` as the first hi value of ``name`` and fix the
    data crc32, as a writer that forgot FORMAT §4's finiteness rule would."""
    file = _shard_of(directory, name + ".umq_data")
    header = read_header(file)
    spec = json.loads(header.metadata[META_TENSORS])[name]
    data_entry, mask_entry = header.entries[name + ".umq_data"], header.entries[name + ".umq_mask"]
    raw = bytearray(file.read_bytes())
    rows, groups = mask_entry.shape
    mask = torch.frombuffer(bytearray(raw[mask_entry.start : mask_entry.end]), dtype=torch.uint8).view(rows, groups)
    bits_mask = unpack_mask(mask)
    column = int(bits_mask[0].nonzero()[0])
    offset = int(byte_offsets(bits_mask, spec["k"])[0, column])
    raw[data_entry.start + offset : data_entry.start + offset + 2] = bits.to_bytes(2, "little")
    data = torch.frombuffer(bytearray(raw[data_entry.start : data_entry.end]), dtype=torch.uint8)
    file.write_bytes(bytes(raw))
    mutate_spec(file, name, lambda entry: entry["crc32"].__setitem__("data", crc32(data)))


def mutate_index(directory: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    index = json.loads((directory / INDEX_NAME).read_text())
    result = change(index)
    (directory / INDEX_NAME).write_text(result if isinstance(result, str) else json.dumps(index))


def drop_shard_from_index(directory: Path) -> None:
    shard = _shard_of(directory, LAYER + ".umq_data").name

    def change(index: dict[str, Any]) -> None:
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}

    mutate_index(directory, change)


def orphan(directory: Path) -> None:
    mutate_spec_away(_shard_of(directory, LAYER + ".umq_data"), LAYER)


def mutate_spec_away(file: Path, name: str) -> None:
    def mutate(header: dict[str, Any]) -> None:
        specs = json.loads(header["__metadata__"][META_TENSORS])
        del specs[name]
        header["__metadata__"][META_TENSORS] = json.dumps(specs)
        header["__metadata__"].pop(META_TENSORS_CRC)

    rewrite_header(file, mutate)


def set_metadata(directory: Path, value: Any) -> None:
    rewrite_header(_shard_of(directory, LAYER + ".umq_data"), lambda h: h.__setitem__("__metadata__", value))


def reshape_stored(directory: Path, suffix: str, shape: Callable[[list[int]], list[int]]) -> None:
    def mutate(header: dict[str, Any]) -> None:
        header[LAYER + suffix]["shape"] = shape(header[LAYER + suffix]["shape"])

    rewrite_header(_shard_of(directory, LAYER + suffix), mutate)


def claim_shape(directory: Path, shape: list[int]) -> None:
    mutate_spec(_shard_of(directory, LAYER + ".umq_data"), LAYER, lambda e: e.__setitem__("shape", shape))


# (id, damage, rule, tensor named in the message or None)
CASES: list[tuple[str, Callable[[Path], None], str, str | None]] = [
    ("index-parent", lambda d: mutate_index(d, lambda i: i["weight_map"].__setitem__(LAYER + ".umq_data", "../x.safetensors")), "index-path", LAYER + ".umq_data"),
    ("index-absolute", lambda d: mutate_index(d, lambda i: i["weight_map"].__setitem__(LAYER + ".umq_data", str(_shard_of(d, LAYER + ".umq_data").resolve()))), "index-path", LAYER + ".umq_data"),
    ("index-not-json", lambda d: mutate_index(d, lambda i: '{"weight_map": {'), "index", None),
    ("index-map-not-object", lambda d: mutate_index(d, lambda i: i.__setitem__("weight_map", ["a"])), "index", None),
    ("index-null-value", lambda d: mutate_index(d, lambda i: i["weight_map"].__setitem__(LAYER + ".umq_data", None)), "index", None),
    ("index-no-weight-map", lambda d: mutate_index(d, lambda i: i.pop("weight_map")), "index", None),
    ("index-not-object", lambda d: mutate_index(d, lambda i: "[]"), "index", None),
    ("index-empty-entry", lambda d: mutate_index(d, lambda i: i["weight_map"].__setitem__(LAYER + ".umq_data", "")), "index-path", LAYER + ".umq_data"),
    ("index-missing-shard", lambda d: _shard_of(d, "pooler.dense.weight.umq_data").unlink(), "index-missing", None),
    ("index-leaves-out-shard", drop_shard_from_index, "index-unlisted", None),
    ("orphan", orphan, "orphan", LAYER),
    ("hi-nan", lambda d: set_hi_value(d, LAYER, 0x7E00), "hi-finite", LAYER),
    ("hi-inf", lambda d: set_hi_value(d, LAYER, 0xFC00), "hi-finite", LAYER),
    ("shape-2^62", lambda d: claim_shape(d, [19, 2**62]), "stored-shape", LAYER),
    ("shape-2^40", lambda d: claim_shape(d, [19, 2**40]), "stored-shape", LAYER),
    ("scale-reshaped", lambda d: reshape_stored(d, ".umq_scale", lambda s: s[::-1]), "stored-shape", LAYER),
    ("spec-dtype-flipped", lambda d: mutate_spec(_shard_of(d, LAYER + ".umq_data"), LAYER, lambda e: e.__setitem__("dtype", "bfloat16"), keep_checksum=True), "spec-crc32", LAYER),
    ("spec-lo-swapped", lambda d: mutate_spec(_shard_of(d, LAYER + ".umq_data"), LAYER, lambda e: e.__setitem__("lo", "fp8_e5m2"), keep_checksum=True), "spec-crc32", LAYER),
    ("metadata-empty-string", lambda d: set_metadata(d, ""), "not-safetensors", None),
    ("metadata-list", lambda d: set_metadata(d, []), "not-safetensors", None),
    ("metadata-zero", lambda d: set_metadata(d, 0), "not-safetensors", None),
    ("metadata-false", lambda d: set_metadata(d, False), "not-safetensors", None),
]


@pytest.fixture()
def damaged(request, packed_bert: Path, tmp_path: Path) -> tuple[Path, str, str | None, str]:
    case_id, damage, rule, tensor = request.param
    target = tmp_path / "packed"
    shutil.copytree(packed_bert, target)
    damage(target)
    return target, rule, tensor, case_id


def _one_line_error(result, target: Path, rule: str, tensor: str | None) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    line = lines[0]
    assert f"[rule: {rule}]" in line and str(target) in line, line
    if tensor is not None:
        assert f"tensor '{tensor}'" in line, line
    return line


@pytest.mark.parametrize("damaged", CASES, ids=[c[0] for c in CASES], indirect=True)
def test_cli_readers_refuse(damaged, tmp_path: Path) -> None:
    target, rule, tensor, _ = damaged
    listing = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "dense"
    _one_line_error(runner.invoke(app, ["unpack", str(target), "-o", str(out)]), target, rule, tensor)
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # nothing left behind
    _one_line_error(runner.invoke(app, ["verify", str(target)]), target, rule, tensor)
    _one_line_error(runner.invoke(app, ["inspect", str(target), "--check"]), target, rule, tensor)


@pytest.mark.parametrize("damaged", CASES, ids=[c[0] for c in CASES], indirect=True)
def test_python_loaders_refuse(damaged) -> None:
    """load_hf and a plain from_pretrained (the index too, which transformers parses
    before any quantizer hook) raise the same UMQError; neither returns a model."""
    import transformers

    target, rule, tensor, _ = damaged
    with pytest.raises(UMQError) as info:
        load_hf(target)
    assert info.value.rule == rule and str(target) in str(info.value)
    if tensor is not None:
        assert info.value.tensor == tensor
    register()
    for model_class in (transformers.AutoModel, transformers.BertModel):
        with pytest.raises(UMQError) as plain:
            model_class.from_pretrained(target)
        assert str(plain.value) == str(info.value)


@pytest.mark.parametrize("layout", ["sharded", "single-file"])
def test_a_umq_config_over_plain_weights_is_not_packed_for_every_reader(packed_bert: Path, tmp_path: Path, layout) -> None:
    """config.json says umq, the weights are plain: load_hf, a plain from_pretrained and
    the CLI refuse it with the same line naming the directory (rule not-packed)."""
    import transformers

    target = tmp_path / "fake"
    if layout == "sharded":
        shutil.copytree(packed_bert.parent / "dense", target)
    else:
        target.mkdir()
        transformers.BertModel.from_pretrained(packed_bert.parent / "dense").save_pretrained(target)
    shutil.copy(packed_bert / "config.json", target / "config.json")
    with pytest.raises(UMQError) as info:
        load_hf(target)
    assert info.value.rule == "not-packed" and info.value.file == str(target)
    with pytest.raises(UMQError) as plain:
        transformers.AutoModel.from_pretrained(target)
    assert str(plain.value) == str(info.value)
    result = runner.invoke(app, ["unpack", str(target), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {info.value}", result.stderr


def test_what_transformers_raises_on_a_packed_index_is_one_umq_line(packed_bert: Path, tmp_path: Path) -> None:
    """An index umq's rules accept but transformers cannot use (no "metadata" object):
    transformers' KeyError becomes UMQError naming the index (rule transformers), chained."""
    import transformers

    target = tmp_path / "packed"
    shutil.copytree(packed_bert, target)
    mutate_index(target, lambda index: index.pop("metadata"))
    for load in (lambda: load_hf(target), lambda: transformers.AutoModel.from_pretrained(target)):
        with pytest.raises(UMQError) as info:
            load()
        assert info.value.rule == "transformers" and info.value.file == str(target / INDEX_NAME)
        assert "KeyError: 'metadata'" in info.value.message and isinstance(info.value.__cause__, KeyError)


def test_hub_cache_index_is_checked_before_transformers_resolves_its_shards(packed_bert: Path, tmp_path: Path) -> None:
    """A repo id resolved from the Hugging Face cache (a snapshot directory, shards fetched
    by transformers): the index rules still come first, and a shard transformers cannot
    fetch is umq's one line (rule transformers), not transformers' OSError."""
    import transformers

    repo = tmp_path / "models--acme--bert-umq"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(packed_bert, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)

    def load():
        return transformers.AutoModel.from_pretrained("acme/bert-umq", cache_dir=tmp_path, local_files_only=True)

    assert len(dict(umq_linears(load()))) == 2 * 6 + 1
    mutate_index(snapshot, lambda i: i["weight_map"].__setitem__(LAYER + ".umq_data", "../x.safetensors"))
    with pytest.raises(UMQError) as info:
        load()
    assert info.value.rule == "index-path" and info.value.file == str(snapshot / INDEX_NAME)
    mutate_index(snapshot, lambda i: i["weight_map"].__setitem__(LAYER + ".umq_data", "model-00009-of-00009.safetensors"))
    with pytest.raises(UMQError) as info:
        load()
    assert info.value.rule == "transformers" and info.value.file == str(snapshot / INDEX_NAME)
    assert isinstance(info.value.__cause__, OSError) and "model-00009-of-00009" in info.value.message


def test_index_check_is_installed_once_and_leaves_other_models_alone(packed_bert: Path, tmp_path: Path) -> None:
    """The wrapper around transformers' shard resolution is installed once, and for a
    directory whose config does not say umq, transformers' own behaviour is unchanged."""
    import transformers
    import transformers.modeling_utils as modeling_utils

    from umqcli.integrations.transformers import install_index_check

    install_index_check()
    wrapped = modeling_utils.get_checkpoint_shard_files
    install_index_check()
    assert modeling_utils.get_checkpoint_shard_files is wrapped and wrapped.umq_checks_index
    assert not getattr(wrapped.__wrapped__, "umq_checks_index", False)  # one layer, not two
    dense = tmp_path / "dense"
    shutil.copytree(packed_bert.parent / "dense", dense)
    (dense / INDEX_NAME).write_text('{"weight_map": {')
    with pytest.raises(json.JSONDecodeError):  # transformers' own exception, not umq's
        transformers.BertModel.from_pretrained(dense)


def test_layer_the_loader_leaves_unfilled_is_an_error(packed_bert: Path, monkeypatch) -> None:
    """transformers skipping one packed buffer (as a name it cannot map would) must not
    give a layer of uninitialised bytes: not-loaded, naming the tensor and its file."""
    import transformers.core_model_loading as loading

    original = loading.set_param_for_module

    def skip_one(model, target_name, *args, **kwargs):
        if target_name == LAYER + ".umq_data":
            return None
        return original(model, target_name, *args, **kwargs)

    monkeypatch.setattr(loading, "set_param_for_module", skip_one)
    with pytest.raises(UMQError) as info:
        load_hf(packed_bert)
    assert info.value.rule == "not-loaded" and info.value.tensor == LAYER
    assert info.value.file == str(_shard_of(packed_bert, LAYER + ".umq_data"))
    assert "umq_data" in info.value.message


def test_loaded_model_holds_the_files_bytes(packed_bert: Path) -> None:
    """The undamaged checkpoint loads, every packed linear holding its file's bytes."""
    from umqcli.io import open_checkpoint

    model = load_hf(packed_bert)
    layers = dict(umq_linears(model))
    assert len(layers) == 2 * 6 + 1
    with open_checkpoint(packed_bert) as checkpoint:
        for name, layer in layers.items():
            for suffix in ("umq_data", "umq_mask", "umq_scale"):
                assert torch.equal(getattr(layer.weight, suffix), checkpoint.get(f"{name}.weight.{suffix}")), name


@pytest.mark.parametrize(
    "change, rule",
    [
        (lambda sd: sd.__setitem__("weight.umq_scale", sd["weight.umq_scale"].reshape(4, -1)), "stored-shape"),
        (lambda sd: sd.__setitem__("weight.umq_mask", sd["weight.umq_mask"].to(torch.int8)), "stored-dtype"),
        (lambda sd: sd.pop("weight.umq_mask"), "stored-missing"),
        (lambda sd: sd["weight.umq_data"].__setitem__((0, 0), sd["weight.umq_data"][0, 0] ^ 1), "crc32"),
    ],
    ids=["reshaped-scale", "mask-dtype", "missing-mask", "flipped-byte"],
)
def test_load_state_dict_refuses_before_changing_anything(change, rule: str) -> None:
    from umqcli.codec import quantize

    weight = torch.randn(12, 64, generator=torch.Generator().manual_seed(5))
    packed = quantize(weight, QuantParams(k=2, block=16))
    layer = UMQLinear.from_packed(packed, torch.zeros(12))
    state = {key: value.clone() for key, value in layer.state_dict().items()}
    change(state)
    fresh = UMQLinear(packed.spec)
    for value in fresh.state_dict().values():
        value.zero_()  # empty memory may hold NaN, which no comparison equals
    before = {key: value.clone() for key, value in fresh.state_dict().items()}
    with pytest.raises(UMQError) as info:
        fresh.load_state_dict(state)
    assert info.value.rule == rule and info.value.tensor == "weight"
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("hi", ["float16", "bfloat16"])
def test_hi_finite_rule_matches_isfinite_on_every_16_bit_pattern(hi: str) -> None:
    """k = 8 (every element hi): all 65536 patterns minus the non-finite ones pass; each
    non-finite pattern alone, at any position of a group, fails hi-finite."""
    from umqcli.codec import PackedTensor
    from umqcli.format import HiFormat, LoFormat, TensorSpec

    dtype = HiFormat(hi).torch_dtype
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    finite = torch.isfinite(patterns.view(dtype).float())

    def packed(bits: torch.Tensor) -> PackedTensor:
        rows = bits.numel() // 8
        spec = TensorSpec(shape=(rows, 8), dtype="float32", k=8, lo=LoFormat.INT8, hi=HiFormat(hi), block=8,
                          selection="magnitude")
        data = bits.contiguous().view(torch.uint8).view(rows, 16)
        return PackedTensor.from_stored(spec, data, torch.full((rows, 1), 0xFF, dtype=torch.uint8),
                                        torch.ones(rows, 1))

    good = patterns[finite]
    assert good.numel() % 8 == 0
    packed(good).validate(check_crc=False)
    bad = patterns[~finite]
    assert bad.numel() == (2048 if hi == "float16" else 256)
    for position, value in enumerate(bad.tolist()):
        group = torch.zeros(8, dtype=torch.int16)
        group[position % 8] = value
        with pytest.raises(UMQError) as info:
            packed(group).validate(check_crc=False)
        assert info.value.rule == "hi-finite"


# --------------------------------------------------------------------------- randomised damage

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope="session")
def small_packed(tmp_path_factory) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A packed file with a float32 tensor (hi float16), a bfloat16 one (hi bfloat16)
    and a pass-through tensor; its bytes and its undamaged decode."""
    from safetensors.torch import load_file, save_file

    from umqcli.pack import pack
    from umqcli.unpack import unpack

    root = tmp_path_factory.mktemp("fuzz")
    g = torch.Generator().manual_seed(3)
    save_file({
        "a.weight": torch.randn(16, 32, generator=g) * 3,
        "b.weight": (torch.randn(8, 64, generator=g) * 0.1).to(torch.bfloat16),
        "norm.bias": torch.randn(7, generator=g),
    }, root / "source.safetensors", metadata={"format": "pt"})
    pack(root / "source.safetensors", root / "packed.safetensors", params=QuantParams(k=2, block=16), with_error=False)
    unpack(root / "packed.safetensors", root / "dense.safetensors")
    return (root / "packed.safetensors").read_bytes(), load_file(root / "dense.safetensors")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.sampled_from(["", "float16", "bfloat16", "float32", "fp8_e4m3", "fp8_e5m2", "int8", "magnitude", "absmax"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["data", "mask", "scale", "x"]), inner, max_size=3),
    max_leaves=6,
)
SPEC_KEYS = ["shape", "dtype", "k", "lo", "hi", "block", "selection", "scale_rule", "crc32"]


def _split(raw: bytes) -> tuple[int, dict[str, Any]]:
    (length,) = struct.unpack("<Q", raw[:8])
    return length, json.loads(raw[8 : 8 + length])


def _with_header(raw: bytes, header: dict[str, Any]) -> bytes:
    length, _ = _split(raw)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + length :]


@st.composite
def damaged_files(draw, raw: bytes) -> bytes:
    """One of many kinds of damage to a packed file's bytes."""
    length, header = _split(raw)
    kind = draw(st.sampled_from(
        ["flip", "overwrite", "truncate", "spec-value", "spec-swap", "checksums", "metadata", "entry", "unrelated"]))
    if kind in ("flip", "overwrite"):
        # Anywhere in the header, or in the packed tensors' data (pass-through bytes carry
        # no checksum in FORMAT v1: their damage is not a umq reader's to see).
        packed_spans = [(8 + length + info["data_offsets"][0], 8 + length + info["data_offsets"][1])
                        for name, info in header.items() if ".umq_" in name]
        start, end = draw(st.sampled_from([(0, 8 + length)] + packed_spans))
        at = draw(st.integers(start, end - 1))
        out = bytearray(raw)
        out[at] = out[at] ^ (1 << draw(st.integers(0, 7))) if kind == "flip" else draw(st.integers(0, 255))
        return bytes(out)
    if kind == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    metadata = header["__metadata__"]
    if kind == "unrelated":  # header changes that leave every packed value as it was
        metadata[draw(st.sampled_from(["format", "note"]))] = draw(st.text(max_size=8))
        passthrough = next(name for name in sorted(header) if name != "__metadata__" and ".umq_" not in name)
        header[passthrough + "_renamed"] = header.pop(passthrough)
        return _with_header(raw, header)
    specs = json.loads(metadata[META_TENSORS])
    name = draw(st.sampled_from(sorted(specs)))
    if kind == "spec-value":
        specs[name][draw(st.sampled_from(SPEC_KEYS))] = draw(JSON_VALUES)
    elif kind == "spec-swap":  # two keys' values exchanged, e.g. lo and hi, or k and block
        first, second = draw(st.lists(st.sampled_from(SPEC_KEYS), min_size=2, max_size=2, unique=True))
        specs[name][first], specs[name][second] = specs[name][second], specs[name][first]
    elif kind == "checksums":
        metadata[META_TENSORS_CRC] = json.dumps(draw(JSON_VALUES))
    elif kind == "metadata":
        header["__metadata__"] = draw(JSON_VALUES)
        return _with_header(raw, header)
    else:  # a stored entry's dtype, shape or offsets
        entry = header[draw(st.sampled_from(sorted(k for k in header if ".umq_" in k)))]
        entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JSON_VALUES)
    metadata[META_TENSORS] = json.dumps(specs)
    return _with_header(raw, header)


HANG_SECONDS = 60  # each reader takes milliseconds on these 2 kB files, even on a loaded machine


def _readers(path: Path, out: Path) -> dict[str, Any]:
    """Run every CLI reader on ``path``: each gives its result or the UMQError it raised
    (any other exception propagates and fails the test)."""
    from umqcli.inspect import check_checkpoint
    from umqcli.unpack import unpack
    from umqcli.verify import verify

    return _run_readers(path, {
        "check": lambda: check_checkpoint(path),
        "unpack": lambda: unpack(path, out),
        "verify": lambda: verify(path, rows=4, backend="torch"),
    })


def _run_readers(path: Path, readers: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Each reader's result or the UMQError it raised; any other exception, or a reader
    running past HANG_SECONDS, fails the test."""

    def hang(signum, frame):
        raise TimeoutError(f"a reader ran for {HANG_SECONDS} s on {path}")

    results: dict[str, Any] = {}
    previous = signal.signal(signal.SIGALRM, hang)
    try:
        for name, read in readers.items():
            signal.alarm(HANG_SECONDS)  # a hang fails the test (TimeoutError is not a UMQError)
            try:
                results[name] = read()
            except UMQError as exc:
                results[name] = exc
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    return results


def test_randomly_damaged_files_are_refused_or_read_exactly(small_packed, tmp_path: Path) -> None:
    """Every reader either raises UMQError or returns exactly the undamaged values; the
    readers agree; a refused unpack leaves nothing behind."""
    from safetensors.torch import load_file

    raw, expected = small_packed
    seen: dict[str, int] = {"refused": 0, "read": 0}

    @settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(data=st.data())
    def check(data) -> None:
        work = Path(tempfile.mkdtemp(dir=tmp_path))
        path, out = work / "packed.safetensors", work / "dense.safetensors"
        path.write_bytes(data.draw(damaged_files(raw)))
        results = _readers(path, out)
        refused = {name for name, result in results.items() if isinstance(result, UMQError)}
        assert refused in (set(), set(results)), {n: str(r) for n, r in results.items()}
        if refused:
            seen["refused"] += 1
            assert sorted(p.name for p in work.iterdir()) == ["packed.safetensors"]  # no output, no temp
        else:
            seen["read"] += 1
            dense = load_file(out)
            for name in ("a.weight", "b.weight"):
                assert dense[name].dtype == expected[name].dtype and torch.equal(dense[name], expected[name]), name
        shutil.rmtree(work)

    check()
    # The damage is real: most cases are refused; some (metadata beside umq's, a renamed
    # pass-through tensor) leave the packed values intact and must read exactly.
    assert seen["refused"] > 60 and seen["read"] > 0, seen


@st.composite
def damaged_indexes(draw, index: dict[str, Any]) -> str:
    """One of many kinds of damage to the text of ``model.safetensors.index.json``."""
    text = json.dumps(index)
    kind = draw(st.sampled_from(["truncate", "overwrite", "value", "key", "drop", "top"]))
    if kind == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))]
    if kind == "overwrite":
        at = draw(st.integers(0, len(text) - 1))
        return text[:at] + draw(st.characters(min_codepoint=32, max_codepoint=126)) + text[at + 1 :]
    damaged = json.loads(text)
    weight_map = damaged["weight_map"]
    name = draw(st.sampled_from(sorted(weight_map)))
    if kind == "value":  # another shard, a path leaving the directory, a file not there, any JSON
        shard = weight_map[name]
        weight_map[name] = draw(st.sampled_from(sorted(set(weight_map.values())) + [
            "../" + shard, "/" + shard, "./" + shard, "sub/" + shard, shard.upper(), "", "C:" + shard, "..\\" + shard,
        ]) | JSON_VALUES)
    elif kind == "key":  # an entry renamed
        weight_map[name + draw(st.sampled_from(["x", ".weight", ".umq_data"]))] = weight_map.pop(name)
    elif kind == "drop":
        del weight_map[name]
    else:  # the index's own keys
        damaged[draw(st.sampled_from(["weight_map", "metadata"]))] = draw(JSON_VALUES)
    return json.dumps(damaged)


def test_randomly_damaged_model_directories_are_refused_or_loaded_exactly(packed_bert: Path, tmp_path: Path) -> None:
    """The packed BERT directory, its index or a shard's header damaged at random: the
    CLI's check, load_hf and a plain from_pretrained each raise UMQError or give exactly
    the undamaged values (every parameter and packed buffer). The two loaders agree to the
    message; the check agrees with them except where only transformers minds (an index
    whose "metadata" is not an object: rule transformers)."""
    import transformers

    from umqcli.inspect import check_checkpoint

    index = json.loads((packed_bert / INDEX_NAME).read_text())
    shard = _shard_of(packed_bert, LAYER + ".umq_data")
    expected = {name: value.clone() for name, value in load_hf(packed_bert).state_dict().items()}
    seen: dict[str, int] = {"refused": 0, "read": 0}

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(data=st.data())
    def check(data) -> None:
        target = Path(tempfile.mkdtemp(dir=tmp_path)) / "packed"
        shutil.copytree(packed_bert, target)
        if data.draw(st.booleans()):
            (target / INDEX_NAME).write_text(data.draw(damaged_indexes(index)))
        else:
            (target / shard.name).write_bytes(data.draw(damaged_files(shard.read_bytes())))
        results = _run_readers(target, {
            "check": lambda: check_checkpoint(target),
            "load_hf": lambda: load_hf(target),
            "from_pretrained": lambda: transformers.BertModel.from_pretrained(target),
        })
        loaders = [results["load_hf"], results["from_pretrained"]]
        if isinstance(loaders[0], UMQError) or isinstance(loaders[1], UMQError):
            seen["refused"] += 1
            assert [str(r) for r in loaders] == [str(loaders[0])] * 2, [str(r) for r in loaders]
            assert isinstance(results["check"], UMQError) or loaders[0].rule == "transformers", str(loaders[0])
        else:
            seen["read"] += 1
            assert not isinstance(results["check"], UMQError), str(results["check"])
            for model in loaders:
                state = model.state_dict()
                assert state.keys() == expected.keys()
                for name, value in expected.items():
                    assert torch.equal(state[name], value), name
        shutil.rmtree(target.parent)

    check()
    assert seen["refused"] > 25 and seen["read"] > 0, seen
