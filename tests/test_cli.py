"""The command line as a user meets it: help screens, --version, and output that goes
to a pipe or a log rather than a terminal."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from umqcli.cli import app

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "examples" / "minilm_layer0.safetensors"
COMMANDS = ("pack", "inspect", "verify", "unpack", "compare", "calibrate", "version")

runner = CliRunner()


def _umq(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``umq ARGS`` in a child process whose stdout and stderr are pipes (not a TTY)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("COLUMNS", None)
    code = "import sys; from umqcli.cli import main; sys.argv[0] = 'umq'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def test_version_option_and_command_agree() -> None:
    option = runner.invoke(app, ["--version"])
    command = runner.invoke(app, ["version"])
    assert option.exit_code == 0 and command.exit_code == 0
    assert re.fullmatch(r"umq \d+\.\d+\.\d+ \(FORMAT v1\)\n", option.output)
    assert option.output == command.output


@pytest.mark.parametrize("command", COMMANDS)
def test_help_screens_look_like_click(command: str) -> None:
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    text = res.output
    assert "<bool>" not in text  # flags take no value
    assert "list[" not in text  # repeatable options show their element type
    assert "…" not in text  # nothing cut off
    usage = re.search(r"Usage: umq (\S+) (.*)", text)
    assert usage and usage.group(1) == command
    assert "{" not in usage.group(2) and usage.group(2).strip() == usage.group(2).strip().upper(), usage.group(0)
    assert "(default:" not in text  # one style for defaults: [default: ...]


def test_help_shows_flags_bare_and_pack_defaults_bracketed() -> None:
    text = runner.invoke(app, ["pack", "--help"], env={"COLUMNS": "200"}).output
    assert re.search(r"--force\s+Replace an existing output", text)
    assert re.search(r"--help\s+Show this message and exit", text)
    assert re.search(r"--include\s+<str>", text)
    assert "Usage: umq pack [OPTIONS] SRC" in text
    assert "[default: 1]" in text and "[default: fp8_e4m3]" in text
    root = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert re.search(r"--version\s+Print the umq version", root)


def test_calibrate_help_shows_the_whole_candidates_default() -> None:
    text = runner.invoke(app, ["calibrate", "--help"], env={"COLUMNS": "80"}).output
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())
    assert "[default: k = 0-8, lo = fp8_e4m3+int8, block = row+32+128, selection = magnitude+activation]" in flat


def test_piped_output_has_no_bar_remnants_and_full_names(tmp_path: Path) -> None:
    src = tmp_path / "layer0.safetensors"
    shutil.copyfile(EXAMPLE, src)
    first = _umq("pack", str(src), "-o", "out.safetensors", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""  # no progress bar written to a pipe
    assert "encoder.layer.0.attention.self.value.weight" in first.stdout  # not cut at 80 columns
    assert "…" not in first.stdout
    again = _umq("pack", str(src), "-o", "out.safetensors", cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr == "error: out.safetensors: exists (pass --force to replace it) [rule: out-exists]\n"
    assert again.stdout == ""


def test_packaging_ships_every_package_and_kernel_source() -> None:
    import fnmatch
    import tomllib

    from setuptools import find_namespace_packages

    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert isinstance(config["project"]["license"], str)  # SPDX expression, not the deprecated table
    assert all((REPO_ROOT / f).is_file() for f in config["project"]["license-files"])
    find = config["tool"]["setuptools"]["packages"]["find"]
    found = set(find_namespace_packages(where=str(REPO_ROOT), include=find["include"]))
    on_disk = {str(d.relative_to(REPO_ROOT)).replace("/", ".") for d in (REPO_ROOT / "umqcli").rglob("*")
               if d.is_dir() and d.name != "__pycache__" and any(d.iterdir())}
    assert on_disk | {"umqcli"} <= found
    package_data = config["tool"]["setuptools"]["package-data"]["umqcli.kernels"]
    kernel_files = [p.name for p in (REPO_ROOT / "umqcli" / "kernels").iterdir()]
    assert {"host_shim.cpp", "host_shim.h", "umq_common.cuh", "umq_decode.cu"} <= set(kernel_files)
    assert all(any(fnmatch.fnmatch(name, pattern) for pattern in package_data) for name in kernel_files)
    runtime_sources = [p.name for p in (REPO_ROOT / "umqcli" / "runtime").glob("*.cpp")]
    assert runtime_sources and all(any(fnmatch.fnmatch(n, p) for p in config["tool"]["setuptools"]["package-data"]
                                       ["umqcli.runtime"]) for n in runtime_sources)


@pytest.mark.parametrize("args", [["inspect"], ["inspect", "--check"], ["verify"], ["unpack", "-o", "dense.safetensors"]],
                         ids=["inspect", "inspect-check", "verify", "unpack"])
def test_every_reader_refuses_an_unpacked_file_the_same_way(args: list[str], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, [args[0], str(EXAMPLE), *args[1:]])
    assert res.exit_code == 2
    assert res.stderr == (f"error: {EXAMPLE}: not a packed checkpoint: no quantized tensor (umq.tensors is empty or "
                          "missing) [rule: not-packed]\n")
    assert not (tmp_path / "dense.safetensors").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["pack", "{src}", "--k", "9"], "error: {src}: k must be an integer in 0..8, got 9 [rule: k]\n"),
        (["pack", "{src}", "--hi", "float8"],
         "error: {src}: unknown hi 'float8' (one of: auto, float16, bfloat16) [rule: hi]\n"),
        (["pack", "{src}", "--select", "activation"],
         "error: {src}: tensor 'encoder.layer.0.attention.output.dense.weight': selection 'activation' needs its "
         "activation statistics (pass --stats from umq calibrate) [rule: activation-stats]\n"),
        (["verify", "{src}", "--backend", "cuda"], "(use --backend torch or auto) [rule: backend]\n"),
        (["verify", "{src}", "--max-rel-error", "inf"],
         "error: --max-rel-error must be a finite number >= 0, got inf [rule: tolerance]\n"),
    ],
    ids=["k", "hi", "activation-stats", "backend", "tolerance"],
)
def test_bad_input_names_file_rule_valid_values_and_flags(args: list[str], expected: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from umqcli.backends import cuda

    if "cuda" in args and cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.chdir(tmp_path)
    src = str(EXAMPLE)
    res = runner.invoke(app, [a.format(src=src) for a in args])
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.endswith(expected.format(src=src)), res.stderr
    assert res.stderr.count("\n") == 1 and list(tmp_path.iterdir()) == []


def test_core_errors_never_name_command_line_flags() -> None:
    """UMQError messages and hints raised outside umqcli/cli/ speak the library's terms;
    the CLI words them as flags (FLAG_HINTS)."""
    import ast

    offenders = []
    for path in sorted((REPO_ROOT / "umqcli").rglob("*.py")):
        if "cli" in path.relative_to(REPO_ROOT / "umqcli").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "UMQError":
                for text in (n.value for n in ast.walk(node) if isinstance(n, ast.Constant)):
                    if isinstance(text, str) and re.search(r"(^|[\s(`'])--[a-z]", text):
                        offenders.append(f"{path.name}:{node.lineno}: {text}")
    assert offenders == []


@pytest.fixture(scope="module")
def packed_example(tmp_path_factory) -> Path:
    from umqcli.pack import pack

    out = tmp_path_factory.mktemp("packed") / "layer0.umq.safetensors"
    pack(EXAMPLE, out)
    return out


def test_verify_without_reference_says_it_checked_integrity_only(packed_example: Path) -> None:
    res = runner.invoke(app, ["verify", str(packed_example), "--backend", "torch"])
    assert res.exit_code == 0, res.output
    flat = " ".join(res.stdout.split())
    assert "integrity only (no --reference, so no quantization error was measured" in flat
    assert "%" not in res.stdout and "SQNR" not in res.stdout and "inf" not in res.stdout
    assert flat.count(" same ") == 6  # the torch matmul equals the codec's decode for all six
    payload = json.loads(runner.invoke(app, ["verify", str(packed_example), "--json", "--backend", "torch"]).stdout)
    assert payload["measures_quantization"] is False


def _example_stats(path: Path, seed: int = 0) -> Path:
    """A stats file with 128 Gaussian input rows for every weight of the example."""
    from safetensors.torch import load_file

    from umqcli.stats import ChannelStats, save_stats

    gen = torch.Generator().manual_seed(seed)
    stats = {}
    for name, weight in load_file(str(EXAMPLE)).items():
        if weight.dim() == 2 and "embeddings" not in name:
            sample = torch.randn(128, weight.shape[1], generator=gen) * torch.linspace(0.1, 3.0, weight.shape[1])
            stats[name] = ChannelStats(act_sq=sample.square().mean(0), absmax=sample.abs().amax(0),
                                       outliers=torch.zeros(weight.shape[1], dtype=torch.int64), sample=sample, rows=128)
    save_stats(path, stats)
    return path


def test_verify_header_counts_the_rows_really_used(packed_example: Path, tmp_path: Path) -> None:
    stats_path = _example_stats(tmp_path / "stats.safetensors")
    args = ["verify", str(packed_example), "--reference", str(EXAMPLE), "--activations", str(stats_path),
            "--backend", "torch"]
    res = runner.invoke(app, args, env={"COLUMNS": "240"})  # xdist workers set COLUMNS=80
    assert res.exit_code == 0, res.output
    header = " ".join(res.stdout.split("┏")[0].split())
    assert f"on 128 rows of activations from {stats_path} (the stats file's sample; --rows 256 caps it)" in header
    assert "256 rows" not in header
    payload = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert payload["rows"] == 256 and payload["rows_used"] == [128]
    assert {t["rows"] for t in payload["tensors"]} == {128}
    # Every column is labelled and explained; percentages have one format.
    assert "FP8" in res.stdout and "per-channel" in res.stdout and "status" in res.stdout
    assert "max abs error = max |Y - Y_ref|" in " ".join(res.stdout.split())
    assert all(re.fullmatch(r"\d+\.\d\d%", p) for p in re.findall(r"[\d.]+%", res.stdout))


def test_unpack_names_the_dtype_it_wrote(packed_example: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["unpack", str(packed_example), "-o", str(tmp_path / "dense.safetensors")])
    assert res.exit_code == 0, res.output
    assert re.search(r"dtype of decoded tensors\s*│\s*float16 \(each tensor's source dtype\)", res.stdout)
    res = runner.invoke(app, ["unpack", str(packed_example), "-o", str(tmp_path / "d32.safetensors"), "--dtype",
                              "float32"])
    assert re.search(r"dtype of decoded tensors\s*│\s*float32\s*│", res.stdout)


def test_explanations_count_outlier_channels_in_good_english() -> None:
    from umqcli.calibrate.candidates import Candidate, TensorChoice
    from umqcli.calibrate.explain import explain
    from umqcli.format import QuantParams

    def choice(name: str, outliers: int) -> TensorChoice:
        pick = Candidate(QuantParams(k=1), 10.0, 1e-4)
        return TensorChoice(name, (8, 8), [pick], [pick], chosen=pick, outlier_channels=outliers)

    one, three = choice("a", 1), choice("b", 3)
    explain([one, three])
    assert "1 outlier input channel (|x|>6)" in one.reason
    assert "3 outlier input channels (|x|>6)" in three.reason


def test_budget_below_the_cheapest_mix_is_refused_before_any_statistics(tmp_path: Path) -> None:
    from umqcli.calibrate import calibrate
    from umqcli.errors import UMQError

    # The statistics file does not exist: reading it would fail with another rule.
    with pytest.raises(UMQError) as info:
        calibrate(EXAMPLE, stats_in=tmp_path / "nowhere.safetensors", budget_bits=8.0)
    assert info.value.rule == "budget"
    res = runner.invoke(app, ["calibrate", str(EXAMPLE), "-o", str(tmp_path / "r.json"), "--budget-bits", "8"])
    assert res.exit_code == 2
    assert re.search(r"budget 8\.000 bits/element is below the cheapest candidate mix \(9\.0\d\d bits/element\) "
                     r"\[rule: budget\]\n$", res.stderr), res.stderr
    assert not (tmp_path / "r.json").exists()


def test_calibrate_prints_a_next_command_that_writes_next_to_the_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "recipes" / "r.json"
    recipe.parent.mkdir()
    res = runner.invoke(app, ["calibrate", str(EXAMPLE), "-o", str(recipe), "--budget-bits", "11",
                              "--candidates", "k=1-2,lo=int8,block=row,selection=magnitude"],
                        env={"COLUMNS": "60"})
    assert res.exit_code == 0, res.output
    expected = (f"umq pack {EXAMPLE} --recipe {recipe} -o {recipe.parent / 'minilm_layer0.umq.safetensors'}")
    assert expected + "\n" in res.stdout  # whole, on one line, even in 60 columns
    saved = json.loads(recipe.read_text())
    assert "mean_s ||W x_s||^2" in saved["search"]["error_metric"]  # the formula the docs state


def test_pack_recipe_uses_the_statistics_it_was_calibrated_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from umqcli.calibrate import CandidateSpace, calibrate

    work = tmp_path / "calib"
    work.mkdir()
    stats = _example_stats(work / "stats.safetensors")
    recipe = work / "recipe.json"
    calibrate(EXAMPLE, stats_in=stats, recipe_out=recipe, budget_bits=11.0,
              space=CandidateSpace.parse("k=1-2,lo=int8,block=row,selection=activation"))
    saved = json.loads(recipe.read_text())
    assert saved["stats"] == "stats.safetensors" and len(saved["stats_sha256"]) == 64
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the path is relative to the recipe, not to the working directory
    res = runner.invoke(app, ["pack", str(EXAMPLE), "--recipe", str(recipe), "-o", "a.safetensors", "--json"])
    assert res.exit_code == 0, res.output
    explicit = runner.invoke(app, ["pack", str(EXAMPLE), "--recipe", str(recipe), "--stats", str(stats),
                                   "-o", "b.safetensors", "--json"])
    assert explicit.exit_code == 0, explicit.output
    assert (elsewhere / "a.safetensors").read_bytes() == (elsewhere / "b.safetensors").read_bytes()
    # Other statistics (given, or swapped in under the recorded name) are refused.
    other = _example_stats(tmp_path / "other.safetensors", seed=1)
    for args in (["--stats", str(other)], []):
        if not args:
            other.replace(stats)
        res = runner.invoke(app, ["pack", str(EXAMPLE), "--recipe", str(recipe), *args, "-o", "c.safetensors"])
        assert res.exit_code == 2
        assert re.search(r"not the statistics the recipe .*recipe\.json was calibrated with \(sha256 [0-9a-f]{12}\.\.\., "
                         r"the recipe records [0-9a-f]{12}\.\.\.\) \[rule: stats-mismatch\]\n$", res.stderr), res.stderr
    stats.unlink()
    res = runner.invoke(app, ["pack", str(EXAMPLE), "--recipe", str(recipe), "-o", "c.safetensors"])
    assert res.exit_code == 2
    assert res.stderr == (f"error: {stats}: the activation statistics this recipe was calibrated with are missing "
                          "(pass --stats) [rule: stats-file]\n")
    assert not (elsewhere / "c.safetensors").exists()
