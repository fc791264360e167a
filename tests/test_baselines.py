"""The seed baselines: values against the reference libraries, and their bit accounting."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from umqcli import codec
from umqcli.baselines import (
    BASELINES,
    LLM_INT8_THRESHOLD,
    bitsandbytes_functional,
    fake_quant_fp8_blocks,
    fake_quant_fp8_channel,
    fake_quant_int8_channel,
    fake_quant_mx,
    get_baseline,
    int8_channel_quantize,
    llm_int8_outlier_columns,
    mx_scale_exponents,
)
from umqcli.errors import UMQError
from umqcli.format import QuantParams


def _weight(rows: int = 96, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Gaussian weight whose columns span ~6 decades, with a few large outliers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-4, 2, cols)[torch.randperm(cols, generator=g)]
    w[3, 17] = 3.0e3
    w[5, :] = 0.0  # an all-zero row
    return w


def _np_fp8_roundtrip(w: torch.Tensor, np_dtype, limit: float, block_cols: int, block_rows: int = 1) -> np.ndarray:
    """Reference: absmax scale per tile in numpy float32, cast through ml_dtypes."""
    a = w.numpy().astype(np.float32)
    rows, cols = a.shape
    tiles = a.reshape(rows // block_rows, block_rows, cols // block_cols, block_cols)
    scale = (np.abs(tiles).max(axis=(1, 3), keepdims=True) / np.float32(limit)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(scale == 0, np.float32(0), tiles / np.where(scale == 0, 1, scale))
    q = np.clip(x, -limit, limit).astype(np_dtype).astype(np.float32)
    return (q * scale).reshape(rows, cols)


@pytest.mark.parametrize(("fmt", "np_dtype", "limit"), [
    ("e4m3", ml_dtypes.float8_e4m3fn, 448.0),
    ("e5m2", ml_dtypes.float8_e5m2, 57344.0),
])
def test_fp8_channel_matches_ml_dtypes(fmt, np_dtype, limit):
    w = _weight()
    ours = fake_quant_fp8_channel(w, fmt).numpy()
    ref = _np_fp8_roundtrip(w, np_dtype, limit, w.shape[1])
    np.testing.assert_array_equal(ours, ref)
    assert np.isfinite(ours).all()
    assert np.all(ours[5] == 0)
    # The row maximum is representable exactly: scale * MAX == amax up to one float32 rounding.
    assert ours[3, 17] == pytest.approx(3.0e3, rel=1e-6)


def test_fp8_blocks_match_ml_dtypes():
    w = _weight(rows=256, cols=384)
    np.testing.assert_array_equal(
        fake_quant_fp8_blocks(w, "e4m3", 128, 1).numpy(), _np_fp8_roundtrip(w, ml_dtypes.float8_e4m3fn, 448.0, 128, 1)
    )
    np.testing.assert_array_equal(
        fake_quant_fp8_blocks(w, "e4m3", 128, 128).numpy(),
        _np_fp8_roundtrip(w, ml_dtypes.float8_e4m3fn, 448.0, 128, 128),
    )
    # Finer scales never lose to one per row on this wide-range tensor.
    err = lambda wh: float((wh - w).norm() / w.norm())  # noqa: E731
    assert err(fake_quant_fp8_blocks(w, "e4m3", 128)) <= err(fake_quant_fp8_channel(w, "e4m3"))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_row_blocks_are_umq_k0(fmt):
    """Per channel and 1x128 FP8 are UMQ k = 0 with a row / 128-column scale: the same
    values as the codec's round trip, bit for bit."""
    w = torch.randn(16, 256) * torch.rand(256) * 4
    for block, ours in ((0, fake_quant_fp8_channel(w, fmt)), (128, fake_quant_fp8_blocks(w, fmt, 128, 1))):
        packed = codec.quantize(w, QuantParams(k=0, lo=f"fp8_{fmt}", block=block))
        assert torch.equal(ours, codec.dequantize(packed, torch.float32)), block


