"""umq unpack: packed file / sharded model dir -> dense safetensors, and its bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import umqcli.unpack as unpack_module
from umqcli.cli import app
from umqcli.codec import dequantize
from umqcli.errors import UMQError
from umqcli.format import QuantParams
from umqcli.io import open_checkpoint, read_header
from umqcli.pack import pack
from umqcli.unpack import unpack

runner = CliRunner()


def _weights(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Two shards of a small model: float32 / bfloat16 / float16 matrices that get
    packed, and tensors pack passes through (embedding, 1-D, 3-D, int, C % 8 != 0)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, dtype=torch.float32) -> torch.Tensor:
        x = torch.randn(*shape, generator=g)
        x[..., ::7] *= 20.0  # outlier columns
        return x.to(dtype)

    return {
        "model-00001-of-00002.safetensors": {
            "model.embed_tokens.weight": rand(50, 32),
            "model.layers.0.q_proj.weight": rand(48, 64),
            "model.layers.0.q_proj.bias": rand(48),
            "model.layers.0.up_proj.weight": rand(40, 32, dtype=torch.bfloat16),
            "model.layers.0.step": torch.arange(5, dtype=torch.int64),
        },
        "model-00002-of-00002.safetensors": {
            "model.layers.1.down_proj.weight": rand(24, 128, dtype=torch.float16),
            "model.layers.1.conv.weight": rand(2, 4, 8),
            "model.layers.1.odd.weight": rand(6, 12),
            "model.norm.weight": rand(32, dtype=torch.bfloat16),
        },
    }


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    src = tmp_path / "model"
    src.mkdir()
    weight_map = {}
    total = 0
    for file, tensors in _weights(0).items():
        save_file(tensors, src / file, metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (src / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 32}))
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "sub").mkdir()
    (src / "sub" / "notes.txt").write_text("kept")
    return src


@pytest.fixture()
def packed_dir(model_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "model.umq"
    pack(model_dir, out, params=QuantParams(k=2, block=16), with_error=False)
    return out


def _all_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def _listing(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _expected(packed: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Reference decode (codec.dequantize to the source dtype) of every packed tensor,
    and the pass-through names."""
    with open_checkpoint(packed) as checkpoint:
        decoded = {name: dequantize(checkpoint.packed(name)) for name in checkpoint.specs}
        return decoded, set(checkpoint.passthrough_names())


