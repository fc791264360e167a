"""Optional dependencies fail as one clear UMQError naming the extra, never a traceback."""

from __future__ import annotations

import sys

import pytest
import torch
from typer.testing import CliRunner

from umqcli._optional import require
from umqcli.cli import app
from umqcli.errors import UMQError


def test_require_returns_the_module() -> None:
    assert require("json", extra="none", purpose="x").dumps([1]) == "[1]"


def test_require_names_package_extra_and_hint() -> None:
    with pytest.raises(UMQError) as info:
        require("umq_no_such_module.sub", extra="plot", purpose="--png heatmaps", hint="or drop --png")
    assert info.value.rule == "missing-dependency"
    assert str(info.value) == (
        "--png heatmaps needs the 'umq_no_such_module' package: pip install 'umq[plot]' "
        "(or drop --png) [rule: missing-dependency]"
    )


def test_inspect_png_without_matplotlib_exits_2(tmp_path, monkeypatch) -> None:
    from umqcli.codec import quantize
    from umqcli.format import QuantParams, encode_metadata
    from safetensors.torch import save_file

    packed = quantize(torch.randn(16, 32), QuantParams(k=2), name="w")
    path = tmp_path / "p.safetensors"
    save_file(packed.stored_tensors("w"), path, metadata=encode_metadata({"w": packed.spec}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = CliRunner().invoke(app, ["inspect", str(path), "--png", str(tmp_path / "png")])
    assert result.exit_code == 2, result.output
    assert "pip install 'umq[plot]'" in result.output
    assert not (tmp_path / "png").exists() or not any((tmp_path / "png").iterdir())
