"""umqcli.io: header validation, lazy checkpoints, the streaming writer, atomic output."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from checkpoints import make_sharded_checkpoint, rewrite_header, tree_digest
from umqcli.codec import quantize
from umqcli.errors import UMQError
from umqcli.format import QuantParams
from umqcli.io import (
    SafetensorsWriter,
    atomic_output,
    check_output_path,
    copy_auxiliary_files,
    open_checkpoint,
    read_header,
    write_config,
    write_index,
)


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "w": torch.randn(6, 16, generator=gen),
        "h": torch.randn(4, 8, generator=gen).to(torch.bfloat16),
        "ids": torch.arange(10, dtype=torch.int64),
        "cube": torch.randn(2, 3, 8, generator=gen).to(torch.float16),
        "flag": torch.tensor([True, False]),
    }


@pytest.fixture()
def plain_file(tmp_path: Path) -> Path:
    path = tmp_path / "plain.safetensors"
    save_file(_tensors(), str(path), metadata={"format": "pt", "note": "x"})
    return path


def _rule(excinfo) -> str:
    return excinfo.value.rule


# ------------------------------------------------------------------ header validation


def test_header_matches_safetensors(plain_file: Path) -> None:
    header = read_header(plain_file)
    with safe_open(str(plain_file), "pt") as ref:
        assert set(header.entries) == set(ref.keys())
        assert header.metadata == ref.metadata()
        for name in ref.keys():
            assert list(header.entries[name].shape) == list(ref.get_slice(name).get_shape())
            assert header.entries[name].dtype == ref.get_slice(name).get_dtype()


@pytest.mark.parametrize(
    "make, rule",
    [
        (lambda p: p.unlink(), "missing"),
        (lambda p: p.write_bytes(b"\x01\x02"), "truncated"),
        (lambda p: p.write_bytes(p.read_bytes()[:60]), "truncated"),
        (lambda p: p.write_bytes(b"just some text, not a checkpoint at all\n" * 4), "not-safetensors"),
        (lambda p: p.write_bytes(struct.pack("<Q", 8) + b"[1,2,3] " + b"\0" * 16), "not-safetensors"),
        (lambda p: p.write_bytes(struct.pack("<Q", 6) + b"\xff\xfe{}{}" + b"\0" * 16), "not-safetensors"),
    ],
    ids=["missing", "tiny", "cut-header", "text", "json-array", "not-utf8"],
)
def test_bad_files_are_refused(plain_file: Path, make, rule: str) -> None:
    make(plain_file)
    with pytest.raises(UMQError) as excinfo:
        read_header(plain_file)
    assert _rule(excinfo) == rule
    assert str(plain_file) in str(excinfo.value)


def test_truncated_data_is_refused(plain_file: Path) -> None:
    data = plain_file.read_bytes()
    plain_file.write_bytes(data[:-10])  # header intact, the last tensor's bytes cut
    with pytest.raises(UMQError) as excinfo:
        read_header(plain_file)
    assert _rule(excinfo) == "header-offsets"
    assert "past the end" in str(excinfo.value)


def test_lying_headers_are_refused(plain_file: Path) -> None:
    def past_end(h):
        h["w"]["data_offsets"][1] += 10_000

    def overlap(h):
        # "flag" claims bytes that belong to another tensor, with a consistent size.
        begin = h["w"]["data_offsets"][0]
        h["flag"]["data_offsets"] = [begin, begin + 2]

    def wrong_size(h):
        h["w"]["shape"] = [6, 17]

    def bad_dtype(h):
        h["w"]["dtype"] = "F12"

    def bad_shape(h):
        h["w"]["shape"] = [6, -16]

    for mutate, rule in ((past_end, "header-offsets"), (overlap, "header-offsets"), (wrong_size, "header-size"),
                         (bad_dtype, "header-dtype"), (bad_shape, "header-shape")):
        path = plain_file.with_name(f"{mutate.__name__}.safetensors")
        path.write_bytes(plain_file.read_bytes())
        rewrite_header(path, mutate)
        with pytest.raises(UMQError) as excinfo:
            read_header(path)
        assert _rule(excinfo) == rule, mutate.__name__
        assert excinfo.value.file == str(path)


def test_huge_header_length_is_refused_without_allocating(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(UMQError) as excinfo:
        read_header(path)
    assert _rule(excinfo) == "not-safetensors"


# ------------------------------------------------------------------ checkpoint


def test_checkpoint_reads_like_safetensors(plain_file: Path) -> None:
    reference = load_file(str(plain_file))
    with open_checkpoint(plain_file) as ckpt:
        assert ckpt.names() == list(read_header(plain_file).entries)
        assert ckpt.metadata == {"format": "pt", "note": "x"}
        assert ckpt.specs == {}
        assert set(ckpt.passthrough_names()) == set(reference)
        for name, tensor in reference.items():
            assert ckpt.info(name) == (tensor.dtype, tuple(tensor.shape))
            assert torch.equal(ckpt.get(name), tensor)
            assert b"".join(bytes(c) for c in ckpt.iter_bytes(name, chunk=7)) == tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        assert torch.equal(ckpt.get("w", rows=(2, 5)), reference["w"][2:5])
        assert torch.equal(ckpt.get("cube", rows=(1, 2)), reference["cube"][1:2])
        with pytest.raises(UMQError) as excinfo:
            ckpt.get("nope")
        assert _rule(excinfo) == "missing-tensor"


def test_packed_checkpoint_specs_and_validation(vectors_dir: Path, tmp_path: Path) -> None:
    path = vectors_dir / "k3_fp8_e4m3_block64.safetensors"
    reference = load_file(str(path))
    with open_checkpoint(path) as ckpt:
        assert set(ckpt.specs) == {"dense.f32", "dense.f16", "dense.bf16"}
        assert ckpt.passthrough_names() == ["norm.bias"]
        packed = ckpt.packed("dense.f16")
        assert packed.spec.k == 3 and packed.spec.block == 64
        assert torch.equal(packed.data, reference["dense.f16.umq_data"])
    # Flip one payload byte: the crc32 check must name file, tensor and rule.
    corrupt = tmp_path / "corrupt.safetensors"
    raw = bytearray(path.read_bytes())
    entry = read_header(path).entries["dense.bf16.umq_data"]
    raw[entry.start + 5] ^= 0x01
    corrupt.write_bytes(bytes(raw))
    with open_checkpoint(corrupt) as ckpt, pytest.raises(UMQError) as excinfo:
        ckpt.packed("dense.bf16")
    assert _rule(excinfo) == "crc32" and excinfo.value.tensor == "dense.bf16"
    assert excinfo.value.file == str(corrupt)


def test_sharded_directory(tmp_path: Path) -> None:
    model = make_sharded_checkpoint(tmp_path / "model", shards=3)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    with open_checkpoint(model) as ckpt:
        assert ckpt.is_dir and len(ckpt.files) == 3
        assert set(ckpt.names()) == set(index["weight_map"])
        for name, file in index["weight_map"].items():
            assert ckpt.relative_name(ckpt.file_of(name)) == file
            with safe_open(str(model / file), "pt") as ref:
                assert torch.equal(ckpt.get(name), ref.get_tensor(name))


def test_directory_with_single_file(tmp_path: Path, plain_file: Path) -> None:
    model = tmp_path / "single"
    model.mkdir()
    (model / "model.safetensors").write_bytes(plain_file.read_bytes())
    with open_checkpoint(model) as ckpt:
        assert ckpt.files == [model / "model.safetensors"] and ckpt.index is None


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_traversal_is_refused(tmp_path: Path, target: str) -> None:
    model = make_sharded_checkpoint(tmp_path / "model", shards=2)
    (tmp_path / "outside.safetensors").write_bytes((model / "model-00001-of-00002.safetensors").read_bytes())
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = target
    index_path.write_text(json.dumps(index))
    with pytest.raises(UMQError) as excinfo:
        open_checkpoint(model)
    assert _rule(excinfo) == "index-path" and excinfo.value.tensor == first


def test_index_mismatch_and_missing_shard(tmp_path: Path) -> None:
    model = make_sharded_checkpoint(tmp_path / "model", shards=2)
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    names = list(index["weight_map"])
    wrong = dict(index, weight_map={**index["weight_map"], names[0]: "model-00002-of-00002.safetensors"
                                    if index["weight_map"][names[0]] != "model-00002-of-00002.safetensors"
                                    else "model-00001-of-00002.safetensors"})
    index_path.write_text(json.dumps(wrong))
    with pytest.raises(UMQError) as excinfo:
        open_checkpoint(model)
    assert _rule(excinfo) == "index-mismatch"
    missing = dict(index, weight_map={**index["weight_map"], names[0]: "model-00003-of-00003.safetensors"})
    index_path.write_text(json.dumps(missing))
    with pytest.raises(UMQError) as excinfo:
        open_checkpoint(model)
    assert _rule(excinfo) == "index-missing"


# ------------------------------------------------------------------ writer


def test_writer_is_byte_identical_to_save_file(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    writer = SafetensorsWriter(tmp_path / "mine.safetensors", [(n, t.dtype, t.shape) for n, t in tensors.items()],
                               metadata_reserve={"format": "pt"})
    with writer:
        for name in reversed(list(tensors)):  # any order: offsets are fixed up front
            writer.write(name, tensors[name])
        writer.close({"format": "pt"})
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_writer_parts_reserve_and_padding(tmp_path: Path) -> None:
    w = torch.randn(10, 8)
    path = tmp_path / "parts.safetensors"
    writer = SafetensorsWriter(path, [("w", torch.float32, (10, 8)), ("b", "U8", (3,))],
                               metadata_reserve={"k": "x" * 100})
    with writer:
        row = 8 * 4
        writer.write_part("w", 6 * row, w[6:])
        writer.write_part("w", 0, w[:6])
        writer.write_bytes("b", [b"\x01", b"\x02\x03"])
        size = writer.close({"k": "short"})
    assert size == path.stat().st_size
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"k": "short"}
        assert torch.equal(f.get_tensor("w"), w)
        assert f.get_tensor("b").tolist() == [1, 2, 3]
    # The header holds the room reserved for the longer metadata, padded with spaces.
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0 and path.read_bytes()[8 : 8 + n].rstrip(b" ").endswith(b"}")


def test_writer_refuses_incomplete_or_mismatched(tmp_path: Path) -> None:
    writer = SafetensorsWriter(tmp_path / "x.safetensors", [("a", torch.float32, (2, 2))])
    with writer:
        with pytest.raises(ValueError, match="layout says"):
            writer.write("a", torch.zeros(2, 3))
        writer.write_part("a", 0, torch.zeros(1, 2))
        with pytest.raises(ValueError, match="not completely written"):
            writer.close()
        with pytest.raises(ValueError, match="more than"):
            writer.write_part("a", 0, torch.zeros(2, 2))
    tiny = SafetensorsWriter(tmp_path / "y.safetensors", [("a", torch.float32, (1,))], metadata_reserve={})
    with tiny:
        tiny.write("a", torch.zeros(1))
        with pytest.raises(ValueError, match="reserved"):
            tiny.close({"long": "y" * 64})


# ------------------------------------------------------------------ atomic output


def test_atomic_output_file_and_dir(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    with atomic_output(out) as tmp:
        tmp.write_bytes(b"new")
        assert not out.exists()
    assert out.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]
    with pytest.raises(UMQError) as excinfo:
        with atomic_output(out):
            pass
    assert _rule(excinfo) == "out-exists"
    with atomic_output(out, force=True) as tmp:
        tmp.write_bytes(b"newer")
    assert out.read_bytes() == b"newer"

    outdir = tmp_path / "dir"
    outdir.mkdir()
    (outdir / "old.txt").write_text("old")
    with atomic_output(outdir, directory=True, force=True) as tmp:
        (tmp / "a.txt").write_text("a")
    assert sorted(os.listdir(outdir)) == ["a.txt"]
    assert sorted(os.listdir(tmp_path)) == ["dir", "out.bin"]


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_atomic_output_removes_temp_and_keeps_old(tmp_path: Path, exc: BaseException) -> None:
    outdir = tmp_path / "dir"
    outdir.mkdir()
    (outdir / "keep.txt").write_text("old")
    with pytest.raises(type(exc)):
        with atomic_output(outdir, directory=True, force=True) as tmp:
            (tmp / "partial.bin").write_bytes(b"x" * 100)
            raise exc
    assert sorted(os.listdir(tmp_path)) == ["dir"]
    assert (outdir / "keep.txt").read_text() == "old"
    with pytest.raises(type(exc)):
        with atomic_output(tmp_path / "f.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise exc
    assert sorted(os.listdir(tmp_path)) == ["dir"]


def test_check_output_path(tmp_path: Path) -> None:
    src = tmp_path / "model"
    src.mkdir()
    for out, rule in ((src, "out-is-src"), (src / "packed", "out-inside-src"), (tmp_path, "out-is-src")):
        with pytest.raises(UMQError) as excinfo:
            check_output_path(src, out, force=True)
        assert _rule(excinfo) == rule
    check_output_path(src, tmp_path / "model.umq", force=False)


# ------------------------------------------------------------------ directory helpers


def test_directory_helpers(tmp_path: Path) -> None:
    model = make_sharded_checkpoint(tmp_path / "model", shards=2)
    (model / "sub").mkdir()
    (model / "sub" / "extra.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"weights")
    (model / ".hidden").write_text("x")
    out = tmp_path / "out"
    out.mkdir()
    skip = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json", "config.json"]
    copied, skipped = copy_auxiliary_files(model, out, skip=skip)
    assert copied == ["generation_config.json", "sub/extra.json", "tokenizer_config.json"]
    assert skipped == ["pytorch_model.bin"]
    digest_src, digest_out = tree_digest(model), tree_digest(out)
    assert all(digest_out[name] == digest_src[name] for name in copied)

    write_config(model, out, {"quant_method": "umq", "format_version": 1})
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "umq"
    assert config["hidden_size"] == json.loads((model / "config.json").read_text())["hidden_size"]
    write_config(out, tmp_path, None)  # removes it again (unpack's direction)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())

    index = write_index(out, {"b": "f2", "a": "f1"}, 123, {"metadata": {"total_size": 1, "x": "y"}})
    assert json.loads(index.read_text()) == {"metadata": {"total_size": 123, "x": "y"},
                                             "weight_map": {"a": "f1", "b": "f2"}}
    assert list(json.loads(index.read_text())["weight_map"]) == ["a", "b"]


def test_quantized_tensor_roundtrip_through_writer(tmp_path: Path) -> None:
    """A packed tensor written by the writer reads back validated through Checkpoint."""
    from umqcli.format import encode_metadata
    from umqcli.io import packed_layout

    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    packed = quantize(weight, QuantParams(k=2, block=32))
    path = tmp_path / "q.safetensors"
    writer = SafetensorsWriter(path, packed_layout("w", packed.spec.stored_shapes()),
                               metadata_reserve=encode_metadata({"w": packed.spec}))
    with writer:
        for name, tensor in packed.stored_tensors("w").items():
            writer.write(name, tensor)
        writer.close(encode_metadata({"w": packed.spec}))
    with open_checkpoint(path) as ckpt:
        again = ckpt.packed("w")
        assert again.spec == packed.spec
        assert torch.equal(again.data, packed.data) and torch.equal(again.scale, packed.scale)