def test_fp8_e5m2_clamps_instead_of_overflowing():
    # 61440 is the first value that a plain e5m2 cast turns into inf.
    w = torch.tensor([[61000.0, 1.0, -2.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    assert torch.isinf(torch.tensor(61440.0).to(torch.float8_e5m2).float())
    out = fake_quant_fp8_channel(w, "e5m2")
    assert torch.isfinite(out).all()
    assert float(out[0, 0]) == pytest.approx(61000.0, rel=2**-2)


def _np_mx_roundtrip(w: torch.Tensor, np_dtype, emax_elem: int, limit: float, block: int = 32):
    """OCP MX v1.0 (section 6.3), written independently in numpy + ml_dtypes: the shared
    scale is ``2^(floor(log2 amax) - emax_elem)`` stored as E8M0 (ml_dtypes'
    float8_e8m0fnu; the exponent is found with ``np.log2`` and corrected to be exact),
    elements are ``v / X`` clipped to the element range and cast with ml_dtypes."""
    a = w.numpy().astype(np.float32).reshape(w.shape[0], -1, block)
    amax = np.abs(a).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(amax.astype(np.float64)))
    # log2 can round across an integer just below a power of two: fix by checking 2^e.
    e = np.where(np.exp2(e) > amax, e - 1, e)
    e = np.where(np.exp2(e + 1) <= amax, e + 1, e)
    shared = np.clip(np.where(amax == 0, -127, e - emax_elem), -127, 127)
    scale_e8m0 = np.exp2(shared).astype(ml_dtypes.float8_e8m0fnu)
    scale = scale_e8m0.astype(np.float32)
    assert np.array_equal(scale, np.exp2(shared).astype(np.float32))  # E8M0 holds it exactly
    q = np.clip(a / scale, -limit, limit).astype(np_dtype).astype(np.float32)
    return (q * scale).reshape(w.shape), shared.reshape(w.shape[0], -1).astype(np.int32)


@pytest.mark.parametrize(("fmt", "np_dtype", "emax", "limit"), [
    ("e4m3", ml_dtypes.float8_e4m3fn, 8, 448.0),
    ("e5m2", ml_dtypes.float8_e5m2, 15, 57344.0),
])
def test_mxfp8_matches_numpy_ml_dtypes_reference(fmt, np_dtype, emax, limit):
    # (Also checked once against torchao 0.18's prototype to_mx/to_dtype: bit-identical on
    # these tensors; torchao is not a test dependency because transformers imports it
    # whenever it is installed.)
    w = _weight(rows=64, cols=256)
    w[1, :32] = torch.tensor([2.0**k for k in range(32)]) * 1e-30  # tiny block: scale near E8M0's floor
    w[2, :32] = torch.nextafter(torch.tensor(2.0), torch.tensor(0.0))  # just below a power of two
    w[4, :32] = 0.0
    ref, ref_exponents = _np_mx_roundtrip(w, np_dtype, emax, limit)
    np.testing.assert_array_equal(fake_quant_mx(w, fmt).numpy(), ref)
    np.testing.assert_array_equal(mx_scale_exponents(w, fmt).numpy(), ref_exponents)


def test_mxfp8_scale_rule_by_hand():
    # OCP MX v1.0: X = 2^(floor(log2 amax) - 8) for E4M3, elements saturate at 448.
    block = torch.zeros(4, 32)
    block[0, 0] = 1.0  # floor(log2 1) = 0 -> exponent -8
    block[1, 0] = 448.0  # floor(log2 448) = 8 -> exponent 0, scale 1
    block[2, :2] = torch.tensor([480.0, 1.0])  # exponent 0: 480 saturates to 448
    block[3, 0] = 0.99  # floor(log2 0.99) = -1 -> exponent -9
    assert mx_scale_exponents(block).view(-1).tolist() == [-8, 0, 0, -9]
    out = fake_quant_mx(block)
    assert out[0, 0] == 1.0 and out[1, 0] == 448.0 and out[2, 0] == 448.0 and out[2, 1] == 1.0
    assert mx_scale_exponents(torch.zeros(1, 32)).item() == -127
    assert torch.equal(fake_quant_mx(torch.zeros(2, 64)), torch.zeros(2, 64))


def test_int8_channel_matches_bitsandbytes():
    bnbf = bitsandbytes_functional()

    w = _weight().to(torch.float16)
    w[5, 0] = 1.0  # bitsandbytes turns all-zero rows into NaN codes; compare real rows
    q_ref, absmax_ref, outliers = bnbf.int8_vectorwise_quant(w.clone(), threshold=0.0)
    q, absmax = int8_channel_quantize(w)
    assert outliers is None
    assert torch.equal(q, q_ref)
    assert torch.equal(absmax, absmax_ref)
    # Same codes and scales; the decode multiplies in another order (last-bit differences).
    torch.testing.assert_close(
        fake_quant_int8_channel(w), bnbf.int8_vectorwise_dequant(q_ref, absmax_ref).float(), rtol=1e-6, atol=0
    )
    assert int(q.abs().max()) == 127


def test_int8_group_matches_bitsandbytes_per_group():
    bnbf = bitsandbytes_functional()
    w = _weight(rows=16, cols=128).to(torch.float16)
    w[5, :32] = 1.0  # no all-zero group (bitsandbytes makes those NaN)
    ours = get_baseline("int8-g32").quantize_dequantize(w)
    q_ref, absmax_ref, _ = bnbf.int8_vectorwise_quant(w.reshape(-1, 32).clone(), threshold=0.0)
    ref = bnbf.int8_vectorwise_dequant(q_ref, absmax_ref).float().view(16, 128)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    # Finer scales than one per row: never a larger error on any row.
    row = fake_quant_int8_channel(w)
    assert bool(((ours - w.float()).norm(dim=1) <= (row - w.float()).norm(dim=1) * (1 + 1e-6)).all())


def test_int8_channel_zero_row_is_zero():
    w = _weight()
    out = fake_quant_int8_channel(w)
    assert torch.equal(out[5], torch.zeros(w.shape[1]))
    # Each element is off by at most half a step of its row.
    step = w.abs().amax(1, keepdim=True) / 127
    assert bool(((out - w).abs() <= step / 2 * (1 + 1e-5)).all())


def test_llm_int8_outlier_columns_match_bitsandbytes_decomposition():
    bnbf = bitsandbytes_functional()

    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=g)
    x[:, [7, 100, 201]] *= 8.0  # the emergent outlier features
    absmax = x.abs().amax(0)
    _, _, bnb_cols = bnbf.int8_vectorwise_quant(x.to(torch.float16), threshold=LLM_INT8_THRESHOLD)
    ours = llm_int8_outlier_columns(absmax)
    assert set(ours.tolist()) == set(bnb_cols.tolist())
    assert {7, 100, 201} <= set(ours.tolist())

    w = _weight(rows=48, cols=256)
    baseline = get_baseline("llm.int8")
    w_hat = baseline.quantize_dequantize(w, absmax)
    w16 = w.to(torch.float16).float()
    # Outlier columns are the fp16 weight, exactly.
    assert torch.equal(w_hat[:, ours], w16[:, ours])
    # The rest is int8 per row over the non-outlier columns (our own int8, cross-checked).
    inliers = w16.clone()
    inliers[:, ours] = 0
    expected = fake_quant_int8_channel(inliers)
    keep = torch.ones(256, dtype=torch.bool)
    keep[ours] = False
    torch.testing.assert_close(w_hat[:, keep], expected[:, keep], rtol=1e-6, atol=0)
    n = ours.numel()
    assert baseline.bits_per_element((48, 256), absmax) == pytest.approx(
        (8 * 48 * (256 - n) + 16 * 48 * n + 32 * 48 + 32 * n) / (48 * 256)
    )


def test_llm_int8_needs_activations():
    baseline = get_baseline("llm.int8")
    assert baseline.needs_activations
    with pytest.raises(UMQError) as info:
        baseline.quantize_dequantize(_weight())
    assert info.value.rule == "activation-stats"
    with pytest.raises(UMQError) as info:
        baseline.bits_per_element((96, 256), torch.zeros(128))
    assert "(256,)" in str(info.value)
    # No outliers: pure int8 per row, scales included.
    assert baseline.bits_per_element((96, 256), torch.zeros(256)) == pytest.approx(8 + 32 / 256)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_group_symmetric(group):
    w = _weight(rows=32, cols=256)
    baseline = get_baseline(f"int4-g{group}")
    out = baseline.quantize_dequantize(w)
    groups = w.view(32, -1, group)
    scale = (groups.abs().amax(-1, keepdim=True) / 7).to(torch.float16).float()
    codes = out.view(32, -1, group) / torch.where(scale == 0, torch.ones_like(scale), scale)
    # 15 levels, symmetric, no zero point: codes are integers in [-7, 7].
    assert torch.equal(codes, codes.round())
    assert int(codes.abs().max()) == 7
    # Round to nearest: off by at most half a step (plus the scale's fp16 rounding).
    assert bool(((out.view(32, -1, group) - groups).abs() <= scale * 0.5 + groups.abs() * 2e-3).all())
    assert baseline.bits_per_element((32, 256)) == 4 + 16 / group
    assert baseline.unsupported((32, 8 * group + 8)) is not None
    with pytest.raises(UMQError) as info:
        baseline.quantize_dequantize(torch.randn(4, group + 8))
    assert info.value.rule == "block"


def test_nf4_is_bitsandbytes_nearest_code():
    bnbf = bitsandbytes_functional()

    w = _weight(rows=32, cols=192)
    out = get_baseline("nf4-b64").quantize_dequantize(w)
    code = bnbf.get_4bit_type("nf4", device="cpu").float()
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(-1, keepdim=True)
    normalized = blocks / torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    nearest = code[(normalized.unsqueeze(-1) - code).abs().argmin(-1)]
    # bitsandbytes decodes code * absmax; ties between codes are measure-zero here.
    torch.testing.assert_close(out.reshape(-1, 64), nearest * absmax, rtol=1e-6, atol=1e-30)
    dq = get_baseline("nf4-b64-dq").quantize_dequantize(w)
    # Double quantization only perturbs the block absmax (8-bit, ~1% at worst).
    assert float((dq - out).norm() / out.norm()) < 0.02


def test_bits_accounting():
    shape = (384, 1536)
    numel = 384 * 1536
    expected = {
        "fp16": 16.0,
        "bf16": 16.0,
        "fp8_e4m3-channel": 8 + 32 / 1536,
        "fp8_e5m2-channel": 8 + 32 / 1536,
        "fp8_e4m3-1x128": 8 + 32 / 128,
        "fp8_e4m3-128x128": 8 + 32 / 128**2,
        "mxfp8_e4m3": 8 + 8 / 32,
        "mxfp8_e5m2": 8 + 8 / 32,
        "int8-channel": 8 + 32 / 1536,
        "int8-g32": 8 + 32 / 32,
        "int4-g32": 4.5,
        "int4-g64": 4.25,
        "int4-g128": 4.125,
        "nf4-b64": 4 + 32 / 64,
        # 8-bit absmax per block of 64, one float32 per 256 of those, one float32 offset.
        "nf4-b64-dq": (4 * numel + 8 * (numel // 64) + 32 * math.ceil(numel / 64 / 256) + 32) / numel,
    }
    for name, bits in expected.items():
        assert BASELINES[name].bits_per_element(shape) == pytest.approx(bits), name
    assert set(expected) | {"llm.int8"} == set(BASELINES)
    # Odd element counts: the last half byte and the last partial block are paid in full.
    assert BASELINES["nf4-b64"].bits_per_element((3, 24)) == pytest.approx((4 * 72 + 32 * 2) / 72)


def test_bnb_nf4_storage_matches_accounting():
    bnbf = bitsandbytes_functional()

    w = _weight(rows=32, cols=192)
    packed, state = bnbf.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4")
    stored_bits = 8 * packed.numel() * packed.element_size() + 8 * state.absmax.numel() * state.absmax.element_size()
    assert BASELINES["nf4-b64"].bits_per_element((32, 192)) == pytest.approx(stored_bits / w.numel())
    packed, state = bnbf.quantize_4bit(w.contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")
    stored_bits = 8 * (
        packed.numel() * packed.element_size()
        + state.absmax.numel() * state.absmax.element_size()
        + state.state2.absmax.numel() * state.state2.absmax.element_size()
        + state.offset.numel() * state.offset.element_size()
    )
    assert BASELINES["nf4-b64-dq"].bits_per_element((32, 192)) == pytest.approx(stored_bits / w.numel())


def test_bad_input_is_a_umq_error():
    with pytest.raises(UMQError) as info:
        fake_quant_fp8_channel(torch.tensor([[1.0, float("nan")]]))
    assert info.value.rule == "finite"
    with pytest.raises(UMQError) as info:
        fake_quant_mx(torch.randn(2, 48))
    assert info.value.rule == "block" and "48" in str(info.value)
    with pytest.raises(UMQError) as info:
        get_baseline("fp9")
    assert info.value.rule == "baseline"
    assert BASELINES["fp8_e4m3-1x128"].unsupported((4, 384)) is None
    assert "128" in BASELINES["fp8_e4m3-1x128"].unsupported((4, 200))
