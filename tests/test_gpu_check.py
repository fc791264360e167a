"""``benchmarks/gpu_check.py --cpu-dry-run``: the one-command device check, run on the
CPU host shim so that it cannot rot before a GPU ever runs it (same code path up to the
first CUDA call; small shapes; the timings are the shim's and mean nothing)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check", None)
        sys.path.remove(str(REPO / "benchmarks"))


def test_dry_run_fills_every_table(gpu_check, tmp_path, capsys):
    report = gpu_check.main([str(tmp_path), "--cpu-dry-run", "--skip-pytest"])
    assert not report.get("errors"), report.get("errors")
    assert json.loads((tmp_path / "gpu_check.json").read_text())["llm"]["timings"] == json.loads(
        json.dumps(report["llm"]["timings"]))
    profile = gpu_check.DRY_PROFILE
    # MiniLM: the real weights, every config: 3 decodes + 4 products per tensor and config.
    minilm = report["minilm"]
    assert minilm["tensors"] == profile.minilm_tensors and not minilm["failed"]
    assert len(minilm["checks"]) == profile.minilm_tensors * len(gpu_check.MINILM_CONFIGS) * 7
    checks = report["llm"]["checks"]
    assert len(checks) == len(profile.llm_shapes) * len(profile.k_values) * 6 and all(c["passed"] for c in checks)
    assert all(0.0 <= c["worst_error_over_bound"] <= 1.0 for c in checks if "worst_error_over_bound" in c)
    # Timings: every path at every M next to both baselines, the targets on their rows.
    timings = report["llm"]["timings"]
    plans = len(profile.gemv_ms) + len(profile.tile_ms) + 1 + 2
    assert len(timings) == len(profile.llm_shapes) * len(profile.k_values) * plans
    assert all(row["ms"] > 0 and row["bf16_ms"] > 0 and row["fp8_ms"] > 0 for row in timings)
    targeted = [row for row in timings if row["target"]]
    assert {(row["path"], row["M"]) for row in targeted} == {("gemv", 1), ("split", profile.large_m)}
    table = capsys.readouterr().out
    assert "CPU DRY RUN" in table and table.count("\n| ") == len(timings) + 2  # + header, rule
    assert "pytest -m gpu: skipped" in table


def test_pytest_section_finds_the_gpu_tests(gpu_check):
    files = gpu_check.gpu_test_files()
    assert "tests/test_backends.py" in files and "tests/test_verify.py" in files
    assert "tests/test_gpu_check.py" not in files  # no gpu-marked test here
