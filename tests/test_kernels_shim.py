"""The CUDA kernels, executed on the CPU: the unmodified ``kernels/*.cu`` compiled by g++
through ``kernels/host_shim.h`` and launched by the real ``CudaBackend`` launchers.

- decode: bit-exact with ``codec.dequantize`` (bit patterns compared, so -0.0 != +0.0)
  for every k, every lo and hi encoding, float32/float16/bfloat16 sources and outputs,
  one-scale-per-row / 8 / 32 blocks, the conformance vectors, and exhaustive code tables;
- matmul: within the float32 dot-product error bound of ``kernel_helpers.dot_error_bound``
  of the float64 product, on shapes that straddle the 64 x 64 x 32 tiles.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors import safe_open

from kernel_helpers import bit_pattern, shim_build_dir
from umqcli.testing.bounds import dot_error_bound
from umqcli.backends import cuda as cuda_backend
from umqcli.backends.cuda import CudaBackend
from umqcli.testing.host_shim import HostShimRunner
from umqcli.backends.torch import TorchBackend
from umqcli.codec import PackedTensor, crc32, dequantize, quantize
from umqcli.errors import UMQError
from umqcli.format import GROUP, DATA_SUFFIX, MASK_SUFFIX, SCALE_SUFFIX, HiFormat, LoFormat, QuantParams, TensorSpec, decode_metadata

SOURCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="session")
def shim_runner(tmp_path_factory) -> HostShimRunner:
    """The g++-compiled kernels, built once per test session."""
    return HostShimRunner.build(shim_build_dir(tmp_path_factory))


@pytest.fixture(scope="session")
def shim(shim_runner) -> CudaBackend:
    return CudaBackend(runner=shim_runner)


def weight(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Gaussian weights with a few large outliers (the case UMQ exists for)."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=generator)
    spikes = torch.rand(rows, cols, generator=generator) < 0.02
    w = torch.where(spikes, w * 40, w)
    return w.to(dtype)


def assert_bit_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    mismatch = bit_pattern(actual) != bit_pattern(expected)
    if bool(mismatch.any()):
        r, c = mismatch.nonzero()[0].tolist()
        raise AssertionError(
            f"{int(mismatch.sum())} values differ; first at [{r}, {c}]: "
            f"{actual[r, c].item()!r} vs {expected[r, c].item()!r}"
        )


# --------------------------------------------------------------------------- the shim itself


def test_syncthreads_is_a_real_barrier(shim_runner):
    threads, blocks, rounds = 96, 3, 5
    out = torch.zeros(blocks * threads, dtype=torch.int32)
    shim_runner.launch("shim_selftest.cu", "umq_selftest_barrier", (blocks, 1, 1), (threads, 1, 1), (out, rounds))
    t = torch.arange(threads)
    expected = torch.stack(
        [sum(((t + r) % threads) * r + b for r in range(1, rounds + 1)) for b in range(blocks)]
    ).reshape(-1)
    assert torch.equal(out, expected.to(torch.int32))


def test_barrier_divergence_is_an_error(shim_runner):
    out = torch.zeros(32, dtype=torch.int32)
    with pytest.raises(UMQError, match="disagree on __syncthreads"):
        shim_runner.launch("shim_selftest.cu", "umq_selftest_divergent", (1, 1, 1), (32, 1, 1), (out,))


# --------------------------------------------------------------------------- decode


@pytest.mark.parametrize("source_dtype", SOURCE_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("block", [0, 8, 32], ids=["row", "b8", "b32"])
def test_decode_bit_exact_every_k_and_lo(shim, source_dtype, block):
    for k, lo in itertools.product(range(GROUP + 1), LoFormat):
        w = weight(19, 64, source_dtype, seed=k * 7 + len(lo.value))
        packed = quantize(w, QuantParams(k=k, lo=lo, block=block))
        assert_bit_exact(shim.decode(packed), dequantize(packed))
        assert_bit_exact(shim.decode(packed, torch.float32), dequantize(packed, torch.float32))


@pytest.mark.parametrize("hi", list(HiFormat))
def test_decode_cross_dtype_outputs(shim, hi):
    """hi in one 16-bit format, output in the other: exercises the float -> half and
    float -> bfloat16 round-to-nearest-even of umq_common.cuh, and float64 output."""
    w = weight(13, 128, torch.float32, seed=3) * 1e-3  # lo products land in fp16 subnormals
    packed = quantize(w, QuantParams(k=3, lo="fp8_e4m3", hi=hi, block=16))
    for out in (torch.float16, torch.bfloat16, torch.float64):
        assert_bit_exact(shim.decode(packed, out), dequantize(packed, out))


def _packed_from_codes(codes: torch.Tensor, k: int, lo: LoFormat, hi: HiFormat, dtype: str, scale: float) -> PackedTensor:
    """A packed tensor whose payload is ``codes`` verbatim: k = 0 (one byte per element)
    or k = 8 (little-endian 16-bit patterns), one scale per row."""
    rows = codes.shape[0]
    if k == 0:
        data = codes.to(torch.uint8)
        mask = torch.zeros(rows, data.shape[1] // GROUP, dtype=torch.uint8)
        cols = data.shape[1]
    else:
        patterns = codes.to(torch.int32)
        data = torch.stack([patterns & 0xFF, (patterns >> 8) & 0xFF], dim=-1).reshape(rows, -1).to(torch.uint8)
        cols = codes.shape[1]
        mask = torch.full((rows, cols // GROUP), 0xFF, dtype=torch.uint8)
    scales = torch.full((rows, 1), scale, dtype=torch.float32)
    spec = TensorSpec(
        shape=(rows, cols), dtype=dtype, k=k, lo=lo, hi=hi, block=cols, selection="magnitude",
        crc32={"data": crc32(data), "mask": crc32(mask), "scale": crc32(scales)},
    )
    packed = PackedTensor.from_stored(spec, data, mask, scales)
    packed.validate()
    return packed


@pytest.mark.parametrize("lo", list(LoFormat))
@pytest.mark.parametrize("scale", [1.0, 3.0517578125e-05, 0.3])
def test_decode_every_lo_code(shim, lo, scale):
    """All 256 byte values (bar the NaN / -128 codes FORMAT never writes), unscaled and
    scaled into the float16 subnormal range, decoded to every output dtype."""
    codes = torch.arange(256)
    invalid = {LoFormat.FP8_E4M3: (0x7F, 0xFF), LoFormat.FP8_E5M2: tuple(range(0x7C, 0x80)) + tuple(range(0xFC, 0x100)),
               LoFormat.INT8: (0x80,)}[lo]
    codes = codes[~torch.isin(codes, torch.tensor(invalid))]
    codes = torch.cat([codes, codes[: (-len(codes)) % GROUP]]).reshape(1, -1)
    for dtype in ("float32", "float16", "bfloat16"):
        packed = _packed_from_codes(codes, 0, lo, HiFormat.FLOAT16, dtype, scale)
        assert_bit_exact(shim.decode(packed), dequantize(packed))


@pytest.mark.parametrize("hi", list(HiFormat))
def test_decode_every_finite_hi_pattern(shim, hi):
    """Every finite 16-bit pattern of the hi format (65536 minus inf/NaN) decoded to
    float32, float16 and bfloat16: overflow to inf, subnormals and ties included."""
    patterns = torch.arange(65536, dtype=torch.int32)
    finite = torch.isfinite(patterns.to(torch.int16).view(hi.torch_dtype))
    patterns = patterns[finite]
    patterns = torch.cat([patterns, patterns[: (-len(patterns)) % GROUP]]).reshape(8, -1)
    for dtype in ("float32", "float16", "bfloat16"):
        packed = _packed_from_codes(patterns, 8, LoFormat.FP8_E4M3, hi, dtype, 0.0)
        assert_bit_exact(shim.decode(packed), dequantize(packed))


def test_decode_conformance_vectors(shim, vectors_dir):
    """The independent conformance files decode through the kernel exactly as the codec
    decodes them."""
    decoded = 0
    for path in sorted(vectors_dir.glob("k*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            specs = decode_metadata(handle.metadata(), file=str(path))
            for name, spec in specs.items():
                packed = PackedTensor.from_stored(
                    spec, *(handle.get_tensor(name + suffix) for suffix in (DATA_SUFFIX, MASK_SUFFIX, SCALE_SUFFIX))
                )
                packed.validate(name=name)
                assert_bit_exact(shim.decode(packed), dequantize(packed))
                decoded += 1
    assert decoded >= 6


# --------------------------------------------------------------------------- matmul


def assert_matmul_close(y: torch.Tensor, x: torch.Tensor, packed: PackedTensor) -> None:
    reference = x.double() @ dequantize(packed, torch.float32).double().T
    bound = dot_error_bound(x, packed)
    assert y.dtype == torch.float32 and y.shape == reference.shape
    excess = (y.double() - reference).abs() - bound
    assert float(excess.max()) <= 0.0, f"max error beyond the float32 bound by {float(excess.max())}"


@pytest.mark.parametrize("m", [1, 2, 3, 17, 64, 65])
def test_matmul_tile_edges_in_m(shim, m):
    w = weight(70, 40, torch.float32, seed=m)  # R = 70: one full and one ragged N tile; C = 40: 1.25 K tiles
    packed = quantize(w, QuantParams(k=2, lo="fp8_e4m3", block=8))
    x = torch.randn(m, 40, generator=torch.Generator().manual_seed(m))
    assert_matmul_close(shim.matmul(x, packed), x, packed)


@pytest.mark.parametrize(
    ("rows", "cols"), [(1, 8), (63, 264), (64, 32), (65, 96), (130, 24)]
)
def test_matmul_tile_edges_in_n_and_k(shim, rows, cols):
    w = weight(rows, cols, torch.float16, seed=rows + cols)
    packed = quantize(w, QuantParams(k=1, lo="fp8_e5m2", block=8))
    x = torch.randn(17, cols, generator=torch.Generator().manual_seed(cols))
    assert_matmul_close(shim.matmul(x, packed), x, packed)


@pytest.mark.parametrize("source_dtype", SOURCE_DTYPES, ids=lambda d: str(d)[6:])
def test_matmul_every_k_lo_and_block(shim, source_dtype):
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1)).to(source_dtype)
    for k, lo, block in itertools.product(range(GROUP + 1), LoFormat, (0, 8, 32)):
        packed = quantize(weight(33, 96, source_dtype, seed=k), QuantParams(k=k, lo=lo, block=block))
        y = shim.matmul(x, packed)
        assert_matmul_close(y, x.float(), packed)
        # The torch twin obeys the same bound, so the two differ by at most twice it.
        twin = TorchBackend().matmul(x, packed)
        assert float(((y - twin).abs().double() - 2 * dot_error_bound(x.float(), packed)).max()) <= 0.0


def test_matmul_64x256x128(shim):
    """The issue's reference size: 4 blocks of 256 fiber-threads, 4 K steps each (its
    timing is in benchmarks/kernels_shim.py, not here)."""
    packed = quantize(weight(256, 128, torch.float32, seed=9), QuantParams(k=4, lo="int8", block=32))
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    assert_matmul_close(shim.matmul(x, packed), x, packed)


def test_matmul_leading_dims_and_empty_input(shim):
    packed = quantize(weight(24, 16, torch.float32, seed=0), QuantParams(k=1))
    x = torch.randn(2, 3, 16)
    y = shim.matmul(x, packed)
    assert y.shape == (2, 3, 24)
    assert_matmul_close(y.reshape(6, 24), x.reshape(6, 16), packed)
    empty = shim.matmul(torch.zeros(0, 16), packed)
    assert empty.shape == (0, 24) and empty.dtype == torch.float32


# --------------------------------------------------------------------------- launchers


def test_launcher_rejects_bad_inputs(shim):
    packed = quantize(weight(16, 32, torch.float32, seed=0), QuantParams(k=2))
    with pytest.raises(UMQError) as info:
        shim.matmul(torch.randn(3, 24), packed)
    assert info.value.rule == "matmul-shape" and "24" in str(info.value) and "32" in str(info.value)
    with pytest.raises(UMQError) as info:
        shim.matmul(torch.arange(32).reshape(1, 32), packed)
    assert info.value.rule == "matmul-input"
    wrong_dtype = PackedTensor.from_stored(packed.spec, packed.data.to(torch.int16), packed.mask, packed.scale)
    with pytest.raises(UMQError) as info:
        shim.decode(wrong_dtype)
    assert info.value.rule == "stored-dtype"
    truncated = PackedTensor.from_stored(packed.spec, packed.data[:, :-1], packed.mask, packed.scale)
    with pytest.raises(UMQError) as info:
        shim.matmul(torch.randn(1, 32), truncated)
    assert info.value.rule == "stored-shape" and str(tuple(packed.data.shape)) in str(info.value)
    strided = torch.zeros(16, 2 * packed.mask.shape[1], dtype=torch.uint8)[:, ::2]
    strided.copy_(packed.mask)
    with pytest.raises(UMQError) as info:
        shim.decode(PackedTensor.from_stored(packed.spec, packed.data, strided, packed.scale))
    assert info.value.rule == "kernel-layout"


def test_sizes_beyond_int32_fall_back_to_torch(shim, monkeypatch):
    packed = quantize(weight(16, 32, torch.float32, seed=0), QuantParams(k=2))
    x = torch.randn(4, 32)
    monkeypatch.setattr(cuda_backend, "INT32_MAX", 20)  # pretend C = 32 overflows an int32 argument
    before = shim.fallbacks
    assert torch.equal(shim.matmul(x, packed), TorchBackend().matmul(x, packed))
    assert_bit_exact(shim.decode(packed), dequantize(packed))
    assert shim.fallbacks == before + 2


def test_decode_grid_stride_loop_covers_every_group(shim, monkeypatch):
    """With the grid capped at 2 blocks, each thread decodes several groups."""
    monkeypatch.setattr(cuda_backend, "DECODE_MAX_BLOCKS", 2)
    packed = quantize(weight(50, 136, torch.bfloat16, seed=4), QuantParams(k=5, lo="fp8_e5m2", block=8))
    assert 50 * 17 > 2 * cuda_backend.DECODE_THREADS  # more groups than threads
    assert_bit_exact(shim.decode(packed), dequantize(packed))


def test_matmul_m_sliced_across_launches(shim, monkeypatch):
    """M beyond gridDim.y's limit is launched in slices (the limit shrunk to 1 tile)."""
    monkeypatch.setattr(cuda_backend, "MAX_GRID_Y", 1)
    packed = quantize(weight(40, 48, torch.float32, seed=6), QuantParams(k=2, lo="int8"))
    x = torch.randn(150, 48, generator=torch.Generator().manual_seed(6))  # 3 slices: 64, 64, 22
    assert_matmul_close(shim.matmul(x, packed), x, packed)


