"""umq pack end to end: real MiniLM, a sharded bf16 checkpoint, the conformance vectors
through the CLI, and every bad-input case (exit 2, one line, nothing left, input intact)."""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from checkpoints import make_sharded_checkpoint, minilm_dir, tree_digest
from umqcli.cli import app
from umqcli.codec import dequantize, quantize
from umqcli.format import HiFormat, QuantParams
from umqcli.io import SafetensorsWriter, open_checkpoint, read_header
from umqcli.pack import PackProgress, _PackJob, pack

runner = CliRunner()

VECTOR_FILES = {
    "k0_fp8_e4m3_block32.safetensors": ("0", "fp8_e4m3", "32"),
    "k1_fp8_e4m3_blockrow.safetensors": ("1", "fp8_e4m3", "0"),
    "k2_fp8_e5m2_block32.safetensors": ("2", "fp8_e5m2", "32"),
    "k3_fp8_e4m3_block64.safetensors": ("3", "fp8_e4m3", "64"),
    "k4_int8_block8.safetensors": ("4", "int8", "8"),
    "k8_int8_blockrow.safetensors": ("8", "int8", "0"),
}


def umq(*args) -> "CliRunner.invoke":
    return runner.invoke(app, [str(a) for a in args])


def _data_section(path: Path) -> bytes:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 + n :]


def _rel_error(weight: torch.Tensor, decoded: torch.Tensor) -> float:
    w = weight.double()
    return float(torch.linalg.vector_norm(w - decoded.double()) / torch.linalg.vector_norm(w))


