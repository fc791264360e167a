"""Shared helpers of the kernel tests (imported by tests/test_kernels_*.py)."""

from __future__ import annotations

from pathlib import Path

import torch


def bit_pattern(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor as integers (so -0.0 != +0.0 and NaN == NaN)."""
    width = {4: torch.int32, 2: torch.int16, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(width)


def shim_build_dir(tmp_path_factory) -> Path:
    """One directory per test session for the g++-built kernel shim: every test module
    that needs the shim finds the library there (built once, keyed by a source hash)."""
    return tmp_path_factory.getbasetemp() / "umq_shim"