# --------------------------------------------------------------------------- small-M GEMV


class RecordingRunner:
    """The shim runner, remembering which kernels ran with which arguments."""

    def __init__(self, runner):
        self.runner = runner
        self.device = runner.device
        self.launches = []

    def launch(self, source, kernel, grid, block, args):
        self.launches.append((kernel, grid, args))
        self.runner.launch(source, kernel, grid, block, args)


@pytest.mark.parametrize("x_dtype", SOURCE_DTYPES, ids=lambda d: str(d)[6:])
def test_gemv_every_lo_k_and_block(shim_runner, x_dtype):
    """Every lo format, k in {0, 1, 3, 8}, per-row / 8 / 32 scales, x in its own dtype:
    576 columns = 72 groups, one full 64-group chunk and an 8-group tail; 9 rows = one
    full block of 8 warps and one with a single live warp."""
    recorder = RecordingRunner(shim_runner)
    backend = CudaBackend(runner=recorder)
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(3)).to(x_dtype)
    for index, (k, lo) in enumerate(itertools.product((0, 1, 3, 8), LoFormat)):
        block = (0, 8, 32)[index % 3]  # each k meets every lo and every block size
        packed = quantize(weight(9, 576, torch.bfloat16, seed=k + 11), QuantParams(k=k, lo=lo, block=block))
        y = backend.matmul(x, packed)
        assert_matmul_close(y, x.float(), packed)
        twin = TorchBackend().matmul(x, packed)
        assert float(((y - twin).abs().double() - 2 * dot_error_bound(x.float(), packed)).max()) <= 0.0
    assert {kernel for kernel, _, _ in recorder.launches} == {cuda_backend.GEMV_KERNELS[x_dtype]}


