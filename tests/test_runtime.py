"""The fused CPU runtime (umqcli.runtime) against the torch reference (decode, then matmul).

Decoded weights must be bit-exact with ``codec.dequantize(..., fused=False)``. Products may
differ from the exact ``x · Ŵᵀ`` only by float32 rounding in some summation order:
``umqcli.testing.bounds.dot_error_bound`` (gamma_C * |x| · |Ŵ|ᵀ, Higham §3.1), a relative
error of a few 1e-5 at the widths used here; a misplaced byte, a wrong scale or a lost hi
value is orders of magnitude larger. The bfloat16 prefill path (bfloat16 tiles and GEMM) is
held to ``bf16_linear_error_bound`` and to bit-equality with ``F.linear`` in bfloat16.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from umqcli import runtime
from umqcli.backends import get_backend
from umqcli.codec import PackedTensor, dequantize, quantize
from umqcli.errors import UMQError
from umqcli.format import QuantParams, TensorSpec
from umqcli.nn import UMQLinear, weight_memory
from umqcli.testing.bounds import bf16_linear_error_bound, dot_error_bound

from checkpoints import minilm_dir

LOS = ("int8", "fp8_e4m3", "fp8_e5m2")


def _cpu_has_avx2() -> bool:
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


def _isas() -> list[str]:
    return list(runtime.supported_isas())


def assert_within_bound(y: torch.Tensor, x: torch.Tensor, packed: PackedTensor) -> None:
    """``y`` (float32 ``[M, R]``) is within :func:`dot_error_bound` of the exact product."""
    exact = x.double() @ dequantize(packed, torch.float32, fused=False).double().T
    err = (y.double() - exact).abs()
    bound = dot_error_bound(x, packed)
    assert bool((err <= bound).all()), f"max err {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"


def packed_weight(rows: int, cols: int, seed: int = 0, dtype=torch.float32, **params) -> PackedTensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.05
    w[:, :: max(1, cols // 7)] *= 20.0  # outlier columns, so hi values and scales matter
    return quantize(w.to(dtype), QuantParams(**params), fused=False)  # the reference writer


def test_fast_path_builds_and_runs_here():
    """A fresh clone with a compiler must get the compiled path, not the fallback."""
    if shutil.which("g++") is None:
        pytest.skip("no g++ on this machine: the fallback is tested below")
    assert runtime.available()
    if _cpu_has_avx2():
        assert runtime.supported_isas()[0] == "avx2"
    layer = UMQLinear.from_packed(packed_weight(24, 64, k=1))
    layer(torch.randn(1, 64))
    assert runtime.last_path() == f"{runtime.supported_isas()[0]}-gemv"
    assert layer._backend_for(torch.device("cpu")).name == "cpu"
    layer(torch.randn(40, 64))
    assert runtime.last_path() == f"{runtime.supported_isas()[0]}-tiled"


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
@pytest.mark.parametrize("lo", LOS)
@pytest.mark.parametrize("hi", ["float16", "bfloat16"])
@pytest.mark.parametrize("k", [0, 1, 3, 8])
@pytest.mark.parametrize("block", [0, 40])
def test_matmul_and_decode_match_the_reference(isa, lo, hi, k, block):
    if isa not in _isas():
        pytest.skip(f"this CPU does not run the {isa} path")
    # 37 rows: not a multiple of the 8-row scheduling unit; 200 columns = 25 groups: not a
    # multiple of the 4-group unroll, and the last groups of the buffer take the copy path.
    packed = packed_weight(37, 200, seed=k, lo=lo, hi=hi, k=k, block=block)
    reference = dequantize(packed, torch.float32, fused=False)
    decoded = runtime.decode(packed, torch.float32, isa=isa)
    assert torch.equal(decoded.view(torch.int32), reference.view(torch.int32))
    for dtype in (torch.float16, torch.bfloat16):
        expected = dequantize(packed, dtype, fused=False)
        assert torch.equal(runtime.decode(packed, dtype, isa=isa).view(torch.int16), expected.view(torch.int16))
    gen = torch.Generator().manual_seed(1)
    for m in (1, 2, 3, 5, 17, 40):  # 17 and 40 > GEMV_MAX_ROWS: the tiled prefill path
        x = torch.randn(m, 200, generator=gen)
        y = runtime.matmul(x, packed, isa=isa)
        assert y.shape == (m, 37) and y.dtype == torch.float32
        assert runtime.last_path() == f"{isa}-{'gemv' if m <= runtime.GEMV_MAX_ROWS else 'tiled'}"
        assert_within_bound(y, x, packed)


# Per fp8 format: the largest lo value (the row's scale is then 1), a subnormal of code 0x03
# (0.11 in binary times the smallest normal exponent), a hi value above the lo maximum.
FP8_SUBNORMAL_CASES = {"fp8_e4m3": (448.0, 3 * 2.0**-9, 1000.0), "fp8_e5m2": (57344.0, 3 * 2.0**-16, 60000.0)}


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
@pytest.mark.parametrize("lo", sorted(FP8_SUBNORMAL_CASES))
@pytest.mark.parametrize("hi", ["float16", "bfloat16"])
@pytest.mark.parametrize("flush_denormal", [False, True])
def test_fp8_subnormal_codes_with_and_without_flush_denormal(isa, lo, hi, flush_denormal):
    """The AVX2 path reads fp8 codes as float32 bits (value * 2^-120 for e4m3, 2^-112 for
    e5m2), so subnormal codes pass through float32 denormals. Where the thread treats
    denormals as zero (``torch.set_flush_denormal(True)``) it must take the float16 route
    instead: here every lo weight of the product is a subnormal code, so reading them as
    0 would lose the whole result."""
    if isa not in _isas():
        pytest.skip(f"this CPU does not run the {isa} path")
    largest, tiny, outlier = FP8_SUBNORMAL_CASES[lo]
    rows, cols = 19, 8 * 33
    w = torch.full((rows, cols), tiny)
    w[:, 1::8] *= -1.0
    w[:, ::8] = outlier  # the hi slots (k = 1, by magnitude): position 0 of every group
    w[:, 1] = largest  # the largest lo value: the row's scale is 1
    packed = quantize(w, QuantParams(k=1, lo=lo, hi=hi), fused=False)
    assert bool((packed.scale == 1.0).all())
    codes = packed.data.view(rows, -1, 9)[:, 1:, 2:]  # lo codes after each group's hi bytes, group 0 aside
    assert bool(((codes & 0x7F) == 0x03).all())  # every one the subnormal `tiny`
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(0))
    x[:, ::8] = 0.0  # the product is the subnormal codes' alone
    x[:, 1] = 0.0
    if not torch.set_flush_denormal(flush_denormal):
        pytest.skip("this CPU cannot flush denormals")
    try:
        y = runtime.matmul(x, packed, isa=isa)
    finally:
        torch.set_flush_denormal(False)
    assert_within_bound(y, x, packed)
    assert float(y.abs().max()) > 4 * tiny  # not all lost (|y| ~ tiny * sqrt(224) per row)


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_narrowing_matches_torch_on_every_bit_class(isa, dtype):
    """The decode's last step, float32 -> float16 / bfloat16 (round to nearest even), on
    random bit patterns (every exponent: zeros, denormals, ties, overflow, inf, NaN) and
    a length that leaves a scalar tail: equal to torch's ``.to()`` bit for bit, NaN for NaN."""
    if isa not in _isas():
        pytest.skip(f"this CPU does not run the {isa} path")
    gen = torch.Generator().manual_seed(7)
    bits = torch.randint(-(2**31), 2**31, (4099,), generator=gen, dtype=torch.int64).to(torch.int32)
    bits[:64] = bits[:64] & ~0xFFFF | 0x8000  # halfway between two bfloat16 values: ties to even
    bits[64:80] = torch.tensor([0, -(2**31), 0x7F800000, -0x800000, 0x7FC00000, 0x7F800001, 1, 0x477FF000,
                                0x477FEFFF, 0x33000000, 0x33000001, 0x387FE000, 0x7F7FFFFF, 0x00800000,
                                0x3F808000, 0x3F818000], dtype=torch.int64).to(torch.int32)
    values = bits.view(torch.float32)
    out = torch.empty(values.numel(), dtype=dtype)
    lib = runtime._load()
    kind = 1 if dtype == torch.float16 else 2
    assert lib.umq_narrow(runtime._ISA_CODES[isa], values.data_ptr(), out.data_ptr(), values.numel(), kind) == 0
    expected = values.to(dtype)
    nan = torch.isnan(values)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_wide_rows_row_chunks_and_tiles(isa, monkeypatch):
    """Wide rows (4160 columns, 65 block scales), M in 4-row chunks with a remainder, and a
    prefill of several tiles."""
    if isa not in _isas():
        pytest.skip(f"this CPU does not run the {isa} path")
    packed = packed_weight(70, 4096 + 64, seed=3, k=1, lo="int8", block=64)
    monkeypatch.setattr(runtime, "TILE_BYTES", 16 * 4 * (4096 + 64))  # 16-row tiles: 5 of them
    for m in (1, 4, 7, 80):
        x = torch.randn(m, 4096 + 64)
        assert_within_bound(runtime.matmul(x, packed, isa=isa), x, packed)


