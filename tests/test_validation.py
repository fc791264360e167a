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
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from typer.testing import CliRunner

from umqcli.cli import app
from umqcli.codec import byte_offsets, crc32, unpack_mask
from umqcli.errors import UMQError
from umqcli.format import META_TENSORS, META_TENSORS_CRC, QuantParams
from umqcli.io import INDEX_NAME, read_header
from umqcli.nn import UMQLinear, load_hf, register_hf, umq_linears

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


def rewrite_header(file: Path, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite a safetensors header (data offsets are relative, so the data stays put)."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    mutate(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


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
    mask = torch.frombuffer(bytes(raw[mask_entry.start : mask_entry.end]), dtype=torch.uint8).view(rows, groups)
    bits_mask = unpack_mask(mask)
    column = int(bits_mask[0].nonzero()[0])
    offset = int(byte_offsets(bits_mask, spec["k"])[0, column])
    raw[data_entry.start + offset : data_entry.start + offset + 2] = bits.to_bytes(2, "little")
    data = torch.frombuffer(bytes(raw[data_entry.start : data_entry.end]), dtype=torch.uint8)
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
# transformers parses the index itself before any quantizer hook runs: a plain
# from_pretrained call meets these with transformers' own exception (load_hf does not).
TRANSFORMERS_READS_FIRST = {"index-not-json", "index-map-not-object", "index-null-value", "index-missing-shard"}


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
    import transformers

    target, rule, tensor, case_id = damaged
    with pytest.raises(UMQError) as info:
        load_hf(target)
    assert info.value.rule == rule and str(target) in str(info.value)
    if tensor is not None:
        assert info.value.tensor == tensor
    if case_id not in TRANSFORMERS_READS_FIRST:
        register_hf()
        with pytest.raises(UMQError) as info:
            transformers.BertModel.from_pretrained(target)
        assert info.value.rule == rule
