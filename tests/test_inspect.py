"""umqcli.inspect: mask statistics against a direct computation, --check on every rule,
and the CLI (table, --tensor detail, --json, --png)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import umqcli.inspect as inspect_module
from umqcli.cli import app
from umqcli.codec import crc32, quantize, unpack_mask
from umqcli.errors import UMQError
from umqcli.format import QuantParams, encode_metadata
from umqcli.inspect import check_checkpoint, inspect_checkpoint, mask_statistics

runner = CliRunner()
OUTLIERS = (5, 40, 63)


def _packed_file(path: Path, *, k: int = 1, rows: int = 96, cols: int = 64) -> tuple[Path, torch.Tensor]:
    """A file with one quantized tensor whose columns 5, 40 and 63 are ~100x larger (so
    they are hi in every row for k >= 1), plus a pass-through bias."""
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(rows, cols, generator=gen) * 0.01
    # |w| >= 1 in the outlier columns vs ~0.01 elsewhere: always among the group's top k.
    weight[:, list(OUTLIERS)] = (1.0 + torch.rand(rows, len(OUTLIERS), generator=gen)) * torch.sign(
        torch.randn(rows, len(OUTLIERS), generator=gen))
    packed = quantize(weight, QuantParams(k=k))
    tensors = dict(packed.stored_tensors("w"))
    tensors["bias"] = torch.zeros(rows)
    save_file(tensors, str(path), metadata=encode_metadata({"w": packed.spec}))
    return path, unpack_mask(packed.mask)


def test_statistics_match_direct_computation(tmp_path: Path) -> None:
    path, mask = _packed_file(tmp_path / "p.safetensors", k=2)
    report = inspect_checkpoint(path, heat_shape=(8, 16))
    (t,) = report.tensors
    assert (t.k, t.lo, t.hi, t.block, t.shape) == (2, "fp8_e4m3", "float16", 64, (96, 64))
    assert torch.allclose(t.column_density, mask.float().mean(0))
    # The three outlier columns are hi in every row and lead the ranking.
    assert t.top_columns(3) == [(c, 1.0) for c in OUTLIERS]
    assert t.outlier_columns(0.9) == 3
    expected_positions = mask.view(96, 8, 8).sum((0, 1))
    assert torch.equal(t.position_counts, expected_positions)
    assert int(t.position_counts.sum()) == 96 * 8 * 2
    # Each heatmap cell is the hi fraction of a 12 x 4 block of the mask.
    direct = mask.float().view(8, 12, 16, 4).mean((1, 3))
    assert torch.allclose(t.heatmap, direct)
    assert t.heatmap.mean().item() == pytest.approx(2 / 8)
    assert report.passthrough == [("bias", "F32", (96,), 96 * 4)]


def test_statistics_in_slabs_and_uneven_bins(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(3)
    mask_bytes = quantize(torch.randn(37, 48, generator=gen), QuantParams(k=3)).mask
    monkeypatch.setattr(inspect_module, "_MASK_SLAB_BYTES", 48 * 5)  # 5 rows per slab
    calls = []

    def rows(r0, r1):
        calls.append((r0, r1))
        return mask_bytes[r0:r1]

    density, positions, heat = mask_statistics(rows, 37, 48, heat_shape=(5, 7))
    bits = unpack_mask(mask_bytes).float()
    assert len(calls) == 8
    assert torch.allclose(density, bits.mean(0))
    assert torch.equal(positions, bits.view(37, 6, 8).sum((0, 1)).long())
    row_bin = torch.arange(37) * 5 // 37
    col_bin = torch.arange(48) * 7 // 48
    for i in range(5):
        for j in range(7):
            cell = bits[row_bin == i][:, col_bin == j]
            assert heat[i, j].item() == pytest.approx(cell.mean().item(), rel=1e-6)


def test_check_accepts_vectors(vectors_dir: Path) -> None:
    for path in sorted(vectors_dir.glob("k*.safetensors")):
        report = check_checkpoint(path)
        assert report.tensors_checked == 3 and report.passthrough == 1


def _rewrite(path: Path, out: Path, change) -> Path:
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    change(tensors, metadata)
    # The cases edit umq.tensors as a writer without entry checksums would; with them the
    # edit itself would be caught first (rule spec-crc32, tested in test_validation.py).
    metadata.pop("umq.tensors.crc32", None)
    save_file(tensors, str(out), metadata=metadata)
    return out


def test_check_names_each_violation(tmp_path: Path) -> None:
    path, _ = _packed_file(tmp_path / "good.safetensors")

    def flip_payload(tensors, metadata):
        tensors["w.umq_data"][3, 4] ^= 0x10

    def popcount(tensors, metadata):
        # Two bits set in a k=1 mask byte, with the crc fixed so only popcount can catch it.
        tensors["w.umq_mask"][2, 1] |= 0x81 if tensors["w.umq_mask"][2, 1] != 0x81 else 0x03
        spec = json.loads(metadata["umq.tensors"])
        spec["w"]["crc32"]["mask"] = crc32(tensors["w.umq_mask"])
        metadata["umq.tensors"] = json.dumps(spec)

    def negative_scale(tensors, metadata):
        tensors["w.umq_scale"][7, 0] = -1.0
        spec = json.loads(metadata["umq.tensors"])
        spec["w"]["crc32"]["scale"] = crc32(tensors["w.umq_scale"])
        metadata["umq.tensors"] = json.dumps(spec)

    def orphan(tensors, metadata):
        tensors["extra.umq_data"] = torch.zeros(2, 9, dtype=torch.uint8)

    def version(tensors, metadata):
        metadata["umq.version"] = "2"

    def missing_part(tensors, metadata):
        del tensors["w.umq_scale"]

    cases = [(flip_payload, "crc32"), (popcount, "popcount"), (negative_scale, "scale"), (orphan, "orphan"),
             (version, "version"), (missing_part, "stored-missing")]
    for change, rule in cases:
        bad = _rewrite(path, tmp_path / f"{change.__name__}.safetensors", change)
        with pytest.raises(UMQError) as excinfo:
            check_checkpoint(bad)
        assert excinfo.value.rule == rule, change.__name__
        assert excinfo.value.file == str(bad)
        # And through the CLI: exit 2, one line naming the file and the rule.
        result = runner.invoke(app, ["inspect", str(bad), "--check"])
        assert result.exit_code == 2
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and f"rule: {rule}" in lines[0] and str(bad) in lines[0]


def test_cli_table_detail_json_png(tmp_path: Path) -> None:
    path, mask = _packed_file(tmp_path / "p.safetensors")
    result = runner.invoke(app, ["inspect", str(path), "--check"])
    assert result.exit_code == 0, result.output
    assert "check ok" in result.stdout and "1 quantized tensor" in result.stdout

    result = runner.invoke(app, ["inspect", str(path), "--tensor", "w"])
    assert result.exit_code == 0, result.output
    assert "top columns: 5 (100.0%), 40 (100.0%), 63 (100.0%)" in result.stdout
    assert "hi density heatmap" in result.stdout

    pngs = tmp_path / "pngs"
    result = runner.invoke(app, ["inspect", str(path), "--json", "--png", str(pngs), "--check"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    (t,) = payload["tensors"]
    assert payload["check"]["ok"] and payload["quantized"] == 1 and payload["passthrough"] == 1
    assert t["top_columns"][0] == {"column": 5, "density": 1.0}
    assert t["position_counts"] == mask.view(96, 8, 8).sum((0, 1)).tolist()
    assert t["mean_density"] == pytest.approx(1 / 8)
    assert os.listdir(pngs) == ["w.png"]
    png = (pngs / "w.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_errors(tmp_path: Path) -> None:
    path, _ = _packed_file(tmp_path / "p.safetensors")
    result = runner.invoke(app, ["inspect", str(path), "--tensor", "nope*"])
    assert result.exit_code == 2 and "no quantized tensor matches" in result.stderr
    result = runner.invoke(app, ["inspect", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 2 and "rule: missing" in result.stderr
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(8, 8)}, str(plain))
    result = runner.invoke(app, ["inspect", str(plain)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == f"error: {plain}: not a packed checkpoint: no quantized tensor (umq.tensors is empty " \
                            "or missing) [rule: not-packed]\n"
