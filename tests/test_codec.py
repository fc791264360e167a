"""Tests of the torch reference codec (``umqcli.codec``) against FORMAT v1.

Truth comes from outside the codec: the conformance vectors of ``shared/vectors`` (made
by an independent implementation), ml_dtypes (an independent FP8 implementation), and
FORMAT §3/§4 re-derived here in plain numpy with a per-group byte walk.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from umqcli import _fused, codec
from umqcli.errors import UMQError
from umqcli.format import (
    DATA_SUFFIX,
    GROUP,
    LO_KERNEL_CODES,
    MASK_SUFFIX,
    SCALE_SUFFIX,
    HiFormat,
    LoFormat,
    QuantParams,
    Selection,
    TensorSpec,
    decode_metadata,
    encode_metadata,
)

# The packed files of shared/vectors/README.md (its table); a new file must be added here.
VECTOR_FILES = [
    "k0_fp8_e4m3_block32.safetensors",
    "k1_fp8_e4m3_blockrow.safetensors",
    "k2_fp8_e5m2_block32.safetensors",
    "k3_fp8_e4m3_block64.safetensors",
    "k4_int8_block8.safetensors",
    "k8_int8_blockrow.safetensors",
]
_NAME = re.compile(r"k(?P<k>\d)_(?P<lo>fp8_e4m3|fp8_e5m2|int8)_block(?P<block>\d+|row)\.safetensors")

NP_LO = {
    LoFormat.FP8_E4M3: ml_dtypes.float8_e4m3fn,
    LoFormat.FP8_E5M2: ml_dtypes.float8_e5m2,
    LoFormat.INT8: np.int8,
}
NP_FLOAT = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
NP_HI = {HiFormat.FLOAT16: np.float16, HiFormat.BFLOAT16: ml_dtypes.bfloat16}


# --------------------------------------------------------------------------- helpers


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata() or {}


def params_from_name(file_name: str) -> QuantParams:
    match = _NAME.fullmatch(file_name)
    assert match, file_name
    block = 0 if match["block"] == "row" else int(match["block"])
    return QuantParams(k=int(match["k"]), lo=match["lo"], block=block)


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def reference_decode(spec: TensorSpec, data: np.ndarray, mask: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """FORMAT §3/§4 written out independently of the codec: walk every group's bytes in
    position order (lo 1 byte, hi 2 bytes little-endian), lo = float32(decode(q) * scale)
    cast to the source dtype, hi = the stored 16-bit value cast to the source dtype.
    Returns the decoded matrix as a numpy array of the source dtype."""
    rows, cols = spec.shape
    out = np.zeros((rows, cols), dtype=NP_FLOAT[spec.dtype])
    for r in range(rows):
        for g in range(cols // GROUP):
            offset = g * (GROUP + spec.k)
            for i in range(GROUP):
                col = g * GROUP + i
                if (int(mask[r, g]) >> i) & 1:
                    pattern = np.array([int(data[r, offset]) | (int(data[r, offset + 1]) << 8)], dtype=np.uint16)
                    out[r, col] = pattern.view(NP_HI[spec.hi])[0].astype(np.float32)
                    offset += 2
                else:
                    code = np.array([data[r, offset]], dtype=np.uint8).view(NP_LO[spec.lo])
                    product = code.astype(np.float32)[0] * np.float32(scale[r, col // spec.block])
                    out[r, col] = np.float32(product).astype(NP_FLOAT[spec.dtype])
                    offset += 1
    return out


def heavy_tailed(rows: int, cols: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Student-t (df 1.5..5, drawn from the seed) entries times 0.02, with 1% of them
    replaced by outliers of magnitude 20..200x that scale; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    df = rng.uniform(1.5, 5.0)
    values = rng.standard_t(df, size=(rows, cols))
    outliers = rng.random((rows, cols)) < 0.01
    values = np.where(outliers, np.sign(values) * rng.uniform(20, 200, size=(rows, cols)), values)
    return torch.from_numpy((values * 0.02).astype(np.float32)).to(dtype)


# --------------------------------------------------------------------------- conformance


def test_vector_files_are_the_listed_ones(vectors_dir: Path) -> None:
    """The directory holds exactly the six packed files this suite checks plus the source."""
    found = sorted(p.name for p in vectors_dir.glob("*.safetensors"))
    assert found == sorted(VECTOR_FILES + ["source.safetensors"])


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
@pytest.mark.parametrize("file_name", VECTOR_FILES)
def test_write_conformance(vectors_dir: Path, file_name: str, fused: bool) -> None:
    """Write direction, for the torch reference and the fused numba pass: quantizing
    each source tensor with the file's parameters gives data/mask/scale bytes identical
    to the vector, and a ``umq.tensors`` entry with every key of the vector's entry equal
    (the only extra key allowed is scale_rule=absmax)."""
    source, _ = read_file(vectors_dir / "source.safetensors")
    packed_file, metadata = read_file(vectors_dir / file_name)
    entries = json.loads(metadata["umq.tensors"])
    assert metadata["umq.version"] == "1"
    assert set(entries) == {name for name, t in source.items() if t.dim() == 2}
    params = params_from_name(file_name)
    for name, entry in entries.items():
        packed = codec.quantize(source[name], params, name=name, fused=fused)
        stored = packed.stored_tensors(name)
        for suffix in (DATA_SUFFIX, MASK_SUFFIX, SCALE_SUFFIX):
            expected = packed_file[name + suffix]
            ours = stored[name + suffix]
            assert ours.dtype == expected.dtype, (name, suffix)
            assert ours.shape == expected.shape, (name, suffix)
            assert raw_bytes(ours) == raw_bytes(expected), (name, suffix)
        ours = packed.spec.to_json()
        assert {key: ours[key] for key in entry} == entry, name
        assert set(ours) - set(entry) <= {"scale_rule"} and ours["scale_rule"] == "absmax"


@pytest.mark.parametrize("file_name", VECTOR_FILES)
def test_read_conformance(vectors_dir: Path, file_name: str) -> None:
    """Read direction: every vector tensor validates (crc included) and decodes to exactly
    the values of FORMAT §4 computed by :func:`reference_decode` (bit patterns compared, so
    signed zeros count), by the torch reference and by the fused pass; hi positions are
    the source rounded to the hi dtype; the 1-D
    ``norm.bias`` is carried through unchanged and the codec refuses to quantize it."""
    source, _ = read_file(vectors_dir / "source.safetensors")
    packed_file, metadata = read_file(vectors_dir / file_name)
    specs = decode_metadata(metadata, file=file_name)
    for name, spec in specs.items():
        data, mask, scale = (packed_file[name + s] for s in (DATA_SUFFIX, MASK_SUFFIX, SCALE_SUFFIX))
        packed = codec.PackedTensor.from_stored(spec, data, mask, scale)
        packed.validate(name=name, check_crc=True)
        expected = reference_decode(spec, data.numpy(), mask.numpy(), scale.numpy())
        for fused in (False, True):
            decoded = codec.dequantize(packed, fused=fused)
            assert decoded.dtype == source[name].dtype
            assert raw_bytes(decoded) == expected.tobytes(), (name, fused)
        hi_mask = codec.unpack_mask(mask)
        rounded = source[name].to(spec.hi.torch_dtype).to(decoded.dtype)
        assert torch.equal(decoded[hi_mask], rounded[hi_mask]), name
    assert torch.equal(packed_file["norm.bias"], source["norm.bias"])
    assert raw_bytes(packed_file["norm.bias"]) == raw_bytes(source["norm.bias"])
    with pytest.raises(UMQError) as info:
        codec.quantize(source["norm.bias"], params_from_name(file_name), name="norm.bias")
    assert info.value.rule == "shape" and info.value.tensor == "norm.bias"


# --------------------------------------------------------------------------- encodings


def _all_fp16_finite() -> tuple[torch.Tensor, int]:
    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
    nan = torch.isnan(patterns)
    return patterns[~nan].float(), int(nan.sum())


@pytest.mark.parametrize("lo", list(LoFormat))
def test_encode_lo_matches_ml_dtypes_on_all_fp16(lo: LoFormat) -> None:
    """All 65,536 fp16 bit patterns (the 2,046 NaN patterns excluded; +/-inf included,
    they clamp to +/-MAX), clamped to [-MAX, MAX] as FORMAT §4 says, encode to the same
    byte as ml_dtypes' round-to-nearest-even cast (np.rint for int8); plus 200,000 random
    float32 bit patterns inside the range, which is what w / scale really produces."""
    values, nan_count = _all_fp16_finite()
    assert nan_count == 2046 and values.numel() == 65536 - 2046
    gen = torch.Generator().manual_seed(1)
    random32 = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=gen, dtype=torch.int64)
    random32 = random32.to(torch.int32).view(torch.float32)
    random32 = random32[torch.isfinite(random32) & (random32.abs() <= lo.max_value)]
    for x in (values, random32):
        ours = codec.encode_lo(x, lo).numpy()
        clamped = np.clip(x.numpy(), -lo.max_value, lo.max_value).astype(np.float32)
        if lo is LoFormat.INT8:
            theirs = np.rint(clamped).astype(np.int8).view(np.uint8)
        else:
            theirs = clamped.astype(NP_LO[lo]).view(np.uint8)
        mismatch = np.nonzero(ours != theirs)[0]
        assert mismatch.size == 0, f"{lo}: {x[mismatch[:5]].tolist()} -> {ours[mismatch[:5]]} vs {theirs[mismatch[:5]]}"
    # Never a NaN/inf code, never int8 -128.
    codes = codec.encode_lo(values, lo)
    assert not bool(codec._invalid_code(codes, lo).any())


@pytest.mark.parametrize("lo", list(LoFormat))
def test_decode_lo_matches_ml_dtypes_on_all_bytes(lo: LoFormat) -> None:
    """Every byte 0..255 decodes to ml_dtypes' float32 value (NaN codes to NaN, the same
    positions; int8 to its two's complement integer)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ours = codec.decode_lo(codes, lo).numpy()
    theirs = codes.numpy().view(NP_LO[lo]).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    finite = ~np.isnan(theirs)
    assert ours[finite].view(np.uint32).tolist() == theirs[finite].view(np.uint32).tolist()


