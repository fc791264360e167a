"""Causal LMs end to end: perplexity in `umq verify` and `umq compare` (on a tiny random
Llama with SmolLM2's tokenizer), and the real SmolLM2-135M-Instruct packed, loaded with a
plain ``from_pretrained`` after ``import umqcli``, scored and generating."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import umqcli  # noqa: F401  (registers the umq quantizer with transformers)
from umqcli.baselines import fake_quant_fp8_channel
from umqcli.cli import app
from umqcli.cli.compare import format_table
from umqcli import compare as compare_module
from umqcli.compare import add_perplexity, compare_checkpoint, default_formats
from umqcli.io import open_checkpoint
from umqcli.nn import umq_linears
from umqcli.format import LoFormat, QuantParams
from umqcli.pack import pack
from umqcli.perplexity import perplexity, token_windows

transformers = pytest.importorskip("transformers")
from umqcli.integrations.transformers import load_dense_model, load_hf  # noqa: E402

runner = CliRunner()
# Tiny-model protocol: few tokens, short windows (the scoring code is the same).
TINY_TOKENS, TINY_WINDOW = 128, 64


@pytest.fixture(scope="session")
def prose_files(smollm2, tmp_path_factory) -> tuple[Path, Path]:
    """(calibration, held-out) prose files; the tiny-model tests read the start of held_out_short.txt."""
    calibration, held_out = smollm2.prose_split()
    root = tmp_path_factory.mktemp("prose")
    (root / "calibration.txt").write_text(calibration, encoding="utf-8")
    (root / "held_out.txt").write_text(held_out, encoding="utf-8")
    (root / "held_out_short.txt").write_text(held_out[:8000], encoding="utf-8")  # > TINY_TOKENS tokens
    return root / "calibration.txt", root / "held_out.txt"


@pytest.fixture(scope="session")
def short_prose(prose_files) -> Path:
    return prose_files[1].with_name("held_out_short.txt")


@pytest.fixture(scope="session")
def tiny_llm(smollm2_dir, tmp_path_factory) -> dict[str, Path]:
    """A random 2-layer Llama (bfloat16) with SmolLM2's tokenizer, and its k=1 fp8_e4m3 pack.
    On a random model the sign of the perplexity change is chance; with this seed and
    init range the pack raises it (+0.17%), which the gate test needs."""
    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("tiny-llm")
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.05,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "src")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, root / "src" / name)
    pack(root / "src", root / "k1-fp8", params=QuantParams(k=1, lo=LoFormat.FP8_E4M3), with_error=False)
    return {"src": root / "src", "packed": root / "k1-fp8"}


def _ppl_args(text: Path) -> list[str]:
    return ["--perplexity", str(text), "--ppl-tokens", str(TINY_TOKENS), "--ppl-window", str(TINY_WINDOW)]


def _verify(tiny_llm, text: Path, *extra: str):
    return runner.invoke(app, ["verify", str(tiny_llm["packed"]), "--reference", str(tiny_llm["src"]),
                               *_ppl_args(text), *extra])


def test_verify_reports_reference_and_packed_perplexity_and_gates_on_the_increase(tiny_llm, short_prose):
    held_out = short_prose
    result = _verify(tiny_llm, held_out, "--json", "--max-ppl-increase", "5")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["perplexity"]
    # The same numbers, measured here by the library on the same windows.
    model, tokenizer = load_dense_model(tiny_llm["src"])
    windows = token_windows(tokenizer, held_out.read_text(), window=TINY_WINDOW, max_tokens=TINY_TOKENS)
    packed = load_hf(tiny_llm["packed"], dtype=torch.float32)
    assert report["reference"] == pytest.approx(perplexity(model, windows).value, rel=1e-6)
    assert report["packed"] == pytest.approx(perplexity(packed, windows).value, rel=1e-6)
    assert report["tokens"] == TINY_TOKENS and report["window"] == TINY_WINDOW
    increase = report["increase_pct"]
    assert increase == pytest.approx(100 * (report["packed"] / report["reference"] - 1))
    assert 0.05 < increase < 1  # see tiny_llm: this seeded model's pack raises perplexity
    above = _verify(tiny_llm, held_out, "--max-ppl-increase", f"{increase / 2:.6f}")
    assert above.exit_code == 1, above.output
    assert "above --max-ppl-increase" in above.stdout and "reference" in above.stdout


def test_verify_perplexity_bad_input_exits_2_with_one_error(tiny_llm, short_prose, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short for one window.", encoding="utf-8")
    cases = [
        (["verify", str(tiny_llm["packed"]), *_ppl_args(short_prose)], "--perplexity needs --reference"),
        (["verify", str(tiny_llm["packed"]), "--reference", str(tiny_llm["src"]), *_ppl_args(short)],
         "perplexity-text"),
        (["verify", str(tiny_llm["packed"]), "--reference", str(tiny_llm["src"]), *_ppl_args(tmp_path / "none.txt")],
         "perplexity-text"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        message = " ".join(result.stderr.split())  # rich wraps long lines at the terminal width
        assert message.count("error:") == 1 and expected in message and "Traceback" not in message, result.stderr


def test_compare_perplexity_column_is_the_model_with_each_formats_weights(tiny_llm, short_prose, monkeypatch):
    held_out = short_prose
    # One UMQ configuration and one baseline: the column is computed the same way for every
    # format, and the whole grid would cost minutes of perplexity runs.
    compared = ("umq-k1-fp8_e4m3-row-mag", "fp8_e4m3-channel")
    grid = compare_module.default_formats
    monkeypatch.setattr(compare_module, "default_formats",
                        lambda *args, **kwargs: [f for f in grid(*args, **kwargs) if f.name in compared])
    result = runner.invoke(app, ["compare", str(tiny_llm["src"]), "--json", *_ppl_args(held_out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    by_name = {f["name"]: f for f in report["formats"]}
    assert sorted(by_name) == sorted(compared)
    assert all(f["perplexity"] is not None for f in report["formats"])
    model, tokenizer = load_dense_model(tiny_llm["src"])
    windows = token_windows(tokenizer, held_out.read_text(), window=TINY_WINDOW, max_tokens=TINY_TOKENS)
    assert report["perplexity"]["reference"] == pytest.approx(perplexity(model, windows).value, rel=1e-6)
    linears = {f"{name}.weight": m for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    # UMQ's column: the dense model holding the decoded bytes that umq pack wrote.
    packed = load_hf(tiny_llm["packed"], dtype=torch.float32)
    with torch.no_grad():
        for name, layer in umq_linears(packed):
            linears[f"{name}.weight"].weight.copy_(layer.decoded_weight(torch.float32))
    assert by_name["umq-k1-fp8_e4m3-row-mag"]["perplexity"] == pytest.approx(perplexity(model, windows).value, rel=1e-6)
    # A baseline's column: the dense model with its fake-quantized weights.
    with open_checkpoint(tiny_llm["src"]) as checkpoint:
        with torch.no_grad():
            for name, module in linears.items():
                module.weight.copy_(fake_quant_fp8_channel(checkpoint.get(name)))
    assert by_name["fp8_e4m3-channel"]["perplexity"] == pytest.approx(perplexity(model, windows).value, rel=1e-6)
    assert by_name["fp8_e4m3-channel"]["perplexity"] != by_name["umq-k1-fp8_e4m3-row-mag"]["perplexity"]


def test_compare_table_shows_perplexity_against_the_reference(tiny_llm, short_prose):
    formats = [f for f in default_formats(with_activations=False) if f.name in ("umq-k1-fp8_e4m3-row-mag", "int8-channel")]
    report = compare_checkpoint(tiny_llm["src"], formats=formats)
    add_perplexity(report, short_prose, window=TINY_WINDOW, max_tokens=TINY_TOKENS)
    reference = report.perplexity["reference"]
    console = Console(width=250, record=True)
    console.print(format_table(report))
    text = console.export_text()
    assert f"ref {reference:.3f}" in text
    for result in report.formats:
        assert f"{result.perplexity:.3f} ({100 * (result.perplexity / reference - 1):+.2f}%)" in text


# --------------------------------------------------------------------------- the real SmolLM2

# Held-out protocol of the must-show test: the second half of the Lee corpus, first 512
# tokens in windows of 256, float32 (benchmarks/perplexity.py scores more tokens).
SMOLLM2_TOKENS, SMOLLM2_WINDOW = 512, 256
# Measured here (2 cores, 512 tokens): k=1 int8 -0.74 %, k=1 fp8_e4m3 +0.62 %. 512 tokens
# are a small sample, so the sign of an 8-bit scheme's change is noise at this size; the
# bound is ~3x the larger measured change, well below what a broken pack does (a wrong
# scale or mask moves perplexity by tens of percent or more).
SMOLLM2_MAX_ABS_PPL_CHANGE_PCT = 2.0
GENERATED_TOKENS = 32
# k=1 int8 on the fixed prompt: measured, the free-running greedy text first differs at
# generated token 2 ("on" vs "for"); teacher-forced, the packed model picks another token at
# positions 2 and 25 only, where the reference's own top-2 logits are 0.05 and 0.13 apart.
# A near tie that an 8-bit weight error flips, not a pack defect; the bound is ~2x 0.13.
NEAR_TIE_LOGITS = 0.25


@pytest.fixture(scope="session")
def smollm2_packed(smollm2_dir, tmp_path_factory) -> dict[str, Path]:
    """SmolLM2 packed at k=1 with int8 and with fp8_e4m3 lo codes (once per session)."""
    root = tmp_path_factory.mktemp("smollm2-packed")
    packed = {}
    for lo in (LoFormat.INT8, LoFormat.FP8_E4M3):
        packed[lo.value] = root / f"k1-{lo.value}"
        pack(smollm2_dir, packed[lo.value], params=QuantParams(k=1, lo=lo), with_error=False)
    return packed


def test_smollm2_packed_loads_with_plain_from_pretrained_scores_and_generates(smollm2, smollm2_dir, smollm2_packed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from umqcli.backends import get_backend
    from umqcli.nn import UMQLinear

    transformers.logging.set_verbosity_error()
    held_out = smollm2.prose_split()[1]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    windows = token_windows(tokenizer, held_out, window=SMOLLM2_WINDOW, max_tokens=SMOLLM2_TOKENS)
    # A fixed prompt from the held-out text: its first ~200 characters, cut at a word.
    prompt = tokenizer(held_out[: held_out.index(" ", 200)], return_tensors="pt").input_ids
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    reference_ppl = perplexity(reference, windows).value
    reference_ids = reference.generate(prompt, max_new_tokens=GENERATED_TOKENS, do_sample=False)
    with torch.no_grad():  # the reference's next-token logits along its own greedy continuation
        reference_logits = reference(reference_ids).logits[0, prompt.shape[1] - 1 : -1]
    del reference
    top2 = reference_logits.topk(2, dim=-1).values
    margins = top2[:, 0] - top2[:, 1]
    for lo, packed_dir in smollm2_packed.items():
        model = AutoModelForCausalLM.from_pretrained(packed_dir, dtype=torch.float32).eval()
        layers = [m for m in model.modules() if isinstance(m, UMQLinear)]
        assert len(layers) == 30 * 7, lo  # q/k/v/o, gate/up/down of 30 layers: packed, not dense
        # The default path users get: backend auto, no decoded copies, i.e. the fused CPU
        # runtime reading the packed bytes at every call (docs/runtime.md).
        assert all(layer.backend == "auto" and not layer.cache_decoded for layer in layers)
        assert get_backend("auto").name == "cpu", "the fused CPU runtime does not build here"
        change = 100 * (perplexity(model, windows).value / reference_ppl - 1)
        assert abs(change) < SMOLLM2_MAX_ABS_PPL_CHANGE_PCT, (lo, change)
        if lo != LoFormat.INT8.value:
            continue
        generated = model.generate(prompt, max_new_tokens=GENERATED_TOKENS, do_sample=False)
        with torch.no_grad():  # teacher-forced on the reference's continuation
            choices = model(reference_ids).logits[0, prompt.shape[1] - 1 : -1].argmax(-1)
        new, expected = generated[0, prompt.shape[1]:], reference_ids[0, prompt.shape[1]:]
        differing = (new != expected).nonzero().flatten().tolist()
        disagreements = (choices != expected).nonzero().flatten().tolist()
        print(f"k=1 int8: first differing generated token {differing[:1]}, teacher-forced disagreements "
              f"{disagreements} at reference margins {[round(margins[i].item(), 3) for i in disagreements]}")
        assert differing[:1] == disagreements[:1]  # same context up to there, so the same first choice
        # Greedy text matches except where the reference itself nearly ties: every position
        # where the packed model picks another token has a top-2 logit margin below
        # NEAR_TIE_LOGITS in the reference (the measured values are next to it).
        assert all(margins[i] < NEAR_TIE_LOGITS for i in disagreements), (disagreements, margins)


def test_documented_chain_calibrate_pack_recipe_verify_perplexity_on_smollm2(smollm2_dir, prose_files, tmp_path):
    """docs/llm.md's chain through the CLI, made small: statistics with Hessians from
    4 x 64 calibration tokens, a search with gptq candidates over layer 0's seven linears
    at 10 bits, `pack --recipe` of those seven (gptq from the recorded statistics; the
    other tensors stay bf16), `verify --perplexity` on 256 held-out tokens."""
    from umqcli.io import open_checkpoint

    calibration, held_out = prose_files
    stats, recipe, packed = tmp_path / "stats.safetensors", tmp_path / "recipe.json", tmp_path / "packed"
    result = runner.invoke(app, [
        "calibrate", str(smollm2_dir), "--data", str(calibration), "--hessian", "--stats-out", str(stats),
        "-o", str(recipe), "--budget-bits", "10", "--samples", "4", "--seq-len", "64",
        "--include", "model.layers.0.*", "--json",
        "--candidates", "k=0-2,lo=int8+fp8_e4m3,block=row,selection=magnitude+saliency,method=rtn+gptq"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert len(summary["tensors"]) == 7 and summary["average_bits_per_element"] <= 10
    gptq_tensors = {n for n, t in summary["tensors"].items() if t.get("method") == "gptq"}
    assert gptq_tensors  # error feedback beats round to nearest at equal bits somewhere

    result = runner.invoke(app, ["pack", str(smollm2_dir), "--recipe", str(recipe), "-o", str(packed),
                                 "--include", "model.layers.0.*"])
    assert result.exit_code == 0, result.output
    with open_checkpoint(packed) as checkpoint:
        assert sorted(checkpoint.specs) == sorted(summary["tensors"])
        for name, entry in summary["tensors"].items():
            spec = checkpoint.specs[name]
            assert (spec.k, spec.lo.value) == (entry["k"], entry["lo"])
            assert spec.selection.endswith("+gptq") == (name in gptq_tensors)

    result = runner.invoke(app, ["verify", str(packed), "--reference", str(smollm2_dir), "--perplexity",
                                 str(held_out), "--ppl-tokens", "256", "--ppl-window", "128", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["perplexity"]
    assert report["tokens"] == 256 and report["window"] == 128
    assert abs(report["increase_pct"]) < SMOLLM2_MAX_ABS_PPL_CHANGE_PCT, report
