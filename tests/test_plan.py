"""umqcli.plan (which tensors, which parameters, why not) and umqcli.recipe (the schema)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import make_sharded_checkpoint
from umqcli.errors import UMQError
from umqcli.format import LoFormat, QuantParams, Selection
from umqcli.io import open_checkpoint
from umqcli.plan import DEFAULT_EXCLUSIONS, Pattern, make_plan
from umqcli.recipe import RECIPE_VERSION, Recipe, RecipeEntry

Q = "model.layers.0.self_attn.q_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_sharded_checkpoint(tmp_path_factory.mktemp("plan") / "model", shards=2)


def _decisions(plan) -> dict[str, str | None]:
    return {t.name: (None if t.params is None else t.reason) for t in plan.tensors}


def test_default_plan(model: Path) -> None:
    with open_checkpoint(model) as ckpt:
        plan = make_plan(ckpt, QuantParams(k=2))
    by_name = {t.name: t for t in plan.tensors}
    assert len(plan.tensors) == len(ckpt.names())
    # Every 2-D attention / MLP weight is packed with the flags' parameters.
    packed = {t.name for t in plan.packed}
    assert packed == {n for n in ckpt.names() if n.endswith("_proj.weight")}
    assert all(t.params == QuantParams(k=2) and t.reason == "flags" for t in plan.packed)
    assert "default exclusion *embed*" in by_name["model.embed_tokens.weight"].reason
    assert "default exclusion lm_head*" in by_name["lm_head.weight"].reason
    assert "1-D" in by_name["model.norm.weight"].reason
    # Sizes come from shape, k and block only: 64 columns, k=2 -> 8 groups * 10 bytes.
    shapes = by_name[Q].stored_shapes()
    assert shapes[".umq_data"] == (64, 80) and shapes[".umq_mask"] == (64, 8) and shapes[".umq_scale"] == (64, 1)
    assert by_name[Q].bytes_out == 64 * 80 + 64 * 8 + 64 * 4


def test_include_exclude_patterns(model: Path) -> None:
    with open_checkpoint(model) as ckpt:
        plan = make_plan(ckpt, include=["*.mlp.*", "*embed_tokens*"], exclude=[r"re:layers\.1\.mlp\.(up|down)"])
    decided = _decisions(plan)
    assert decided["model.layers.0.mlp.up_proj.weight"] == "flags"
    assert decided["model.embed_tokens.weight"] == "flags"  # an --include match lifts the default exclusion
    assert decided[Q] is None  # not included
    assert decided[DOWN1] is None and decided["model.layers.1.mlp.gate_proj.weight"] == "flags"
    reasons = {t.name: t.reason for t in plan.passthrough}
    assert reasons[Q] == "not matched by any include pattern"
    assert reasons[DOWN1] == r"excluded by the pattern re:layers\.1\.mlp\.(up|down)"


def test_patterns() -> None:
    assert Pattern("*.q_proj.*").matches(Q)
    assert not Pattern("q_proj").matches(Q)  # globs match the whole name
    assert Pattern("re:q_proj").matches(Q)  # regexes search anywhere
    assert not Pattern("re:^q_proj").matches(Q)
    with pytest.raises(UMQError) as excinfo:
        Pattern("re:(unclosed")
    assert excinfo.value.rule == "pattern"
    assert set(DEFAULT_EXCLUSIONS) >= {"lm_head*", "*embed*"}


def test_block_flag_not_dividing_passes_through(model: Path) -> None:
    with open_checkpoint(model) as ckpt:
        plan = make_plan(ckpt, QuantParams(block=128))
    reasons = {t.name: t.reason for t in plan.passthrough}
    assert reasons[Q] == "block 128 does not divide its 64 columns"
    assert _decisions(plan)[DOWN1] == "flags"  # 128 input columns


def test_recipe_in_plan(model: Path) -> None:
    recipe = Recipe(
        tensors={
            Q: RecipeEntry(QuantParams(k=3, lo="int8", block=32), 0.01, 12.0, "outliers"),
            DOWN1: RecipeEntry(None, reason="too sensitive"),
            "lm_head.weight": RecipeEntry(QuantParams(k=4), None, None, "named explicitly"),
        },
        defaults=QuantParams(k=0),
    )
    with open_checkpoint(model) as ckpt:
        plan = make_plan(ckpt, recipe.defaults, recipe=recipe)
    by_name = {t.name: t for t in plan.tensors}
    assert by_name[Q].params == QuantParams(k=3, lo=LoFormat.INT8, block=32)
    assert by_name[Q].reason == "recipe" and by_name[Q].predicted_rel_error == 0.01
    assert by_name[DOWN1].params is None and by_name[DOWN1].reason == "recipe keeps it 16-bit: too sensitive"
    assert by_name["lm_head.weight"].params == QuantParams(k=4)
    other = by_name["model.layers.0.mlp.up_proj.weight"]
    assert other.params == QuantParams(k=0) and other.reason == "recipe defaults"


@pytest.mark.parametrize(
    "entry_name, params, words",
    [
        ("no.such.weight", QuantParams(), "does not have"),
        ("model.norm.weight", QuantParams(), "1-D"),
        (Q, QuantParams(block=48), "does not divide"),
    ],
)
def test_recipe_errors(model: Path, entry_name: str, params: QuantParams, words: str) -> None:
    recipe = Recipe(tensors={entry_name: RecipeEntry(params)})
    with open_checkpoint(model) as ckpt, pytest.raises(UMQError) as excinfo:
        make_plan(ckpt, recipe=recipe)
    assert words in str(excinfo.value) and excinfo.value.tensor == entry_name


def test_plan_refuses_packed_source(vectors_dir: Path) -> None:
    with open_checkpoint(vectors_dir / "k1_fp8_e4m3_blockrow.safetensors") as ckpt, pytest.raises(UMQError) as excinfo:
        make_plan(ckpt)
    assert excinfo.value.rule == "already-packed"


def test_int_and_3d_tensors_pass_through(tmp_path: Path) -> None:
    path = tmp_path / "mixed.safetensors"
    save_file({"ids": torch.arange(64).view(8, 8), "conv": torch.randn(4, 8, 8), "odd": torch.randn(4, 12),
               "half": torch.randn(8, 16).half(), "fp8": torch.zeros(8, 16).to(torch.float8_e4m3fn)}, str(path))
    with open_checkpoint(path) as ckpt:
        plan = make_plan(ckpt)
    reasons = {t.name: t.reason for t in plan.passthrough}
    assert [t.name for t in plan.packed] == ["half"]
    assert "I64" in reasons["ids"] and "3-D" in reasons["conv"] and "12 is not a multiple of 8" in reasons["odd"]
    assert "F8_E4M3" in reasons["fp8"]


# ------------------------------------------------------------------ recipe schema


def test_recipe_roundtrip(tmp_path: Path) -> None:
    recipe = Recipe(
        tensors={"a": RecipeEntry(QuantParams(k=2, block=32, selection=Selection.ERROR), 0.02, 11.0, "why"),
                 "b": RecipeEntry(None, reason="keep")},
        defaults=QuantParams(k=1, hi="bfloat16"),
        budget_bits=10.5,
        source="unit test",
        extra={"calibration": {"samples": 8}},
    )
    path = recipe.save(tmp_path / "r.json")
    obj = json.loads(path.read_text())
    assert obj["umq_recipe"] == RECIPE_VERSION and obj["tensors"]["a"]["params"]["k"] == 2
    assert obj["tensors"]["b"]["params"] is None
    again = Recipe.load(path)
    assert again == recipe
    assert again.params_for("a", QuantParams(k=5)).k == 2
    assert again.params_for("b", QuantParams(k=5)) is None
    assert again.params_for("zzz", QuantParams(k=5)).k == 5
    assert again.params_for("zzz", None) == QuantParams(k=1, hi="bfloat16")


@pytest.mark.parametrize(
    "content, words",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"tensors": {}}', "no \\\"umq_recipe\\\""),
        ('{"umq_recipe": 2, "tensors": {}}', "version 2 is not supported"),
        ('{"umq_recipe": 1}', '"tensors" must be an object'),
        ('{"umq_recipe": 1, "tensors": {"a": {"params": {"k": 9}}}}', "k must be"),
        ('{"umq_recipe": 1, "tensors": {"a": {"params": {"k": 1, "lo": "fp4"}}}}', "unknown lo"),
        ('{"umq_recipe": 1, "tensors": {"a": {"params": {"k": 1}, "bits": 3}}}', "unknown entry key"),
        ('{"umq_recipe": 1, "tensors": {"a": {"params": {"k": 1}, "predicted_rel_error": "x"}}}', "finite number"),
        ('{"umq_recipe": 1, "tensors": {"a": {"k": 1}}}', '"params" key'),
    ],
)
def test_recipe_schema_errors(tmp_path: Path, content: str, words: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UMQError) as excinfo:
        Recipe.load(path)
    assert excinfo.value.rule == "recipe" and excinfo.value.file == str(path)
    assert words.replace("\\", "") in str(excinfo.value)


def test_recipe_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UMQError) as excinfo:
        Recipe.load(tmp_path / "none.json")
    assert excinfo.value.rule == "missing"