@pytest.mark.parametrize("hi", list(HiFormat))
def test_hi_round_trip_matches_numpy(hi: HiFormat) -> None:
    """float32 -> hi bit patterns round to nearest even like ml_dtypes/numpy, and decode_hi
    gives back the pattern's value."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(100_000, generator=gen) * torch.exp(torch.randn(100_000, generator=gen) * 4)
    x = x.clamp(-60000, 60000)
    bits = codec.encode_hi(x, hi)
    theirs = x.numpy().astype(NP_HI[hi]).view(np.int16)
    np.testing.assert_array_equal(bits.numpy(), theirs)
    assert torch.equal(codec.decode_hi(bits, hi).float(), torch.from_numpy(theirs.view(NP_HI[hi]).astype(np.float32)))


# --------------------------------------------------------------------------- properties


def _half_step(x: torch.Tensor, lo: LoFormat) -> torch.Tensor:
    """Half the spacing of the lo grid around each |x| (x already clamped to [-MAX, MAX]).

    - fp8_e4m3: subnormal below 2**-6 with spacing 2**-9; in the binade [2**e, 2**(e+1))
      the spacing is 2**(e-3) (3 mantissa bits).
    - fp8_e5m2: subnormal below 2**-14 with spacing 2**-16; spacing 2**(e-2).
    - int8: spacing 1.
    """
    if lo is LoFormat.INT8:
        return torch.full_like(x, 0.5)
    min_normal, sub_step, mant = (2.0**-6, 2.0**-9, 3) if lo is LoFormat.FP8_E4M3 else (2.0**-14, 2.0**-16, 2)
    exponent = torch.floor(torch.log2(x.abs().clamp_min(min_normal)))
    step = torch.where(x.abs() < min_normal, torch.full_like(x, sub_step), torch.exp2(exponent - mant))
    return step / 2


_SOURCE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def codec_cases(draw):
    rows = draw(st.integers(1, 6))
    groups = draw(st.integers(1, 8))
    cols = groups * GROUP
    divisors = [b for b in range(GROUP, cols + 1, GROUP) if cols % b == 0]
    block = draw(st.sampled_from([0] + divisors))
    k = draw(st.integers(0, GROUP))
    lo = draw(st.sampled_from(list(LoFormat)))
    dtype = draw(st.sampled_from(_SOURCE_DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    zero_rows = draw(st.booleans())
    return rows, cols, block, k, lo, dtype, seed, zero_rows


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(codec_cases())
def test_quantize_properties(case) -> None:
    """For random heavy-tailed tensors (shapes 1x8 .. 6x64, every k 0..8, every lo, every
    block dividing C, all three source dtypes, sometimes an all-zero row):

    - every mask byte has exactly k bits set, and the mask equals select_magnitude's;
    - hi positions decode bit-exactly to the source rounded (RNE) to the hi dtype;
    - each block's scale is float32(amax of its lo |w|) / MAX;
    - each lo byte q satisfies |decode(q) - clamp(w / s)| <= half the lo grid spacing at
      clamp(w / s) (see :func:`_half_step`), with q = 0 where s == 0, and the division
      never leaves the range by more than float32 rounding (|w / s| <= MAX * (1 + 2**-22));
    - lo positions decode to float32(decode(q) * s) cast to the source dtype;
    - the fused numba pass gives the same bytes and spec, and decodes to the same bits
      (into the source dtype and into float32, float16 and bfloat16).
    """
    rows, cols, block, k, lo, dtype, seed, zero_rows = case
    weight = heavy_tailed(rows, cols, seed, dtype)
    if zero_rows:
        weight[0] = 0
    params = QuantParams(k=k, lo=lo, block=block)
    packed = codec.quantize(weight, params, fused=False)
    fused = codec.quantize(weight, params, fused=True)
    assert fused.spec == packed.spec
    for ours, ref in ((fused.data, packed.data), (fused.mask, packed.mask), (fused.scale, packed.scale)):
        assert raw_bytes(ours) == raw_bytes(ref)
    for out_dtype in (None, *_SOURCE_DTYPES):
        assert raw_bytes(codec.dequantize(packed, out_dtype, fused=True)) == raw_bytes(
            codec.dequantize(packed, out_dtype, fused=False)
        ), out_dtype
    packed.validate()
    spec = packed.spec
    assert spec.hi.torch_dtype == (torch.float16 if dtype == torch.float32 else dtype)
    popcount = codec.POPCOUNT[packed.mask.long()]
    assert bool((popcount == k).all())
    lo_bytes, hi_bits, mask = codec.deinterleave(packed)
    assert torch.equal(mask, codec.select_magnitude(weight.float(), k))
    decoded = codec.dequantize(packed, fused=False)
    hi_expected = weight.to(spec.hi.torch_dtype).to(dtype)
    assert torch.equal(decoded[mask].view(torch.uint8) if dtype != torch.float32 else decoded[mask],
                       hi_expected[mask].view(torch.uint8) if dtype != torch.float32 else hi_expected[mask])

    w32 = weight.float()
    blocks = w32.abs().masked_fill(mask, 0).view(rows, cols // spec.block, spec.block).amax(-1)
    assert torch.equal(packed.scale, blocks / lo.max_value)
    scale = packed.scale.repeat_interleave(spec.block, dim=1)
    lo_mask = ~mask
    q_value = codec.decode_lo(lo_bytes, lo)
    zero_scale = lo_mask & (scale == 0)
    assert bool((lo_bytes[zero_scale] == 0).all())
    live = lo_mask & (scale > 0)
    ratio = w32[live] / scale[live]
    assert bool((ratio.abs() <= lo.max_value * (1 + 2.0**-22)).all())
    x = ratio.clamp(-lo.max_value, lo.max_value)
    assert bool(((q_value[live] - x).abs() <= _half_step(x, lo)).all())
    lo_expected = (q_value * scale).to(dtype)
    assert torch.equal(decoded[lo_mask].float(), lo_expected[lo_mask].float())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 7), lo=st.sampled_from([LoFormat.FP8_E4M3, LoFormat.FP8_E5M2]),
       block=st.sampled_from([0, 8, 32]))
def test_error_selection_never_worse_than_magnitude(seed, k, lo, block) -> None:
    """Error-greedy vs magnitude on heavy-tailed float32 matrices (32 x 64, student-t with
    1% outliers), fp8 lo: the squared weight error sum (w - w_hat)^2, computed in float64
    on the float32 decode, is never above magnitude's, up to 1e-6 relative slack for the
    float32 accumulation inside the selection; and the selection keeps k hi per group."""
    weight = heavy_tailed(32, 64, seed)
    base = QuantParams(k=k, lo=lo, block=block)
    magnitude = codec.quantize(weight, base)
    greedy = codec.quantize(weight, base.with_(selection=Selection.ERROR))
    assert greedy.spec.selection == "error"
    assert bool((codec.POPCOUNT[greedy.mask.long()] == k).all())
    err_mag = _sq_error(weight, magnitude)
    err_greedy = _sq_error(weight, greedy)
    assert err_greedy <= err_mag * (1 + 1e-6), (err_greedy, err_mag)


def test_error_selection_improves_in_aggregate() -> None:
    """The guard above would pass for a selection that always returned magnitude's mask;
    over 30 heavy-tailed matrices error-greedy must be strictly better on most of them and
    lower in total by a real margin (>= 1%)."""
    strictly_better, total_mag, total_greedy = 0, 0.0, 0.0
    for seed in range(30):
        weight = heavy_tailed(32, 64, seed)
        params = QuantParams(k=2, lo=LoFormat.FP8_E4M3)
        e_mag = _sq_error(weight, codec.quantize(weight, params))
        e_greedy = _sq_error(weight, codec.quantize(weight, params.with_(selection="error")))
        strictly_better += e_greedy < e_mag
        total_mag += e_mag
        total_greedy += e_greedy
    assert strictly_better >= 20
    assert total_greedy <= 0.99 * total_mag


def _sq_error(weight: torch.Tensor, packed: codec.PackedTensor, act_sq: torch.Tensor | None = None) -> float:
    diff = weight.double() - codec.dequantize(packed, torch.float32).double()
    sq = diff.square()
    if act_sq is not None:
        sq = sq * act_sq.double()
    return float(sq.sum())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 7), lo=st.sampled_from(list(LoFormat)),
       block=st.sampled_from([0, 16]))
def test_activation_selection_never_worse_than_magnitude(seed, k, lo, block) -> None:
    """Activation-aware vs magnitude on activation-weighted error: with a heavy-tailed
    E[x_j^2] per input column (lognormal, a few 100x outlier channels as in LLM.int8),
    sum_j a_j (w_ij - w_hat_ij)^2 (float64 on the float32 decode) of ``activation`` is
    never above magnitude's, up to 1e-6 relative slack for float32 accumulation."""
    weight = heavy_tailed(16, 64, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    act_sq = torch.exp(torch.randn(64, generator=gen))
    act_sq[torch.randint(0, 64, (3,), generator=gen)] *= 100
    base = QuantParams(k=k, lo=lo, block=block)
    magnitude = codec.quantize(weight, base)
    aware = codec.quantize(weight, base.with_(selection=Selection.ACTIVATION), act_sq=act_sq)
    assert bool((codec.POPCOUNT[aware.mask.long()] == k).all())
    err_mag = _sq_error(weight, magnitude, act_sq)
    err_aware = _sq_error(weight, aware, act_sq)
    assert err_aware <= err_mag * (1 + 1e-6), (err_aware, err_mag)


def test_activation_selection_follows_outlier_channels() -> None:
    """A channel with a huge activation second moment is kept hi in (nearly) every row
    even where its weight is not the group's largest: activation-weighted error drops by
    more than half against magnitude."""
    weight = heavy_tailed(64, 64, 7)
    act_sq = torch.ones(64)
    act_sq[5] = 1e4
    params = QuantParams(k=1, lo=LoFormat.FP8_E4M3, selection=Selection.ACTIVATION)
    aware = codec.quantize(weight, params, act_sq=act_sq)
    mask = codec.unpack_mask(aware.mask)
    assert mask[:, 5].float().mean() > 0.9
    magnitude = codec.quantize(weight, params.with_(selection="magnitude"))
    assert _sq_error(weight, aware, act_sq) < 0.5 * _sq_error(weight, magnitude, act_sq)


def test_magnitude_tie_break_and_signed_zero() -> None:
    """Ties in |w| go to the lower position; -0.0 and +0.0 tie; k = 0 and 8 are all-lo /
    all-hi."""
    row = torch.tensor([[1.0, -2.0, 2.0, 0.5, -0.0, 0.0, -2.0, 1.0]])
    assert codec.mask_bits(codec.select_magnitude(row, 1)).item() == 0b00000010
    assert codec.mask_bits(codec.select_magnitude(row, 3)).item() == 0b01000110
    zeros = torch.tensor([[-0.0, 0.0, -0.0, 0.0, 0.0, -0.0, 0.0, 0.0]])
    assert codec.mask_bits(codec.select_magnitude(zeros, 3)).item() == 0b00000111
    assert codec.mask_bits(codec.select_magnitude(row, 0)).item() == 0
    assert codec.mask_bits(codec.select_magnitude(row, 8)).item() == 0xFF


def test_given_mask_overrides_selection() -> None:
    """A caller's mask is used as given (the spec keeps the selection name); a mask with
    the wrong count is refused with rule popcount, one of the wrong shape with rule shape."""
    weight = heavy_tailed(4, 32, 3)
    mask = torch.zeros(4, 32, dtype=torch.bool)
    mask[:, 7::8] = True
    packed = codec.quantize(weight, QuantParams(k=1), mask=mask)
    assert torch.equal(codec.unpack_mask(packed.mask), mask)
    mask[0, 0] = True
    with pytest.raises(UMQError) as info:
        codec.quantize(weight, QuantParams(k=1), mask=mask, name="w")
    assert info.value.rule == "popcount" and info.value.tensor == "w"
    assert _rule(lambda: codec.quantize(weight, QuantParams(k=1), mask=mask[:, :16])).rule == "shape"


def test_byte_layout_matches_format_picture() -> None:
    """FORMAT §3: a row of 8 fp16 becomes 8 + k bytes plus one mask byte; the hi value's
    two bytes are little-endian at offset i + popcount(mask below i)."""
    row = torch.tensor([[0.1, 0.2, -3.0, 0.3, 0.4, 5.0, 0.5, 0.6]], dtype=torch.float16)
    packed = codec.quantize(row, QuantParams(k=2, lo="fp8_e4m3"))
    assert packed.data.shape == (1, 10) and packed.mask.shape == (1, 1)
    assert packed.mask.item() == 0b00100100
    data = packed.data[0].tolist()
    three = torch.tensor([-3.0], dtype=torch.float16).view(torch.int16).item() & 0xFFFF
    five = torch.tensor([5.0], dtype=torch.float16).view(torch.int16).item() & 0xFFFF
    assert data[2] | (data[3] << 8) == three  # position 2 at offset 2
    assert data[6] | (data[7] << 8) == five  # position 5 at offset 5 + 1
    assert packed.bits_per_element == 8 * (10 + 1 + 4) / 8


# --------------------------------------------------------------------------- FORMAT §7


def _packed(k: int = 2, lo: str = "fp8_e4m3", block: int = 16) -> codec.PackedTensor:
    return codec.quantize(heavy_tailed(4, 32, 11), QuantParams(k=k, lo=lo, block=block), name="w")


def _with_crc(spec: TensorSpec, data, mask, scale) -> TensorSpec:
    entry = spec.to_json()
    entry["crc32"] = {"data": codec.crc32(data), "mask": codec.crc32(mask), "scale": codec.crc32(scale)}
    return TensorSpec.from_json(entry)


def _rule(call) -> UMQError:
    with pytest.raises(UMQError) as info:
        call()
    return info.value


@pytest.mark.parametrize("which", ["data", "mask", "scale"])
def test_reader_refuses_wrong_stored_shape(which: str) -> None:
    """A stored tensor one column short fails with rule stored-shape naming the tensor."""
    packed = _packed()
    parts = {"data": packed.data, "mask": packed.mask, "scale": packed.scale}
    parts[which] = parts[which][:, :-1].contiguous()
    bad = codec.PackedTensor.from_stored(packed.spec, **parts)
    err = _rule(lambda: bad.validate(name="w"))
    assert err.rule == "stored-shape" and err.tensor == "w" and which in err.message


def test_reader_refuses_wrong_stored_dtype() -> None:
    """A float64 scale tensor fails with rule stored-dtype."""
    packed = _packed()
    bad = codec.PackedTensor.from_stored(packed.spec, packed.data, packed.mask, packed.scale.double())
    assert _rule(lambda: bad.validate(name="w")).rule == "stored-dtype"


def test_reader_refuses_popcount_not_k() -> None:
    """A mask byte with k+1 bits (crc recomputed so the popcount rule itself is reached)."""
    packed = _packed(k=2)
    mask = packed.mask.clone()
    mask[1, 2] = mask[1, 2] | (~mask[1, 2] & -(~mask[1, 2]).to(torch.int16)).to(torch.uint8)
    assert int(codec.POPCOUNT[mask[1, 2].long()]) == 3
    bad = codec.PackedTensor.from_stored(_with_crc(packed.spec, packed.data, mask, packed.scale), packed.data, mask, packed.scale)
    err = _rule(lambda: bad.validate(name="w"))
    assert err.rule == "popcount" and "[1, 2]" in err.message


def test_reader_refuses_crc_mismatch() -> None:
    """One flipped payload byte is caught by the crc32 rule before decoding."""
    packed = _packed()
    data = packed.data.clone()
    data[0, 0] ^= 0x01
    bad = codec.PackedTensor.from_stored(packed.spec, data, packed.mask, packed.scale)
    err = _rule(lambda: bad.validate(name="w"))
    assert err.rule == "crc32" and err.tensor == "w"
    bad.validate(name="w", check_crc=False)  # the rest of the tensor is still well-formed


def test_reader_refuses_bad_scale_and_lo_code() -> None:
    """A negative scale (rule scale) and a NaN fp8 code in a lo slot (rule lo-code)."""
    packed = _packed(k=0, block=32)
    scale = packed.scale.clone()
    scale[2, 0] = -1.0
    bad = codec.PackedTensor.from_stored(_with_crc(packed.spec, packed.data, packed.mask, scale), packed.data, packed.mask, scale)
    assert _rule(lambda: bad.validate()).rule == "scale"
    data = packed.data.clone()
    data[3, 5] = 0x7F
    bad = codec.PackedTensor.from_stored(_with_crc(packed.spec, data, packed.mask, packed.scale), data, packed.mask, packed.scale)
    assert _rule(lambda: bad.validate()).rule == "lo-code"


@pytest.mark.parametrize("lo, code", [("fp8_e4m3", 0x7F), ("fp8_e5m2", 0x7C), ("int8", 0x80)])
def test_lo_code_rule_looks_only_at_lo_bytes(lo: str, code: int) -> None:
    """A hi byte that happens to equal an invalid lo code is fine; the same byte in a lo
    slot is refused (rule lo-code), with the payload position in the message."""
    # fp16 hi value with low byte == code (e.g. 0x3C7F = 1.124...), in position 0 of a group.
    hi_value = torch.tensor([0x3C00 | code], dtype=torch.int16).view(torch.float16).float()
    weight = torch.full((3, 16), 0.01)
    weight[1, 8] = hi_value
    packed = codec.quantize(weight.half(), QuantParams(k=1, lo=lo))
    assert packed.data[1, 9] == code  # group 1 starts at byte 9; position 0 is hi
    packed.validate()
    data = packed.data.clone()
    data[2, 4] = code  # position 3 of row 2, group 0 (position 0 is hi: ties go low) is lo
    mask = codec.unpack_mask(packed.mask)
    assert not bool(mask[2, 3]) and codec.byte_offsets(mask, 1)[2, 3] == 4
    bad = codec.PackedTensor.from_stored(_with_crc(packed.spec, data, packed.mask, packed.scale), data, packed.mask, packed.scale)
    err = _rule(lambda: bad.validate(name="w"))
    assert err.rule == "lo-code" and "at [2, 4]" in str(err)


@pytest.mark.parametrize(
    "change, rule",
    [
        ({"block": 24}, "block"),
        ({"block": 12}, "block"),
        ({"lo": "fp4"}, "lo"),
        ({"hi": "float32"}, "hi"),
        ({"k": 9}, "k"),
        ({"shape": [4, 30]}, "shape"),
        ({"dtype": "float64"}, "dtype"),
        ({"crc32": {"data": 1}}, "crc32"),
    ],
)
def test_spec_rules(change: dict, rule: str) -> None:
    """Each malformed umq.tensors entry fails with its rule and names the tensor."""
    entry = _packed().spec.to_json() | change
    err = _rule(lambda: TensorSpec.from_json(entry, tensor="w"))
    assert err.rule == rule and err.tensor == "w"


def test_unknown_version_refused() -> None:
    """umq.version "2" is refused with rule version, naming the file."""
    meta = encode_metadata({"w": _packed().spec})
    meta["umq.version"] = "2"
    err = _rule(lambda: decode_metadata(meta, file="x.safetensors"))
    assert err.rule == "version" and err.file == "x.safetensors"


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", _SOURCE_DTYPES)
def test_non_finite_input_refused(bad: float, dtype: torch.dtype, fused: bool) -> None:
    """NaN/inf anywhere (also in a lo position) is refused with rule finite, naming the
    tensor and the element, by both paths."""
    weight = heavy_tailed(3, 16, 5, dtype)
    weight[2, 9] = bad
    err = _rule(lambda: codec.quantize(weight, QuantParams(k=1), name="layer.w", fused=fused))
    assert err.rule == "finite" and err.tensor == "layer.w" and "[2, 9]" in err.message


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
def test_hi_overflow_float16_refused_and_auto_picks_bfloat16(fused: bool) -> None:
    """float32 values beyond float16's range: hi=float16 is refused (rule hi-overflow,
    nothing returned); hi auto resolves to bfloat16 and keeps them to bfloat16 precision
    (both paths; a value over 65504 in a lo position needs no hi and is fine)."""
    weight = heavy_tailed(4, 16, 9)
    weight[1, 3] = 1.0e6
    weight[2, 12] = -3.0e5
    err = _rule(lambda: codec.quantize(weight, QuantParams(k=1, hi="float16"), name="w", fused=fused))
    assert err.rule == "hi-overflow" and err.tensor == "w" and "[1, 3]" in err.message
    packed = codec.quantize(weight, QuantParams(k=1), fused=fused)
    assert packed.spec.hi is HiFormat.BFLOAT16
    decoded = codec.dequantize(packed)
    assert decoded[1, 3].item() == torch.tensor(1.0e6).to(torch.bfloat16).item()
    assert decoded[2, 12].item() == torch.tensor(-3.0e5).to(torch.bfloat16).item()
    # Within range, auto keeps float16 for a float32 source.
    assert codec.quantize(heavy_tailed(4, 16, 9), QuantParams(k=1), fused=fused).spec.hi is HiFormat.FLOAT16
    # k=0: the big values are lo, no hi overflow can happen.
    assert codec.quantize(weight, QuantParams(k=0, hi="float16"), fused=fused).spec.hi is HiFormat.FLOAT16


def test_bad_source_refused() -> None:
    """Shapes the codec cannot pack: 1-D, C not a multiple of 8, block not dividing C,
    an integer dtype, activation without statistics or with statistics of the wrong
    shape, NaN or negative."""
    assert _rule(lambda: codec.quantize(torch.ones(8), QuantParams())).rule == "shape"
    assert _rule(lambda: codec.quantize(torch.ones(2, 12), QuantParams())).rule == "shape"
    assert _rule(lambda: codec.quantize(torch.ones(2, 32), QuantParams(block=24))).rule == "block"
    assert _rule(lambda: codec.quantize(torch.ones(2, 8, dtype=torch.int32), QuantParams())).rule == "source-dtype"
    assert _rule(lambda: codec.quantize(torch.ones(2, 8), QuantParams(selection="activation"))).rule == "activation-stats"
    assert _rule(lambda: codec.quantize(torch.ones(2, 8), QuantParams(selection="activation"), act_sq=torch.ones(4))).rule == "activation-stats"
    nan_stats = torch.tensor([1.0, float("nan"), 1, 1, 1, 1, 1, 1])
    assert _rule(lambda: codec.quantize(torch.ones(2, 8), QuantParams(selection="activation"), act_sq=nan_stats)).rule == "activation-stats"
    assert _rule(lambda: codec.quantize(torch.ones(2, 8), QuantParams(selection="activation"), act_sq=-torch.ones(8))).rule == "activation-stats"


# --------------------------------------------------------------------------- fake quantize


@pytest.mark.parametrize("lo", list(LoFormat))
@pytest.mark.parametrize("dtype", _SOURCE_DTYPES)
def test_fake_quantize_is_the_codec_round_trip(lo: LoFormat, dtype: torch.dtype) -> None:
    """fake_quantize == dequantize(quantize(...)) bit for bit, in the source dtype and in
    float32, for every k, selection and block (with a zero block: scale 0), and one
    FakeQuantizer serves them all in any order."""
    weight = heavy_tailed(24, 256, 17).to(dtype)
    weight[3, :32] = 0.0  # an all-zero block: scale 0, lo codes 0
    act_sq = torch.from_numpy(np.random.default_rng(3).gamma(0.5, 2.0, 256).astype(np.float32))
    shared = codec.FakeQuantizer(weight, act_sq)
    for k in (0, 1, 5, 8):
        for selection in (Selection.MAGNITUDE, Selection.ERROR, Selection.ACTIVATION):  # saliency is gptq's
            for block in (0, 32):
                params = QuantParams(k=k, lo=lo, block=block, selection=selection)
                packed = codec.quantize(weight, params, act_sq=act_sq)
                mask, hi = shared.select(params)
                assert torch.equal(codec.mask_bits(mask), packed.mask) and hi is packed.spec.hi, params
                for out in (None, torch.float32):
                    assert torch.equal(shared.values(params, dtype=out), codec.dequantize(packed, out)), (params, out)
    params = QuantParams(k=3, lo=lo, block=128, selection="activation")
    for out in (None, torch.float32):
        expected = codec.dequantize(codec.quantize(weight, params, act_sq=act_sq), out)
        assert torch.equal(codec.fake_quantize(weight, params, act_sq=act_sq, dtype=out), expected)
    # a given mask overrides the selection, as in quantize
    mask = codec.select_magnitude(-weight.float(), 2, salience=torch.rand(24, 256))
    params = QuantParams(k=2, lo=lo, block=32)
    expected = codec.dequantize(codec.quantize(weight, params, mask=mask), torch.float32)
    assert torch.equal(codec.fake_quantize(weight, params, mask=mask, dtype=torch.float32), expected)


def test_fake_quantize_raises_what_quantize_raises() -> None:
    weight = heavy_tailed(4, 16, 9)
    weight[1, 3] = 1.0e6
    err = _rule(lambda: codec.fake_quantize(weight, QuantParams(k=1, hi="float16")))
    assert err.rule == "hi-overflow" and "[1, 3]" in err.message
    auto = codec.fake_quantize(weight, QuantParams(k=1))  # auto: bfloat16 keeps it
    assert torch.equal(auto, codec.dequantize(codec.quantize(weight, QuantParams(k=1))))
    assert _rule(lambda: codec.fake_quantize(torch.ones(2, 8), QuantParams(selection="activation"))).rule == "activation-stats"
    bad = torch.ones(2, 8)
    bad[0, 0] = float("nan")
    assert _rule(lambda: codec.fake_quantize(bad, QuantParams())).rule == "finite"
    assert _rule(lambda: codec.fake_quantize(torch.ones(2, 8), QuantParams(k=1), mask=torch.ones(2, 8, dtype=torch.bool))).rule == "popcount"


# --------------------------------------------------------------------------- fused pass


def test_fused_pass_is_installed() -> None:
    """numba is part of the dev extra, so the fused pass must be active in the test run
    (otherwise the fused=True tests above would fail with rule fused, not skip)."""
    assert _fused.available()


@pytest.mark.parametrize("lo", list(LoFormat))
def test_fused_encoder_matches_torch_and_ml_dtypes(lo: LoFormat) -> None:
    """The fused pass's integer/magic-number encoder gives the torch reference's byte
    for every finite fp16 input clamped to [-MAX, MAX], for 200,000 random float32 bit
    patterns in range, and for both signs of every power of two and its neighbours
    around the subnormal/normal boundary (where rounding carries between the two)."""
    values, _ = _all_fp16_finite()
    values = values.clamp(-lo.max_value, lo.max_value)
    gen = torch.Generator().manual_seed(5)
    random32 = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    random32 = random32.view(torch.float32)
    random32 = random32[torch.isfinite(random32) & (random32.abs() <= lo.max_value)]
    powers = torch.exp2(torch.arange(-30, 16, dtype=torch.float32))
    ulp = torch.tensor([-2, -1, 0, 1, 2], dtype=torch.int32)
    edges = (powers.view(torch.int32).unsqueeze(1) + ulp).reshape(-1).view(torch.float32)
    edges = torch.cat([edges, -edges]).clamp(-lo.max_value, lo.max_value)
    for x in (values, random32, edges):
        ours = _fused.kernels().encode_lo_array(x.numpy(), LO_KERNEL_CODES[lo])
        np.testing.assert_array_equal(ours, codec.encode_lo(x, lo).numpy())


@pytest.mark.parametrize("hi", list(HiFormat))
def test_fused_float32_to_16bit_casts_match_torch(hi: HiFormat) -> None:
    """The fused decoder's float32 -> float16/bfloat16 rounding equals torch's on every
    product it can meet (each fp8/int8 code times random scales, including scales that
    push products into float16's subnormal range and past its overflow), and on random
    float32 bit patterns (NaN excluded)."""
    gen = torch.Generator().manual_seed(6)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    products = [codes.view(lo.torch_dtype).float() for lo in LoFormat]
    scales = torch.exp2(torch.empty(400).uniform_(-40, 12, generator=gen))
    x = torch.cat([(p[torch.isfinite(p)].unsqueeze(1) * scales).reshape(-1) for p in products])
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = torch.cat([x, bits.view(torch.float32)])
    x = x[~torch.isnan(x)]
    ours = _fused.kernels().f32_to_16_array(x.numpy(), hi is HiFormat.BFLOAT16)
    theirs = x.to(hi.torch_dtype).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)


