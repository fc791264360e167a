"""Activation statistics: streaming accumulation, the fixed-size sample, the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from umqcli.errors import UMQError
from umqcli.stats import (
    OUTLIER_THRESHOLD,
    ActivationAccumulator,
    ChannelStats,
    load_stats,
    read_stats_metadata,
    save_stats,
)


def _batches(seed: int = 0, sizes=(5, 17, 1, 40, 9), channels: int = 24) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, channels, generator=g) * torch.linspace(0.1, 9.0, channels)
        out.append(x)
    return out


def _run(batches, *, sample_rows=8, seed=0, name="layer.weight") -> ChannelStats:
    acc = ActivationAccumulator(sample_rows=sample_rows, seed=seed)
    for x in batches:
        acc.update(name, x)
    return acc.result()[name]


def test_running_statistics_equal_the_direct_computation():
    batches = _batches()
    rows = torch.cat(batches)
    stats = _run(batches)
    expected_sq = rows.double().square().mean(0).float()
    assert torch.allclose(stats.act_sq, expected_sq, rtol=1e-6, atol=0)
    assert torch.equal(stats.absmax, rows.abs().amax(0))
    assert torch.equal(stats.outliers, (rows.abs() > OUTLIER_THRESHOLD).sum(0))
    assert stats.rows == rows.shape[0]
    assert stats.outlier_channels == int(((rows.abs() > OUTLIER_THRESHOLD).sum(0) > 0).sum())
    # The test data does have outliers in the wide channels and none in the narrow ones.
    assert 0 < stats.outlier_channels < rows.shape[1]


def test_leading_dimensions_are_flattened():
    x = torch.randn(3, 7, 16)
    acc = ActivationAccumulator(sample_rows=4)
    acc.update("w", x)
    assert torch.allclose(acc.result()["w"].act_sq, x.reshape(-1, 16).square().mean(0))
    assert acc.result()["w"].rows == 21


def test_sample_rows_are_real_input_rows_in_order_seen():
    batches = _batches()
    rows = torch.cat(batches)
    stats = _run(batches, sample_rows=8)
    assert stats.sample.shape == (8, rows.shape[1])
    # every sampled row is one of the inputs, each at most once, in input order
    matches = (stats.sample[:, None, :] == rows[None, :, :]).all(-1)
    index = matches.float().argmax(1)
    assert bool(matches.any(1).all())
    assert torch.equal(index, index.sort().values) and index.unique().numel() == 8


def test_sample_is_smaller_when_fewer_rows_were_seen():
    stats = _run([torch.randn(3, 8)], sample_rows=8)
    assert stats.sample.shape == (3, 8)
    none = _run([torch.randn(3, 8)], sample_rows=0)
    assert none.sample.shape == (0, 8)


def test_deterministic_for_a_seed_and_different_across_seeds():
    a = _run(_batches(), seed=3)
    b = _run(_batches(), seed=3)
    c = _run(_batches(), seed=4)
    for field in ("act_sq", "absmax", "outliers", "sample"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.sample, c.sample)
    assert torch.equal(a.act_sq, c.act_sq)


def test_sample_of_one_layer_does_not_depend_on_other_layers():
    batches = _batches()
    alone = _run(batches, name="a.weight")
    acc = ActivationAccumulator(sample_rows=8, seed=0)
    for x in batches:
        acc.update("b.weight", x * 2)
        acc.update("a.weight", x)
    assert torch.equal(acc.result()["a.weight"].sample, alone.sample)


def test_sample_is_roughly_uniform_over_the_stream():
    # 2000 rows, 100 sampled: the mean row index is near the middle (std of the mean ~58).
    acc = ActivationAccumulator(sample_rows=100, seed=0)
    for start in range(0, 2000, 50):
        acc.update("w", torch.arange(start, start + 50, dtype=torch.float32)[:, None].repeat(1, 8))
    picked = acc.result()["w"].sample[:, 0]
    assert abs(float(picked.mean()) - 999.5) < 250


def test_memory_is_bounded_by_the_sample_not_the_stream():
    acc = ActivationAccumulator(sample_rows=16, seed=0)
    acc.update("w", torch.randn(64, 32))
    after_one = acc.nbytes
    for _ in range(50):
        acc.update("w", torch.randn(64, 32))
    assert acc.nbytes == after_one
    # three [C] vectors (float64 sum, float32 max, int64 count) + 16 x (row, key, index)
    assert after_one == 32 * (8 + 4 + 8) + 16 * (32 * 4 + 8 + 8)


def test_channel_count_change_is_refused():
    acc = ActivationAccumulator()
    acc.update("w", torch.randn(4, 16))
    with pytest.raises(UMQError) as info:
        acc.update("w", torch.randn(4, 24))
    assert info.value.rule == "stats" and info.value.tensor == "w" and "24" in str(info.value)


def test_save_load_round_trip(tmp_path: Path):
    acc = ActivationAccumulator(sample_rows=4, seed=1)
    for x in _batches():
        acc.update("encoder.layer.0.attention.self.query.weight", x)
        acc.update("pooler.dense.weight", x[:, :16])
    stats = acc.result()
    path = tmp_path / "stats.safetensors"
    save_stats(path, stats, {"tokens": 72, "samples": 5, "seed": 1, "source": "test"})
    loaded = load_stats(path)
    assert set(loaded) == set(stats)
    for name, item in stats.items():
        for field in ("act_sq", "absmax", "outliers", "sample"):
            assert torch.equal(getattr(loaded[name], field), getattr(item, field))
        assert loaded[name].rows == item.rows
    meta = read_stats_metadata(path)
    assert meta["umq.stats"] == "2" and meta["tokens"] == "72" and meta["seed"] == "1"
    assert json.loads(meta["rows"]) == {name: item.rows for name, item in stats.items()}
    raw = load_file(str(path))
    assert raw["pooler.dense.weight.act_sq"].dtype == torch.float32
    assert raw["pooler.dense.weight.outliers"].dtype == torch.int64
    assert raw["pooler.dense.weight.sample"].shape == (4, 16)
    assert [p.name for p in tmp_path.iterdir()] == ["stats.safetensors"]  # no temp file left


def test_save_refuses_inconsistent_stats_and_leaves_nothing(tmp_path: Path):
    bad = ChannelStats(torch.ones(8), torch.ones(8), torch.zeros(8, dtype=torch.int64), torch.zeros(2, 16))
    with pytest.raises(UMQError) as info:
        save_stats(tmp_path / "s.safetensors", {"w": bad})
    assert info.value.rule == "stats" and info.value.tensor == "w" and "16" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_load_errors_name_file_and_rule(tmp_path: Path):
    with pytest.raises(UMQError) as info:
        load_stats(tmp_path / "missing.safetensors")
    assert info.value.rule == "stats-file" and "missing.safetensors" in str(info.value)

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 40)
    with pytest.raises(UMQError) as info:
        load_stats(junk)
    assert info.value.rule == "stats-file"

    plain = tmp_path / "plain.safetensors"
    save_file({"w.act_sq": torch.ones(8)}, str(plain), metadata={"format": "pt"})
    with pytest.raises(UMQError) as info:
        load_stats(plain)
    assert info.value.rule == "stats-version" and "umq calibrate" in str(info.value)

    future = tmp_path / "future.safetensors"
    save_file({"w.act_sq": torch.ones(8)}, str(future), metadata={"umq.stats": "9"})
    with pytest.raises(UMQError) as info:
        load_stats(future)
    assert info.value.rule == "stats-version" and "'9'" in str(info.value)

    partial = tmp_path / "partial.safetensors"
    save_file({"w.act_sq": torch.ones(8), "w.absmax": torch.ones(8)}, str(partial), metadata={"umq.stats": "1"})
    with pytest.raises(UMQError) as info:
        load_stats(partial)
    assert info.value.rule == "stats" and info.value.tensor == "w" and "w.outliers" in str(info.value)

    wrong = tmp_path / "wrong.safetensors"
    save_file({"w.act_sq": torch.ones(8), "w.absmax": torch.ones(8), "w.outliers": torch.zeros(8),
               "w.sample": torch.zeros(1, 8)}, str(wrong), metadata={"umq.stats": "1"})
    with pytest.raises(UMQError) as info:
        load_stats(wrong)
    assert info.value.rule == "stats" and "outliers" in str(info.value)  # float32, not int64


def test_uniform_stats_weight_every_channel_equally():
    item = ChannelStats.uniform(24)
    item.check("w")
    assert torch.equal(item.act_sq, torch.ones(24)) and item.sample.shape == (0, 24)


def test_a_weight_reading_the_same_input_gets_a_copy_of_its_statistics():
    """same_input_as: the rows are measured once, the second weight gets equal but its own
    tensors (a stats file cannot hold one tensor twice) and shares the Hessian; naming
    another source later is refused."""
    acc = ActivationAccumulator(sample_rows=4)
    for x in _batches():
        acc.update("q.weight", x, hessian_key="q.weight")
        acc.update("k.weight", x, hessian_key="q.weight", same_input_as="q.weight")
    stats = acc.result()
    assert list(stats) == ["q.weight", "k.weight"]
    for field in ("act_sq", "absmax", "outliers", "sample"):
        q, k = getattr(stats["q.weight"], field), getattr(stats["k.weight"], field)
        assert torch.equal(q, k) and q.data_ptr() != k.data_ptr()
    assert stats["k.weight"].rows == stats["q.weight"].rows and stats["k.weight"].hessian is stats["q.weight"].hessian
    with pytest.raises(UMQError) as info:
        acc.update("k.weight", _batches()[0], same_input_as="v.weight")
    assert info.value.rule == "stats"