def test_unpack_dir_mirrors_layout_and_decodes_exactly(model_dir: Path, packed_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dense"
    before = {p: p.read_bytes() for p in packed_dir.rglob("*") if p.is_file()}
    report = unpack(packed_dir, out)
    assert {p: p.read_bytes() for p in packed_dir.rglob("*") if p.is_file()} == before  # input untouched

    source = _all_tensors(model_dir)
    dense = _all_tensors(out)
    decoded, passthrough = _expected(packed_dir)
    # Same names, shapes and (source) dtypes as the original checkpoint.
    assert {n: (t.dtype, t.shape) for n, t in dense.items()} == {n: (t.dtype, t.shape) for n, t in source.items()}
    assert set(decoded) == {
        "model.layers.0.q_proj.weight",
        "model.layers.0.up_proj.weight",
        "model.layers.1.down_proj.weight",
    }
    assert set(report.decoded) == set(decoded) and set(report.passthrough) == passthrough
    for name, want in decoded.items():
        assert torch.equal(dense[name], want), name  # bit-exact with the reference decode
        assert not torch.equal(dense[name], source[name])  # and really the quantized values
    for name in passthrough:
        assert torch.equal(dense[name], source[name]), name  # byte-identical copies

    # Directory mirrored: shard names, index, config without quantization_config, other files.
    assert _listing(out) == _listing(model_dir)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    source_index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == source_index["weight_map"]
    assert index["metadata"]["total_size"] == source_index["metadata"]["total_size"] == report.bytes_out
    assert "quantization_config" in json.loads((packed_dir / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == json.loads((model_dir / "config.json").read_text())
    assert (out / "sub" / "notes.txt").read_text() == "kept"
    # No umq metadata left in the dense headers.
    for file in out.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            assert f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_unpack_dtype_applies_to_decoded_tensors_only(packed_dir: Path, tmp_path: Path, dtype: str) -> None:
    out = tmp_path / "dense"
    unpack(packed_dir, out, dtype=dtype)
    dense = _all_tensors(out)
    decoded, passthrough = _expected(packed_dir)
    with open_checkpoint(packed_dir) as checkpoint:
        for name in decoded:
            want = dequantize(checkpoint.packed(name), getattr(torch, dtype))
            assert dense[name].dtype == getattr(torch, dtype) and torch.equal(dense[name], want)
    assert dense["model.norm.weight"].dtype == torch.bfloat16  # pass-through keeps its dtype


def test_unpack_single_file_and_slabs(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    src = model_dir / "model-00002-of-00002.safetensors"
    packed = tmp_path / "one.umq.safetensors"
    pack(src, packed, params=QuantParams(k=3), with_error=False)
    whole = tmp_path / "whole.safetensors"
    unpack(packed, whole)
    # Slabs of 3 rows (24 rows -> 8 slabs): same bytes, crc chained across slabs.
    monkeypatch.setattr(unpack_module, "SLAB_ELEMENTS", 3 * 128)
    sliced = tmp_path / "sliced.safetensors"
    unpack(packed, sliced)
    assert whole.read_bytes() == sliced.read_bytes()
    decoded, _ = _expected(packed)
    assert torch.equal(load_file(whole)["model.layers.1.down_proj.weight"], decoded["model.layers.1.down_proj.weight"])


def test_two_runs_are_byte_identical(packed_dir: Path, tmp_path: Path) -> None:
    unpack(packed_dir, tmp_path / "a")
    unpack(packed_dir, tmp_path / "b")
    for rel in _listing(tmp_path / "a"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


# --------------------------------------------------------------------------- bad input


def _corrupt(file: Path, tensor: str, offset: int, value: bytes) -> None:
    entry = read_header(file).entries[tensor]
    with open(file, "r+b") as fh:
        fh.seek(entry.start + offset)
        fh.write(value)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if "umq-tmp" in p.name or "umq-old" in p.name)


@pytest.mark.parametrize(
    "suffix, offset, value, rule",
    [
        # A mask byte with 3 bits set where k = 2: caught by the slab check before decoding.
        (".umq_mask", 5, bytes([0b0000_0111]), "popcount"),
        # A scale doubled: every rule still holds, only the crc32 tells.
        (".umq_scale", 0, torch.tensor([123.0]).numpy().tobytes(), "crc32"),
        # A NaN scale.
        (".umq_scale", 4, torch.tensor([float("nan")]).numpy().tobytes(), "scale"),
        # fp8_e4m3 NaN codes (0x7F) over a whole group: some land in lo slots.
        (".umq_data", 20, bytes([0x7F] * 10), "lo-code"),
    ],
)
def test_corrupted_tensor_fails_and_leaves_nothing(packed_dir: Path, tmp_path: Path, suffix, offset, value, rule) -> None:
    name = "model.layers.1.down_proj.weight"
    _corrupt(packed_dir / "model-00002-of-00002.safetensors", name + suffix, offset, value)
    out = tmp_path / "dense"
    with pytest.raises(UMQError) as info:
        unpack(packed_dir, out)
    assert info.value.rule == rule and info.value.tensor == name
    assert info.value.file is not None and info.value.file.endswith("model-00002-of-00002.safetensors")
    assert not out.exists() and _leftovers(tmp_path) == []


def test_output_rules(model_dir: Path, packed_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UMQError) as info:
        unpack(model_dir, tmp_path / "x")
    assert info.value.rule == "not-packed"
    with pytest.raises(UMQError) as info:
        unpack(packed_dir, packed_dir)
    assert info.value.rule == "out-is-src"
    with pytest.raises(UMQError) as info:
        unpack(packed_dir, packed_dir / "inside")
    assert info.value.rule == "out-inside-src"
    out = tmp_path / "dense"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(UMQError) as info:
        unpack(packed_dir, out)
    assert info.value.rule == "out-exists" and (out / "old.txt").exists()
    unpack(packed_dir, out, force=True)
    assert not (out / "old.txt").exists() and (out / "config.json").exists()
    with pytest.raises(UMQError) as info:
        unpack(packed_dir, tmp_path / "y", dtype="float64")
    assert info.value.rule == "dtype"


def test_interrupt_leaves_nothing(packed_dir: Path, tmp_path: Path) -> None:
    def progress(name: str, done: int, total: int, written: int) -> None:
        if done == 3:
            raise KeyboardInterrupt

    out = tmp_path / "dense"
    with pytest.raises(KeyboardInterrupt):
        unpack(packed_dir, out, progress=progress)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_write_error_leaves_nothing(packed_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A full disk in the middle of a tensor: OSError, no output, no temp file."""
    from umqcli import io

    calls = {"n": 0}
    original = io.SafetensorsWriter.write_bytes

    def failing(self, name, chunks):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        return original(self, name, chunks)

    monkeypatch.setattr(io.SafetensorsWriter, "write_bytes", failing)
    out = tmp_path / "dense"
    with pytest.raises(OSError):
        unpack(packed_dir, out)
    assert not out.exists() and _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- CLI


def test_cli_json_and_table(packed_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["unpack", str(packed_dir), "-o", str(tmp_path / "a"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tensors_decoded"] == 3 and report["tensors_passthrough"] == 6
    assert report["decoded"]["model.layers.0.up_proj.weight"] == {
        "source_dtype": "bfloat16", "dtype": "bfloat16", "shape": [40, 32]
    }
    result = runner.invoke(app, ["unpack", str(packed_dir), "-o", str(tmp_path / "b"), "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    assert "tensors decoded" in result.stdout and "float16" in result.stdout
    assert _all_tensors(tmp_path / "b")["model.layers.0.up_proj.weight"].dtype == torch.float16


@pytest.mark.parametrize(
    "make_input, needle",
    [
        (lambda d: d / "missing.safetensors", "no such file"),
        (lambda d: d / "model-00001-of-00002.safetensors", "not a packed checkpoint"),
        (lambda d: _truncate(d / "model-00002-of-00002.safetensors"), "truncated"),
        (lambda d: _write(d / "junk.safetensors", b"\x05\x00\x00\x00\x00\x00\x00\x00{abc}"), "not a safetensors"),
    ],
    ids=["missing", "not-packed", "truncated", "not-safetensors"],
)
def test_cli_bad_input_exits_2_with_one_line(packed_dir: Path, tmp_path: Path, make_input, needle: str) -> None:
    if needle == "not a packed checkpoint":
        target = make_input(packed_dir.parent / "model")
    else:
        target = make_input(packed_dir)
    out = tmp_path / "out"
    result = runner.invoke(app, ["unpack", str(target), "-o", str(out)])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.output, result.stderr
    assert not out.exists()


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_cli_bad_dtype_exits_2(packed_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["unpack", str(packed_dir), "-o", str(tmp_path / "o"), "--dtype", "int8"])
    assert result.exit_code == 2 and "--dtype" in result.stderr


def test_decoded_values_beyond_the_requested_dtype_are_refused(tmp_path: Path) -> None:
    """float32 weights up to ~1e6 decode fine to float32 but not to float16."""
    weight = torch.randn(16, 32) * 1e5
    save_file({"w": weight}, tmp_path / "big.safetensors")
    pack(tmp_path / "big.safetensors", tmp_path / "big.umq.safetensors", with_error=False)
    unpack(tmp_path / "big.umq.safetensors", tmp_path / "ok.safetensors")  # source dtype: fine
    assert torch.isfinite(load_file(tmp_path / "ok.safetensors")["w"]).all()
    with pytest.raises(UMQError) as info:
        unpack(tmp_path / "big.umq.safetensors", tmp_path / "half.safetensors", dtype="float16")
    assert info.value.rule == "non-finite" and "float16" in str(info.value) and info.value.tensor == "w"
    assert not (tmp_path / "half.safetensors").exists() and _leftovers(tmp_path) == []


def test_tensor_stored_plain_and_packed_is_refused(tmp_path: Path) -> None:
    """A file holding both 'w' and the packed parts of 'w' cannot be unpacked."""
    from umqcli.codec import quantize
    from umqcli.format import encode_metadata

    weight = torch.randn(8, 16)
    packed = quantize(weight, QuantParams())
    tensors = {"w": weight, **packed.stored_tensors("w")}
    save_file(tensors, tmp_path / "twice.safetensors", metadata=encode_metadata({"w": packed.spec}))
    with pytest.raises(UMQError) as info:
        unpack(tmp_path / "twice.safetensors", tmp_path / "out.safetensors")
    assert info.value.rule == "duplicate-tensor" and info.value.tensor == "w"
    assert not (tmp_path / "out.safetensors").exists() and _leftovers(tmp_path) == []


def test_index_pointing_outside_the_directory_is_refused(packed_dir: Path, tmp_path: Path) -> None:
    index_path = packed_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../model/model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    result = runner.invoke(app, ["unpack", str(packed_dir), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "outside the model directory" in result.stderr
    assert "index-path" in result.stderr and not (tmp_path / "out").exists()