def test_fused_large_tensor_matches_reference() -> None:
    """Above FUSED_MIN_ELEMENTS the default path is the fused one: on a 256 x 512 fp16
    heavy-tailed tensor (k=3, block 64) bytes, spec and decode equal the reference's; a
    non-contiguous view and an nn.Parameter are accepted by both paths."""
    weight = heavy_tailed(256, 512, 8, torch.float16)
    assert weight.numel() >= codec.FUSED_MIN_ELEMENTS
    params = QuantParams(k=3, lo="fp8_e4m3", block=64)
    default = codec.quantize(weight, params)
    reference = codec.quantize(weight, params, fused=False)
    assert default.spec == reference.spec
    assert raw_bytes(default.data) == raw_bytes(reference.data)
    assert raw_bytes(default.mask) == raw_bytes(reference.mask)
    assert raw_bytes(default.scale) == raw_bytes(reference.scale)
    assert raw_bytes(codec.dequantize(default)) == raw_bytes(codec.dequantize(default, fused=False))
    # A transposed (non-contiguous) view packs like its contiguous copy on both paths.
    transposed = weight.t().contiguous().t()
    assert not transposed.is_contiguous()
    for fused in (True, False):
        assert raw_bytes(codec.quantize(transposed, params, fused=fused).data) == raw_bytes(reference.data)
    # An nn.Parameter (requires_grad) packs to the same bytes on both paths, without grad.
    parameter = torch.nn.Parameter(weight.float())
    for fused in (True, False):
        packed = codec.quantize(parameter, params, fused=fused)
        assert not packed.scale.requires_grad
        assert raw_bytes(packed.data) == raw_bytes(codec.quantize(weight.float(), params, fused=False).data)


