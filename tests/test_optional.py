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


def test_cupy_from_either_cuda_build(monkeypatch) -> None:
    """cupy-cuda12x and cupy-cuda13x both import as ``cupy``: whichever is installed is
    accepted, and a missing CuPy names both extras."""
    import importlib.metadata
    import types

    from umqcli import _optional

    def only(name):
        def version(distribution):
            if distribution != name:
                raise importlib.metadata.PackageNotFoundError(distribution)
            return "14.2.0"
        return version

    for name in ("cupy-cuda13x", "cupy-cuda12x"):
        monkeypatch.setattr(importlib.metadata, "version", only(name))
        assert _optional.cupy_distribution() == name
    fake = types.ModuleType("cupy")
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert _optional.require_cupy("x") is fake
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(UMQError) as info:
        _optional.require_cupy("the cuda backend")
    assert info.value.rule == "missing-dependency"
    assert "'umq[cuda]' (cupy-cuda12x) or 'umq[cuda13]' (cupy-cuda13x)" in str(info.value)
    assert "cupy-cuda12x is installed but does not import" in str(info.value)
