"""The split backend (the seed's ``X·((1−M)⊙Ŵ)ᵀ + X·(M⊙Ŵ)ᵀ`` as an FP8/int8 GEMM plus a
16-bit GEMM) on the CPU, where torch 2.13 runs ``torch._scaled_mm`` (FP8 E4M3 x E4M3 and
E4M3 x E5M2) and ``torch._int_mm``; only the 16-bit GEMM with float32 output
(``torch.mm(..., out_dtype=float32)``, CUDA only) is emulated by the same float32 sum of
exact products.

- the dense operands rebuild ``codec.dequantize`` bit for bit;
- the result is within the float32 bound of the product with the backend's own rounded
  activations (a wrong code, scale or position breaks this by orders of magnitude), and
  within ``split_error_bound`` of the exact ``X·Ŵᵀ``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from kernel_helpers import bit_pattern
from umqcli.backends import get_backend
from umqcli.backends.split import HI_ACTIVATIONS, LO_ACTIVATIONS, SplitBackend, quantize_rows, split_packed
from umqcli.codec import PackedTensor, dequantize, quantize
from umqcli.format import HiFormat, LoFormat, QuantParams
from umqcli.testing.bounds import gamma, hi_positions, split_error_bound

K_VALUES = (0, 1, 3, 8)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These GEMMs are tiny: with two threads on a loaded machine each one waits ~25 ms
    for the other thread; with one it takes microseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def weight(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=generator)
    return torch.where(torch.rand(rows, cols, generator=generator) < 0.02, w * 40, w).to(dtype)


def rebuilt(split) -> torch.Tensor:
    """Ŵ in float32 from the two dense operands: lo code * block scale + hi value."""
    blocks, _, _ = split.lo_codes.shape
    codes = split.lo_codes[:, : split.rows, : split.block].float()
    lo = (codes * split.lo_scale[:, :, None]).permute(1, 0, 2).reshape(split.rows, split.columns)
    return lo + split.hi[: split.rows].float()


@pytest.mark.parametrize("hi", list(HiFormat))
def test_split_operands_rebuild_the_decode(hi):
    for k, lo, block in itertools.product(K_VALUES, LoFormat, (0, 8, 32)):
        packed = quantize(weight(21, 96, torch.float32, seed=k), QuantParams(k=k, lo=lo, hi=hi, block=block))
        split = split_packed(packed)
        assert split.lo_codes.shape == (96 // packed.spec.block, 32, max(16, -(-packed.spec.block // 16) * 16))
        assert torch.equal(bit_pattern(rebuilt(split)), bit_pattern(dequantize(packed, torch.float32))), (k, lo, block)
        # Zeros where the other part lives, and in the padding.
        hi_mask = hi_positions(packed)
        assert not split.hi[:21].float()[~hi_mask].any()
        codes = split.lo_codes.view(torch.uint8)
        assert not codes[:, 21:].any() and not codes[:, :, packed.spec.block:].any()


def assert_split_close(y: torch.Tensor, x: torch.Tensor, packed) -> None:
    """Tight: the float32 bound around the product with the backend's own rounded
    activations. Stated: ``split_error_bound`` around the exact product."""
    spec = packed.spec
    x = x.float()
    w = dequantize(packed, torch.float32).double()
    hi = hi_positions(packed)
    expected = torch.zeros(x.shape[0], spec.rows, dtype=torch.float64)
    magnitude = torch.zeros_like(expected)
    for fmt, part in ((LO_ACTIVATIONS[spec.lo], w * ~hi), (HI_ACTIVATIONS[spec.hi], w * hi)):
        codes, scale = quantize_rows(x, fmt)
        x_hat = codes.double() * scale.double()[:, None]
        expected += x_hat @ part.T
        magnitude += x_hat.abs() @ part.abs().T
    tight = gamma(spec.columns + 2 * (spec.columns // spec.block) + 5) * magnitude * (1 + 2**-22)
    assert float(((y.double() - expected).abs() - tight).max()) <= 0.0
    exact = x.double() @ w.T
    assert float(((y.double() - exact).abs() - split_error_bound(x, packed)).max()) <= 0.0


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_split_matmul_every_lo_and_k(x_dtype):
    backend = SplitBackend()
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(4)).to(x_dtype)
    for index, (k, lo, hi) in enumerate(itertools.product(K_VALUES, LoFormat, HiFormat)):
        block = (0, 32)[index % 2]  # one scale per row (one GEMM) and per 32 columns (4)
        packed = quantize(weight(40, 128, torch.float16, seed=index), QuantParams(k=k, lo=lo, hi=hi, block=block))
        assert_split_close(backend.matmul(x, packed), x, packed)


@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_split_matmul_shapes(m):
    """M around the GPU's limits (int8 GEMM needs > 16 rows there), R and C not multiples
    of 16 (padded with zero weights), leading dimensions."""
    packed = quantize(weight(37, 72, torch.bfloat16, seed=m), QuantParams(k=2, lo="int8", block=8))
    x = torch.randn(m, 72, generator=torch.Generator().manual_seed(m))
    assert_split_close(SplitBackend().matmul(x, packed), x, packed)
    y = SplitBackend().matmul(x.reshape(1, m, 72), packed)
    assert y.shape == (1, m, 37)


def test_split_bounds_catch_one_wrong_weight():
    """The stated bound is dominated by the activation rounding (FP8: 3 mantissa bits) and
    stays a small fraction of sum |x||ŵ|; the tight check (around the product with the
    backend's own rounded activations) fails on a single wrong code."""
    packed = quantize(weight(64, 256, torch.float32, seed=1), QuantParams(k=1, lo="fp8_e4m3"))
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    scale = x.abs() @ dequantize(packed, torch.float32).abs().T
    assert float((split_error_bound(x, packed) / scale.double()).max()) < 0.07
    y = SplitBackend().matmul(x, packed)
    assert_split_close(y, x, packed)
    broken = packed.data.clone()
    broken[0, 4] ^= 0x08  # one code of row 0: a different exponent
    wrong = PackedTensor.from_stored(packed.spec, broken, packed.mask, packed.scale)
    y_wrong = SplitBackend().matmul(x, wrong)
    with pytest.raises(AssertionError):
        assert_split_close(y_wrong, x, packed)
    assert torch.equal(y[:, 1:], y_wrong[:, 1:]) and not torch.equal(y[:, 0], y_wrong[:, 0])


def test_split_by_name_and_decode():
    backend = get_backend("split")
    packed = quantize(weight(8, 16, torch.float16, seed=0), QuantParams(k=1))
    assert backend.name == "split"
    assert torch.equal(bit_pattern(backend.decode(packed)), bit_pattern(dequantize(packed)))
    assert backend.matmul(torch.zeros(0, 16), packed).shape == (0, 8)
