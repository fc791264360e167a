"""Shared helpers of the kernel tests (imported by tests/test_kernels_*.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from umqcli.codec import PackedTensor, dequantize


def bit_pattern(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor as integers (so -0.0 != +0.0 and NaN == NaN)."""
    width = {4: torch.int32, 2: torch.int16, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(width)


def dot_error_bound(x: torch.Tensor, packed: PackedTensor) -> torch.Tensor:
    """float64 ``[M, R]``: the worst-case error of any float32 evaluation of ``x · Ŵᵀ``.

    Each output is a dot product of C float32 terms; summed in float32 in ANY order (the
    kernel's tiles, torch's blocked GEMM, an FMA chain), its error is at most
    ``gamma_C * sum_j |x_j| |w_j|`` with ``gamma_C = C u / (1 - C u)`` and ``u = 2^-24``
    (Higham, Accuracy and Stability of Numerical Algorithms, §3.1). This is why the tests
    use this bound and not a guessed rtol: it is tight enough to catch one wrong weight
    (an error of order |x_j w_j|) and cannot fail for a correct summation order.
    """
    columns = x.shape[-1]
    unit = 2.0**-24
    gamma = columns * unit / (1 - columns * unit)
    weight = dequantize(packed, torch.float32).double()
    return gamma * (x.double().abs() @ weight.abs().T)


def shim_build_dir(tmp_path_factory) -> Path:
    """One directory per test session for the g++-built kernel shim: every test module
    that needs the shim finds the library there (built once, keyed by a source hash)."""
    return tmp_path_factory.getbasetemp() / "umq_shim"