def assert_refused(result, out_parent: Path, listing_before: list[str], inputs: Path, digest_before: dict,
                   words: str) -> None:
    """Exit 2, exactly one stderr line naming the problem, no traceback, nothing new on
    disk next to the output, the input unchanged."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and words in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert sorted(os.listdir(out_parent)) == listing_before
    assert tree_digest(inputs) == digest_before


# ------------------------------------------------------------------ conformance via the CLI


@pytest.mark.parametrize("vector", sorted(VECTOR_FILES))
def test_cli_reproduces_vectors(vectors_dir: Path, tmp_path: Path, vector: str) -> None:
    k, lo, block = VECTOR_FILES[vector]
    out = tmp_path / vector
    result = umq("pack", vectors_dir / "source.safetensors", "-o", out, "--k", k, "--lo", lo, "--block", block, "--json")
    assert result.exit_code == 0, result.output
    expected = vectors_dir / vector
    ours, theirs = load_file(str(out)), load_file(str(expected))
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    # Same layout (dtype rank, then name) and same bytes: the whole data section matches.
    assert _data_section(out) == _data_section(expected)
    with safe_open(str(out), "pt") as a, safe_open(str(expected), "pt") as b:
        ours_meta, theirs_meta = json.loads(a.metadata()["umq.tensors"]), json.loads(b.metadata()["umq.tensors"])
    for name, entry in theirs_meta.items():
        assert {key: ours_meta[name][key] for key in entry} == entry
        assert ours_meta[name].get("scale_rule", "absmax") == "absmax"
    summary = json.loads(result.stdout)
    assert summary["tensors_packed"] == 3 and summary["tensors_passthrough"] == 1


# ------------------------------------------------------------------ real MiniLM


@pytest.fixture(scope="module")
def minilm_packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm") / "minilm.umq"
    events: list[PackProgress] = []
    summary = pack(minilm_dir(), out, params=QuantParams(k=1), progress=events.append)
    return out, summary, events


def test_minilm_roundtrip(minilm_packed) -> None:
    out, summary, events = minilm_packed
    src = minilm_dir()
    source = load_file(str(src / "model.safetensors"))
    packed_file = out / "model.safetensors"
    with open_checkpoint(out) as ckpt:
        assert set(ckpt.specs) == {t.name for t in summary.packed}
        # Every 2-D linear weight is packed; embeddings (lookups) and 1-D tensors are not.
        expected_packed = {n for n, t in source.items() if t.dim() == 2 and "embeddings" not in n}
        assert set(ckpt.specs) == expected_packed and len(expected_packed) == 37
        assert set(ckpt.passthrough_names()) == set(source) - expected_packed
        for name in ckpt.passthrough_names():
            assert torch.equal(ckpt.get(name), source[name]), name
        worst = 0.0
        for name in sorted(ckpt.specs):
            decoded = dequantize(ckpt.packed(name))  # validates every rule and crc32
            assert decoded.dtype == torch.float32 and decoded.shape == source[name].shape
            error = _rel_error(source[name], decoded)
            # fp8 e4m3 keeps 3 mantissa bits (relative step 2^-3): rms error ~2.5% of a
            # Gaussian-like row, less with the largest element of each group kept 16-bit.
            assert error < 0.03, (name, error)
            result = next(t for t in summary.packed if t.name == name)
            assert result.rel_error == pytest.approx(error, rel=1e-5)
            assert result.error_rows == source[name].shape[0]  # small tensors: every row
            worst = max(worst, error)
        # The same bound as each tensor's above: pack sums in float32 (BLAS dot, whose
        # blocking follows the thread count), the test in float64.
        assert summary.error_worst.rel_error == pytest.approx(worst, rel=1e-5)
        # Slab-wise packing gives exactly the bytes of one whole-tensor quantize.
        for name in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.5.output.dense.weight"):
            whole = quantize(source[name], QuantParams(k=1))
            again = ckpt.packed(name)
            assert whole.spec == again.spec
            assert torch.equal(whole.data, again.data) and torch.equal(whole.scale, again.scale)
    # k=1, one fp32 scale per row of 384 / 1536 columns: 10 bits + 32/C.
    assert 10.0 < summary.packed_bits_per_element < 10.1
    assert summary.bytes_out == sum(e.nbytes for e in read_header(packed_file).entries.values())
    assert summary.bytes_in == (src / "model.safetensors").stat().st_size - read_header(src / "model.safetensors").data_start
    # Progress: monotone, ends at the totals.
    assert [e.bytes_done for e in events] == sorted(e.bytes_done for e in events)
    assert events[-1].bytes_done == events[-1].bytes_total == summary.bytes_in
    assert events[-1].tensors_done == events[-1].tensors_total == 104


def test_minilm_output_passes_inspect_check(minilm_packed) -> None:
    from umqcli.inspect import check_checkpoint, inspect_checkpoint

    out, summary, _ = minilm_packed
    report = check_checkpoint(out)
    assert report.tensors_checked == 37 and report.passthrough == 67
    assert report.bytes_checked == sum(t.bytes_out for t in summary.packed)
    (query,) = inspect_checkpoint(out, tensor="encoder.layer.0.attention.self.query.weight").tensors
    assert query.column_density.mean().item() == pytest.approx(1 / 8)  # k = 1 of every 8


def test_minilm_directory_mirrored(minilm_packed) -> None:
    out, summary, _ = minilm_packed
    src = minilm_dir()
    config = json.loads((out / "config.json").read_text())
    qc = config.pop("quantization_config")
    assert qc["quant_method"] == "umq" and qc["format_version"] == 1 and qc["k"] == 1
    assert qc["lo"] == "fp8_e4m3" and qc["quantized_tensors"] == 37
    assert config == json.loads((src / "config.json").read_text())
    digest_src, digest_out = tree_digest(src), tree_digest(out)
    others = {n for n in digest_src if n not in ("model.safetensors", "config.json") and not n.startswith(".")}
    assert others == set(summary.copied_files) and "1_Pooling/config.json" in others
    assert all(digest_out[n] == digest_src[n] for n in others)
    assert set(digest_out) == others | {"model.safetensors", "config.json"}


# ------------------------------------------------------------------ sharded bf16


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return make_sharded_checkpoint(tmp_path_factory.mktemp("sharded") / "model", shards=3, dtype=torch.bfloat16,
                                   hidden=64, intermediate=192)


def test_sharded_bf16_roundtrip_via_cli(sharded: Path, tmp_path: Path) -> None:
    out = tmp_path / "packed"
    result = umq("pack", sharded, "-o", out, "--k", "2", "--block", "32", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    src_index = json.loads((sharded / "model.safetensors.index.json").read_text())
    # Index consistent: every stored tensor is mapped to the shard that holds it.
    held: dict[str, str] = {}
    total = 0
    for shard in sorted(set(index["weight_map"].values())):
        header = read_header(out / shard)
        held.update({name: shard for name in header.entries})
        total += sum(e.nbytes for e in header.entries.values())
        with safe_open(str(out / shard), "pt") as f:
            assert set(f.keys()) == set(header.entries)
    assert held == index["weight_map"]
    assert index["metadata"]["total_size"] == total == summary["bytes_out"]
    assert sorted(set(index["weight_map"].values())) == sorted(set(src_index["weight_map"].values()))
    source = {}
    for shard in set(src_index["weight_map"].values()):
        source.update(load_file(str(sharded / shard)))
    with open_checkpoint(out) as ckpt:
        assert set(ckpt.specs) == {n for n in source if n.endswith("_proj.weight")}
        for name in ckpt.passthrough_names():
            assert torch.equal(ckpt.get(name), source[name])
        for name, spec in ckpt.specs.items():
            assert spec.dtype == "bfloat16" and spec.hi is HiFormat.BFLOAT16 and spec.k == 2 and spec.block == 32
            # Each quantized tensor lands in the shard its source came from.
            assert index["weight_map"][name + ".umq_data"] == src_index["weight_map"][name]
            packed = ckpt.packed(name)
            reference = quantize(source[name], QuantParams(k=2, block=32))
            assert torch.equal(packed.data, reference.data) and torch.equal(packed.mask, reference.mask)
            error = _rel_error(source[name], dequantize(packed))
            assert error < 0.03, (name, error)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["block"] == 32
    assert (out / "tokenizer_config.json").read_bytes() == (sharded / "tokenizer_config.json").read_bytes()


def test_two_runs_identical_and_slabs_do_not_matter(sharded: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    assert umq("pack", sharded, "-o", first, "--k", "3").exit_code == 0
    assert umq("pack", sharded, "-o", second, "--k", "3").exit_code == 0
    assert tree_digest(first) == tree_digest(second)
    # Tiny slabs (many per tensor), no worker thread: the same bytes.
    third = tmp_path / "c"
    pack(sharded, third, params=QuantParams(k=3), slab_elements=200, workers=0)
    fourth = tmp_path / "d"
    pack(sharded, fourth, params=QuantParams(k=3), slab_elements=1000, workers=2)
    assert tree_digest(third) == tree_digest(first) == tree_digest(fourth)


def test_codec_calls_serialised_when_layer_is_not_thread_safe(sharded: Path, tmp_path: Path, monkeypatch) -> None:
    """With numba's workqueue layer concurrent codec calls would abort: pack then
    serialises them (and the bytes stay the same)."""
    import umqcli.pack as pack_module

    pack(sharded, tmp_path / "free", params=QuantParams(k=2), slab_elements=1000)
    monkeypatch.setattr(pack_module._fused, "_calls_concurrent", None)
    monkeypatch.setattr(pack_module._fused, "allows_concurrent_calls", lambda: False)
    active, overlaps = [0], [0]
    real_quantize = pack_module.quantize

    def watched(*args, **kwargs):
        active[0] += 1
        overlaps[0] = max(overlaps[0], active[0])
        try:
            return real_quantize(*args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(pack_module, "quantize", watched)
    pack(sharded, tmp_path / "locked", params=QuantParams(k=2), slab_elements=1000, workers=2)
    assert overlaps[0] == 1
    assert tree_digest(tmp_path / "locked") == tree_digest(tmp_path / "free")


def test_crc32_combine_matches_zlib() -> None:
    import random
    import zlib

    from umqcli.pack import crc32_combine

    rng = random.Random(0)
    for _ in range(50):
        data = rng.randbytes(rng.randrange(0, 5000))
        cut = rng.randrange(0, len(data) + 1)
        a, b = data[:cut], data[cut:]
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(data)
    big = rng.randbytes(3 << 20)
    parts = [big[i:i + 1_000_003] for i in range(0, len(big), 1_000_003)]
    crc = 0
    for part in parts:
        crc = crc32_combine(crc, zlib.crc32(part), len(part))
    assert crc == zlib.crc32(big)


# ------------------------------------------------------------------ values


def _fp32_file(path: Path, weight: torch.Tensor) -> Path:
    save_file({"w": weight, "b": torch.zeros(weight.shape[0])}, str(path))
    return path


def test_nan_and_inf_are_refused(tmp_path: Path) -> None:
    for bad in (float("nan"), float("inf")):
        weight = torch.randn(16, 32)
        weight[9, 17] = bad
        work = tmp_path / f"w{bad}"
        work.mkdir()
        src = _fp32_file(work / "src.safetensors", weight)
        before, listing = tree_digest(src), sorted(os.listdir(work))
        result = umq("pack", src, "-o", work / "out.safetensors")
        assert_refused(result, work, listing, src, before, "[9, 17] is not finite")
        assert "tensor 'w'" in result.stderr and "rule: finite" in result.stderr


def test_fp32_beyond_fp16(tmp_path: Path) -> None:
    weight = torch.randn(64, 32)
    weight[50, 3] = 1.0e6  # in a later slab when slabs are 8 rows
    src = _fp32_file(tmp_path / "src.safetensors", weight)
    before, listing = tree_digest(src), sorted(os.listdir(tmp_path))
    result = umq("pack", src, "-o", tmp_path / "out.safetensors", "--hi", "float16")
    assert_refused(result, tmp_path, listing, src, before, "not finite in float16")
    assert "rule: hi-overflow" in result.stderr
    # hi=auto picks bfloat16 for the whole tensor, even when only a late slab needs it.
    summary = pack(src, tmp_path / "auto.safetensors", slab_elements=8 * 32)
    with open_checkpoint(tmp_path / "auto.safetensors") as ckpt:
        packed = ckpt.packed("w")
    whole = quantize(weight, QuantParams())
    assert packed.spec.hi is HiFormat.BFLOAT16 and whole.spec == packed.spec
    assert torch.equal(packed.data, whole.data)
    assert summary.packed[0].rel_error == pytest.approx(_rel_error(weight, dequantize(whole)), rel=1e-6)


def test_large_slab_error_is_row_sampled(tmp_path: Path) -> None:
    weight = torch.randn(2048, 1024, generator=torch.Generator().manual_seed(5)).half()
    src = tmp_path / "big.safetensors"
    save_file({"w": weight}, str(src))
    summary = pack(src, tmp_path / "out.safetensors")
    (result,) = summary.packed
    assert result.error_rows == 1024  # 2 Mi elements in one slab: 1 Mi of them, rows 512..1535
    exact = _rel_error(weight, dequantize(quantize(weight, QuantParams())))
    assert result.rel_error == pytest.approx(exact, rel=0.01)
    assert result.to_json()["rel_error_rows"] == 1024


def test_int_and_3d_pass_through_cli(tmp_path: Path) -> None:
    src = tmp_path / "mixed.safetensors"
    tensors = {"ids": torch.arange(64).view(8, 8), "conv": torch.randn(4, 8, 8), "w": torch.randn(8, 16).half()}
    save_file(tensors, str(src))
    result = umq("pack", src, "-o", tmp_path / "out.safetensors", "--json")
    assert result.exit_code == 0, result.output
    rows = {t["name"]: t for t in json.loads(result.stdout)["tensors"]}
    assert rows["ids"]["action"] == rows["conv"]["action"] == "passthrough"
    assert "I64" in rows["ids"]["reason"] and "3-D" in rows["conv"]["reason"]
    assert rows["w"]["action"] == "packed" and rows["w"]["params"]["hi"] == "float16"
    out = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(out["ids"], tensors["ids"]) and torch.equal(out["conv"], tensors["conv"])


def test_recipe_and_stats(sharded: Path, tmp_path: Path) -> None:
    from umqcli.recipe import Recipe, RecipeEntry

    q = "model.layers.0.self_attn.q_proj.weight"
    recipe = Recipe(tensors={q: RecipeEntry(QuantParams(k=4, lo="int8", selection="activation"), 0.01, 13.0, "x"),
                             "model.layers.1.mlp.up_proj.weight": RecipeEntry(None, reason="sensitive")},
                    defaults=QuantParams(k=2))
    recipe_path = recipe.save(tmp_path / "recipe.json")
    listing, before = sorted(os.listdir(tmp_path)), tree_digest(sharded)
    # Activation selection without statistics: refused before anything is written.
    result = umq("pack", sharded, "-o", tmp_path / "out", "--recipe", recipe_path)
    assert_refused(result, tmp_path, listing, sharded, before, "activation")
    act_sq = {q: torch.linspace(0.1, 10.0, 64)}
    summary = pack(sharded, tmp_path / "out", params=recipe.defaults, recipe=recipe, act_sq=act_sq)
    rows = {t.name: t for t in summary.tensors}
    assert rows[q].spec.k == 4 and rows[q].spec.selection == "activation" and rows[q].predicted_rel_error == 0.01
    assert rows["model.layers.1.mlp.up_proj.weight"].action == "passthrough"
    assert rows["model.layers.1.mlp.gate_proj.weight"].spec.k == 2
    with open_checkpoint(tmp_path / "out") as ckpt:
        source = open_checkpoint(sharded)
        reference = quantize(source.get(q), QuantParams(k=4, lo="int8", selection="activation"), act_sq=act_sq[q])
        assert torch.equal(ckpt.packed(q).data, reference.data)
        source.close()


def test_recipe_via_cli(sharded: Path, tmp_path: Path) -> None:
    from umqcli.recipe import Recipe, RecipeEntry

    q = "model.layers.0.self_attn.q_proj.weight"
    recipe = Recipe(tensors={q: RecipeEntry(QuantParams(k=3, lo="fp8_e5m2", block=32), 0.02, 12.0, "x"),
                             "lm_head.weight": RecipeEntry(QuantParams(k=2))},
                    defaults=QuantParams(k=0, lo="int8"))
    path = recipe.save(tmp_path / "recipe.json")
    # Recipe defaults for the tensors it does not name...
    rows = {t["name"]: t for t in json.loads(
        umq("pack", sharded, "-o", tmp_path / "a", "--recipe", path, "--json").stdout)["tensors"]}
    assert rows[q]["params"]["k"] == 3 and rows[q]["params"]["lo"] == "fp8_e5m2" and rows[q]["reason"] == "recipe"
    assert rows["lm_head.weight"]["action"] == "packed"  # named by the recipe: default exclusion lifted
    other = rows["model.layers.1.mlp.up_proj.weight"]
    assert other["params"]["k"] == 0 and other["params"]["lo"] == "int8" and other["reason"] == "recipe defaults"
    # ...and flags override those defaults, never the recipe's own entries.
    rows = {t["name"]: t for t in json.loads(
        umq("pack", sharded, "-o", tmp_path / "b", "--recipe", path, "--k", "5", "--json").stdout)["tensors"]}
    assert rows[q]["params"]["k"] == 3
    other = rows["model.layers.1.mlp.up_proj.weight"]
    assert other["params"]["k"] == 5 and other["params"]["lo"] == "int8" and other["reason"] == "flags"


# ------------------------------------------------------------------ bad input via the CLI


def _good_file(tmp_path: Path) -> Path:
    src = tmp_path / "in" / "src.safetensors"
    src.parent.mkdir()
    save_file({"w": torch.randn(16, 32), "v": torch.randn(8, 64)}, str(src))
    return src


@pytest.mark.parametrize(
    "corrupt, words",
    [
        (lambda p: p.unlink(), "no such file"),
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "rule: header-offsets"),
        (lambda p: p.write_bytes(p.read_bytes()[:20]), "rule: truncated"),
        (lambda p: p.write_text("hello, I am a text file\n" * 10), "rule: not-safetensors"),
        (lambda p: p.write_bytes(p.read_bytes().replace(b'"shape":[16,32]', b'"shape":[16,40]')), "rule: header-size"),
    ],
    ids=["missing", "truncated-data", "truncated-header", "not-safetensors", "lying-header"],
)
def test_bad_files(tmp_path: Path, corrupt, words: str) -> None:
    src = _good_file(tmp_path)
    corrupt(src)
    listing, before = sorted(os.listdir(tmp_path)), tree_digest(src.parent)
    result = umq("pack", src, "-o", tmp_path / "out.safetensors")
    assert_refused(result, tmp_path, listing, src.parent, before, words)
    assert str(src) in result.stderr


def test_index_traversal_refused(sharded: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for f in sharded.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    index = json.loads((model / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../etc/passwd"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    listing, before = sorted(os.listdir(tmp_path)), tree_digest(model)
    result = umq("pack", model, "-o", tmp_path / "out")
    assert_refused(result, tmp_path, listing, model, before, "points outside the model directory")
    assert "rule: index-path" in result.stderr


def test_output_paths_refused(sharded: Path, tmp_path: Path) -> None:
    src = _good_file(tmp_path)
    listing, before = sorted(os.listdir(src.parent)), tree_digest(src.parent)
    assert_refused(umq("pack", src, "-o", src), src.parent, listing, src.parent, before, "rule: out-is-src")
    assert_refused(umq("pack", src, "-o", src, "--force"), src.parent, listing, src.parent, before, "rule: out-is-src")
    listing_model, before_model = sorted(os.listdir(sharded)), tree_digest(sharded)
    assert_refused(umq("pack", sharded, "-o", sharded / "packed"), sharded, listing_model, sharded, before_model,
                   "rule: out-inside-src")
    # An existing output needs --force; without it the old output stays as it was.
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    listing = sorted(os.listdir(tmp_path))
    assert_refused(umq("pack", src, "-o", out), tmp_path, listing, src.parent, before, "rule: out-exists")
    assert out.read_bytes() == b"precious"
    assert umq("pack", src, "-o", out, "--force").exit_code == 0
    assert set(load_file(str(out))) == {"w.umq_data", "w.umq_mask", "w.umq_scale", "v.umq_data", "v.umq_mask", "v.umq_scale"}
    assert sorted(os.listdir(tmp_path)) == listing


def test_default_output_name(tmp_path: Path) -> None:
    src = _good_file(tmp_path)
    assert umq("pack", src).exit_code == 0
    assert sorted(os.listdir(src.parent)) == ["src.safetensors", "src.umq.safetensors"]


def test_disk_full_leaves_nothing(sharded: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous output")  # --force must keep it on failure
    listing, before = sorted(os.listdir(tmp_path)), tree_digest(sharded)
    real = SafetensorsWriter.write_part
    calls = {"n": 0}

    def failing(self, name, offset, tensor):
        calls["n"] += 1
        if calls["n"] == 12:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return real(self, name, offset, tensor)

    monkeypatch.setattr(SafetensorsWriter, "write_part", failing)
    result = umq("pack", sharded, "-o", out, "--force")
    assert calls["n"] == 12
    assert_refused(result, tmp_path, listing, sharded, before, "No space left on device")
    assert (out / "old.txt").read_text() == "previous output" and os.listdir(out) == ["old.txt"]


def test_ctrl_c_from_progress_leaves_nothing(sharded: Path, tmp_path: Path, monkeypatch) -> None:
    listing, before = sorted(os.listdir(tmp_path)), tree_digest(sharded)
    seen: list[PackProgress] = []

    def interrupt(event: PackProgress) -> None:
        seen.append(event)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pack(sharded, tmp_path / "out", progress=interrupt, slab_elements=1000)
    assert len(seen) == 5 and 0 < seen[-1].bytes_done < seen[-1].bytes_total
    assert sorted(os.listdir(tmp_path)) == listing and tree_digest(sharded) == before

    # The same through the CLI: Ctrl-C midway is one line and exit 2.
    real = _PackJob._report
    calls = {"n": 0}

    def report(self, current):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(self, current)

    monkeypatch.setattr(_PackJob, "_report", report)
    result = umq("pack", sharded, "-o", tmp_path / "out")
    assert_refused(result, tmp_path, listing, sharded, before, "interrupted")


def test_bad_flags(tmp_path: Path) -> None:
    src = _good_file(tmp_path)
    listing, before = sorted(os.listdir(tmp_path)), tree_digest(src.parent)
    assert_refused(umq("pack", src, "-o", tmp_path / "o", "--k", "9"), tmp_path, listing, src.parent, before, "rule: k")
    assert_refused(umq("pack", src, "-o", tmp_path / "o", "--hi", "float8"), tmp_path, listing, src.parent, before,
                   "rule: hi")
    assert_refused(umq("pack", src, "-o", tmp_path / "o", "--include", "re:("), tmp_path, listing, src.parent,
                   before, "rule: pattern")