@pytest.mark.parametrize("m", [1, 2, 3, 16, 17])
@pytest.mark.parametrize(("rows", "cols"), [(1, 8), (7, 40), (70, 520)])
def test_gemv_edges_and_kernel_choice(shim_runner, m, rows, cols):
    """M = 1..16 runs the GEMV kernel, M = 17 the tile kernel; R not a multiple of 8 rows
    per block, C not a multiple of the 512-column chunk (520 = one chunk + 1 group)."""
    recorder = RecordingRunner(shim_runner)
    backend = CudaBackend(runner=recorder)
    packed = quantize(weight(rows, cols, torch.float16, seed=rows * cols), QuantParams(k=3, lo="fp8_e5m2", block=8))
    x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    assert_matmul_close(backend.matmul(x, packed), x.float(), packed)
    (kernel, grid, _), = recorder.launches
    if m <= cuda_backend.GEMV_MAX_M:
        assert kernel == "umq_gemv_bf16" and grid == (-(-rows // 8), 1, 1)
    else:
        assert kernel == "umq_matmul_f32"


def test_gemv_realigns_unaligned_inputs(shim_runner):
    """The kernel's 16-byte vector loads need 16-byte aligned bases: views that start
    anywhere (x, or data read from a memory-mapped file) are copied to aligned memory."""
    recorder = RecordingRunner(shim_runner)
    backend = CudaBackend(runner=recorder)
    packed = quantize(weight(10, 48, torch.float32, seed=2), QuantParams(k=1, lo="int8", block=16))
    shifted = torch.empty(packed.data.numel() + 1, dtype=torch.uint8)[1:].view(packed.data.shape)
    shifted.copy_(packed.data)
    moved = PackedTensor.from_stored(packed.spec, shifted, packed.mask, packed.scale)
    x = torch.randn(2 * 48 + 1)[1:].view(2, 48)
    assert shifted.data_ptr() % 16 and x.data_ptr() % 16
    assert_matmul_close(backend.matmul(x, moved), x, packed)
    (_, _, args), = recorder.launches
    assert args[0].data_ptr() % 16 == 0 and args[1].data_ptr() % 16 == 0