def test_decoders_refuse_a_mask_beyond_the_payload() -> None:
    """An unvalidated packed tensor whose mask has more than k bits (payload too short)
    raises UMQError rule popcount in both decoders (the fused one would otherwise read
    past the row); a mangled stored shape is refused before any decoding."""
    packed = _packed(k=1)
    mask = packed.mask.clone()
    mask[3, 3] = 0xFF
    bad = codec.PackedTensor.from_stored(packed.spec, packed.data, mask, packed.scale)
    short = codec.PackedTensor.from_stored(packed.spec, packed.data[:, :-1], packed.mask, packed.scale)
    for fused in (True, False):
        assert _rule(lambda: codec.dequantize(bad, fused=fused)).rule == "popcount"
        assert _rule(lambda: codec.dequantize(short, fused=fused)).rule == "stored-shape"


def test_fused_pass_follows_and_keeps_torch_threads() -> None:
    """The fused pass runs on torch.get_num_threads() threads and leaves torch's setting
    as it was (starting numba's OpenMP layer would otherwise reset it); calls from several
    Python threads at once (as `umq pack` workers make) give the reference bytes."""
    import threading

    before = torch.get_num_threads()
    weight = heavy_tailed(64, 1024, 12, torch.bfloat16)
    reference = codec.quantize(weight, QuantParams(k=2), fused=False)
    try:
        torch.set_num_threads(1)
        codec.quantize(weight, QuantParams(k=2), fused=True)
        assert torch.get_num_threads() == 1 and _fused.kernels().numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    results = []

    def work() -> None:
        results.append(codec.quantize(weight, QuantParams(k=2), fused=True))

    workers = [threading.Thread(target=work) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(results) == 4
    assert all(raw_bytes(r.data) == raw_bytes(reference.data) for r in results)


def test_fused_pass_first_use_from_threads_in_a_fresh_process() -> None:
    """The fused pass's one-off set-up (numba import, thread pool, tables) is safe when
    several threads use the codec first at the same time, as pack's workers do; and
    ``allows_concurrent_calls`` only answers once numba's layer is known (a torch-path
    call before it must not let pack's workers overlap: that raced numba's import)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import threading, torch
        from umqcli import _fused
        from umqcli.codec import dequantize, quantize
        from umqcli.format import QuantParams
        assert _fused.allows_concurrent_calls() is None
        quantize(torch.randn(4, 64), QuantParams(k=1))  # small: the torch path, numba unused
        assert _fused.allows_concurrent_calls() is None  # still unknown: stay serialised
        errors = []
        def work(seed):
            try:
                w = torch.randn(512, 256, generator=torch.Generator().manual_seed(seed))
                dequantize(quantize(w, QuantParams(k=1)))
            except Exception as exc:
                errors.append(repr(exc))
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert errors == [], errors
        assert _fused.allows_concurrent_calls() in (True, False)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("lo", list(LoFormat), ids=lambda lo: lo.value)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_fused_k1_scan_matches_reference_with_ties(lo: LoFormat, dtype: torch.dtype) -> None:
    """k = 1 has its own one-scan selection in the fused pass (the first of the largest
    magnitudes is hi, the scale comes from the largest of the other seven): equal to the
    reference's ranks byte for byte where ties abound (small integers, all-zero rows and
    groups, equal magnitudes of opposite sign) and on heavy tails, per row and per block."""
    gen = torch.Generator().manual_seed(3)
    ties = torch.randint(-3, 4, (256, 256), generator=gen).to(torch.float32) * 0.25
    ties[5] = 0.0
    ties[7, :64] = 0.0
    ties[9] = torch.tensor([1.0, -1.0] * 128)
    for weight in (ties.to(dtype), heavy_tailed(256, 256, 11, dtype)):
        assert weight.numel() >= codec.FUSED_MIN_ELEMENTS
        for block in (0, 8, 64):
            params = QuantParams(k=1, lo=lo, block=block)
            fused = codec.quantize(weight, params, fused=True)
            reference = codec.quantize(weight, params, fused=False)
            assert fused.spec == reference.spec
            for ours, theirs in ((fused.data, reference.data), (fused.mask, reference.mask),
                                 (fused.scale, reference.scale)):
                assert raw_bytes(ours) == raw_bytes(theirs)


def test_torch_threads_sets_for_the_block_and_puts_back() -> None:
    """The one helper that changes torch's thread count (calibrate's search uses it): set
    inside, restored after, also when the block raises; None leaves it alone."""
    before = torch.get_num_threads()
    with _fused.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with _fused.torch_threads(1):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with _fused.torch_threads(None):
        assert torch.get_num_threads() == before