@pytest.mark.parametrize("bf16_gemm", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_umqlinear_activation_dtypes(dtype, bf16_gemm, monkeypatch):
    monkeypatch.setenv("UMQ_RUNTIME_BF16_GEMM", bf16_gemm)
    packed = packed_weight(33, 96, seed=5, k=2, lo="fp8_e4m3")
    bias = torch.randn(33)
    fused = UMQLinear.from_packed(packed, bias)
    reference = UMQLinear.from_packed(packed, bias, backend="torch")
    for shape in ((96,), (3, 96), (2, 17, 96)):
        x = torch.randn(shape).to(dtype)
        y = fused(x)
        assert y.dtype == dtype and y.shape == (*shape[:-1], 33)
        if dtype == torch.float32:
            assert_within_bound(y.reshape(-1, 33) - bias, x.reshape(-1, 96), packed)
        elif runtime.last_path().endswith("-bf16"):  # weights rounded to bfloat16 first
            assert dtype == torch.bfloat16 and bf16_gemm == "1" and x.numel() > 16 * 96
            err = (y.reshape(-1, 33).double() - (x.reshape(-1, 96).double() @ dequantize(packed).double().T + bias))
            assert bool((err.abs() <= bf16_linear_error_bound(x.reshape(-1, 96), packed, bias)).all())
        else:  # both round the same float32 result once to 16 bits: at most one ulp apart
            torch.testing.assert_close(y, reference(x), rtol=2 ** -7 if dtype == torch.bfloat16 else 2**-10, atol=1e-6)


def test_layer_keeps_format_v1_and_no_dense_copy():
    packed = packed_weight(16, 64, k=1)
    layer = UMQLinear.from_packed(packed)
    before = weight_memory(layer)
    layer(torch.randn(1, 64))
    layer(torch.randn(20, 64))
    assert weight_memory(layer) == before and before.decode_cache == 0
    state = layer.state_dict()
    assert set(state) == {"weight.umq_data", "weight.umq_mask", "weight.umq_scale"}
    assert state["weight.umq_data"].data_ptr() == packed.data.data_ptr()


def test_popcount_violation_is_refused_and_reads_stay_in_bounds():
    packed = packed_weight(9, 64, k=1)
    mask = packed.mask.clone()
    mask[-1, -1] = 0xFF  # 8 hi bits in a 9-byte group, at the very end of the buffer
    bad = PackedTensor(data=packed.data, mask=mask, scale=packed.scale, spec=packed.spec)
    for isa in _isas():
        with pytest.raises(UMQError) as info:
            runtime.decode(bad, isa=isa)
        assert info.value.rule == "popcount"
        runtime.matmul(torch.randn(1, 64), bad, isa=isa)  # garbage values, but no crash


def test_forced_paths_and_errors(monkeypatch):
    monkeypatch.setenv("UMQ_RUNTIME_ISA", "scalar")
    layer = UMQLinear.from_packed(packed_weight(8, 32, k=1))
    layer(torch.randn(2, 32))
    assert runtime.last_path() == "scalar-gemv"
    monkeypatch.setenv("UMQ_RUNTIME_ISA", "avx512")
    with pytest.raises(UMQError) as info:
        runtime.select_isa()
    assert info.value.rule == "runtime" and "avx512" in str(info.value)
    monkeypatch.delenv("UMQ_RUNTIME_ISA")
    monkeypatch.setenv("UMQ_RUNTIME", "0")
    assert get_backend("auto").name == "torch"
    assert layer._backend_for(torch.device("cpu")).name == "torch"


def test_codec_dequantize_uses_the_runtime_bit_exactly():
    packed = packed_weight(300, 256, seed=9, dtype=torch.bfloat16, k=3, lo="fp8_e5m2", block=32)
    for dtype in (None, torch.float32, torch.float16):
        fast = dequantize(packed, dtype)
        assert runtime.last_path().endswith("-decode")
        reference = dequantize(packed, dtype, fused=False)
        assert fast.dtype == reference.dtype and torch.equal(fast, reference)


def test_real_minilm_weights():
    """Every linear weight of the real all-MiniLM-L6-v2, packed at the CLI's defaults and
    at k=1 int8: fused GEMV and prefill against the reference."""
    tensors = load_file(str(minilm_dir() / "model.safetensors"))
    names = [n for n, t in tensors.items() if t.dim() == 2 and "embeddings" not in n]
    assert len(names) == 37
    gen = torch.Generator().manual_seed(0)
    for i, name in enumerate(names[::10]):  # attention, intermediate, output, pooler kinds
        params = QuantParams(k=1, lo="int8") if i % 2 else QuantParams()
        packed = quantize(tensors[name], params, name=name, fused=False)
        for m in (1, 3, 33):
            x = torch.randn(m, packed.spec.columns, generator=gen)
            assert_within_bound(runtime.matmul(x, packed), x, packed)


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    """Where the library cannot be built: one RuntimeWarning, the torch path, same values."""
    code = (
        "import warnings, torch\n"
        "from umqcli import runtime\n"
        "from umqcli.codec import quantize\n"
        "from umqcli.format import QuantParams\n"
        "from umqcli.nn import UMQLinear\n"
        "layer = UMQLinear.from_packed(quantize(torch.randn(8, 32), QuantParams(k=1)))\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    layer(torch.randn(2, 32)); layer(torch.randn(2, 32))\n"
        "assert not runtime.available() and runtime.last_path() is None\n"
        "assert layer._backend_for(torch.device('cpu')).name == 'torch'\n"
        "print(len(caught), caught[0].category.__name__, 'unavailable' in str(caught[0].message))\n"
    )
    env = {**__import__("os").environ, "CXX": "no-such-compiler-umq", "UMQ_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "RuntimeWarning", "True"]
    assert not any(tmp_path.rglob("*.so"))


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
@pytest.mark.parametrize("lo", LOS)
@pytest.mark.parametrize("k", [0, 1, 3, 8])
def test_layer_launch_reads_every_activation_dtype_and_fuses_the_bias(isa, lo, k, monkeypatch):
    """runtime.LinearLaunch: 16-bit activations read in place, bias added and the output
    rounded in the kernel. Its float32 sum is the GEMV's (same kernel, same order), so the
    result is bit-exact with matmul(x as float32) + bias, rounded once to x's dtype (the
    float32 prefill path too; the bfloat16 one has its own test)."""
    if isa not in _isas():
        pytest.skip(f"this CPU does not run the {isa} path")
    monkeypatch.setenv("UMQ_RUNTIME_BF16_GEMM", "0")
    packed = packed_weight(37, 200, seed=k + 11, lo=lo, hi="bfloat16" if k % 2 else "float16", k=k,
                           block=40 if k == 3 else 0)
    gen = torch.Generator().manual_seed(k)
    for bias_dtype in (None, torch.float32, torch.float16, torch.bfloat16):
        bias = None if bias_dtype is None else (torch.randn(37, generator=gen) * 3).to(bias_dtype)
        launch = runtime.LinearLaunch(packed, bias, isa=isa)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            # M = 1, 3, 16 (the largest GEMV), then 17: the tiled path, same contract
            for shape in ((1, 200), (3, 200), (2, 8, 200), (17, 200)):
                x = torch.randn(shape, generator=gen).to(dtype)
                y = launch(x)
                assert runtime.last_path() == f"{isa}-{'gemv' if x.numel() <= 16 * 200 else 'tiled'}"
                expected = runtime.matmul(x.reshape(-1, 200).float(), packed, isa=isa)
                if bias is not None:
                    expected = expected + bias.float()
                expected = expected.to(dtype).reshape(*shape[:-1], 37)
                assert y.dtype == dtype and torch.equal(y, expected), (bias_dtype, dtype, shape)


@pytest.mark.parametrize("lo", LOS)
@pytest.mark.parametrize("k", [0, 1, 8])
@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16, torch.float32])
def test_bf16_prefill_path(lo, k, bias_dtype, monkeypatch):
    """bfloat16 activations above GEMV_MAX_ROWS, bfloat16 GEMM forced on (the default where
    it is native): the layer is F.linear(x, dequantize(packed).to(bfloat16), bias in
    bfloat16), bit for bit. torch's bfloat16 GEMM sums each output over C in an order that
    does not depend on how many output columns one call computes, so tiles change nothing:
    here for oneDNN (this CPU's bfloat16 units where it has them) and for torch's own GEMM
    (mkldnn off: what a CPU without AVX-512 runs; found the same with oneDNN limited to
    AVX512_CORE or AVX2, ONEDNN_MAX_CPU_ISA).
    Also within bf16_linear_error_bound of the exact product: with the weights rounded to
    bfloat16 (the GEMM alone: float32 summation plus the output's rounding) and without
    (the path's whole error). 37 rows in 16-row tiles: a partial last tile."""
    monkeypatch.setenv("UMQ_RUNTIME_BF16_GEMM", "1")
    monkeypatch.setattr(runtime, "TILE_BYTES", 16 * 4 * 200)
    packed = packed_weight(37, 200, seed=k + 21, lo=lo, hi="bfloat16" if k == 1 else "float16", k=k,
                           block=40 if k == 8 else 0)
    gen = torch.Generator().manual_seed(k)
    bias = None if bias_dtype is None else (torch.randn(37, generator=gen) * 3).to(bias_dtype)
    layer = UMQLinear.from_packed(packed, bias)
    weight_bf16 = dequantize(packed, torch.float32, fused=False).to(torch.bfloat16)
    bias_bf16 = None if bias is None else bias.to(torch.bfloat16)
    for isa in _isas():
        for shape in ((runtime.GEMV_MAX_ROWS + 1, 200), (512, 200), (2, 9, 200)):
            x = torch.randn(shape, generator=gen).to(torch.bfloat16)
            y = runtime.LinearLaunch(packed, bias, isa=isa)(x)
            assert runtime.last_path() == f"{isa}-tiled-bf16"
            assert y.dtype == torch.bfloat16 and y.shape == (*shape[:-1], 37) and y.is_contiguous()
            assert torch.equal(y, F.linear(x, weight_bf16, bias_bf16)), (isa, shape)
            mkldnn, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False  # (flags() warns)
            try:
                assert torch.equal(runtime.LinearLaunch(packed, bias, isa=isa)(x), F.linear(x, weight_bf16, bias_bf16))
            finally:
                torch.backends.mkldnn.enabled = mkldnn
            rows, y2 = x.reshape(-1, 200), y.reshape(-1, 37).double()
            exact = rows.double() @ dequantize(packed).double().T + (0 if bias is None else bias.double())
            exact_rounded = rows.double() @ weight_bf16.double().T + (0 if bias is None else bias_bf16.double())
            assert bool(((y2 - exact_rounded).abs() <= bf16_linear_error_bound(rows, packed, bias,
                                                                               weight_rounded=True)).all())
            assert bool(((y2 - exact).abs() <= bf16_linear_error_bound(rows, packed, bias)).all())
    assert torch.equal(layer(x), y)  # UMQLinear takes the same path by default here


def test_prefill_dtype_follows_the_activations(monkeypatch):
    """bfloat16 tiles only for bfloat16 activations on a native bfloat16 GEMM; float16 and
    float32 activations always get float32 tiles (float16 has no native GEMM here)."""
    monkeypatch.delenv("UMQ_RUNTIME_BF16_GEMM", raising=False)
    if Path("/proc/cpuinfo").exists():
        flags = next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "")
        assert runtime.bf16_gemm_is_native() == bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))
    for forced, expected in (("1", torch.bfloat16), ("0", torch.float32)):
        monkeypatch.setenv("UMQ_RUNTIME_BF16_GEMM", forced)
        assert runtime.prefill_dtype(torch.bfloat16) == expected
        assert runtime.prefill_dtype(torch.float16) == runtime.prefill_dtype(torch.float32) == torch.float32
    packed = packed_weight(24, 64, k=1)
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    y = runtime.LinearLaunch(packed, None)(x)  # forced off: float32 tiles, one rounding at the end
    assert runtime.last_path().endswith("-tiled") and torch.equal(y, runtime.matmul(x, packed).to(torch.bfloat16))


def test_launch_state_is_rebuilt_when_the_weight_or_bias_changes():
    """A UMQLinear keeps one launch state; replacing or modifying a buffer or the bias,
    loading a state dict or moving the layer never lets the old state run."""
    first, second = packed_weight(24, 64, seed=1, k=1), packed_weight(24, 64, seed=2, k=1)
    own = PackedTensor(data=first.data.clone(), mask=first.mask.clone(), scale=first.scale.clone(), spec=first.spec)
    layer = UMQLinear.from_packed(own, torch.zeros(24))
    x = torch.randn(2, 64)
    y_first = layer(x)
    launch = layer._launch
    assert launch is not None and layer(x) is not None and layer._launch is launch  # reused while current
    expected_second = runtime.matmul(x, second)

    layer.weight.umq_data.copy_(second.data)  # in place: same pointer, new bytes and version
    layer.weight.umq_mask.copy_(second.mask)
    layer.weight.umq_scale.copy_(second.scale)
    assert torch.equal(layer(x), expected_second) and layer._launch is not launch

    layer.load_state_dict({"weight.umq_data": first.data, "weight.umq_mask": first.mask,
                           "weight.umq_scale": first.scale, "bias": torch.ones(24)})
    assert torch.equal(layer(x), y_first + 1)

    other_k = packed_weight(24, 64, seed=3, k=3)
    layer.weight.load_packed(other_k)  # new tensors and spec
    assert torch.equal(layer(x), runtime.matmul(x, other_k) + 1)

    launch = layer._launch
    layer.to(torch.bfloat16)  # the bias becomes bfloat16: a new state reads it
    y = layer(x.bfloat16())
    assert layer._launch is not launch and layer._launch.bias.dtype == torch.bfloat16
    assert torch.equal(y, (runtime.matmul(x.bfloat16().float(), other_k) + 1).bfloat16())

    for bad_input in (torch.randn(3, 32), torch.randn(2, 64).double()[:, :32], torch.ones(1, 64, dtype=torch.int32)):
        with pytest.raises(UMQError):
            layer._launch(bad_input)  # the launch's own check: a wrong width is never read

    layer.weight.umq_data = torch.zeros(24, 5, dtype=torch.uint8)  # a wrong buffer is checked, not read
    with pytest.raises(UMQError) as info:
        layer(x)
    assert info.value.rule == "stored-shape"


def test_layer_backend_setting_is_followed_after_the_first_call():
    packed = packed_weight(16, 64, k=1)
    layer = UMQLinear.from_packed(packed)
    x = torch.randn(1, 64)
    layer(x)
    assert layer._launch is not None and runtime.last_path().endswith("-gemv")
    layer.backend = "torch"
    layer(x)
    assert layer._launch is None and runtime.last_path() is not None
    reference = UMQLinear.from_packed(packed, backend="torch")
    assert torch.equal(layer(x), reference(x))
