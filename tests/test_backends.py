"""The backend seam: ``get_backend`` selection, the torch reference backend, and the CUDA
backend on a real device (``@pytest.mark.gpu``: skipped where no device is present; the
same launchers and kernels run on the CPU in tests/test_kernels_shim.py)."""

from __future__ import annotations

import pytest
import torch

from kernel_helpers import bit_pattern
from umqcli.testing.bounds import dot_error_bound
from umqcli.backends import BACKEND_NAMES, Backend, cuda_available, get_backend
from umqcli.backends.torch import TorchBackend
from umqcli.codec import dequantize, quantize
from umqcli.errors import UMQError
from umqcli.format import LoFormat, QuantParams


def packed_weight(rows=48, cols=64, dtype=torch.float32, **params):
    generator = torch.Generator().manual_seed(rows * cols)
    w = (torch.randn(rows, cols, generator=generator) * 0.05).to(dtype)
    return w, quantize(w, QuantParams(**params))


def test_torch_backend_by_name():
    backend = get_backend("torch")
    assert isinstance(backend, TorchBackend) and isinstance(backend, Backend)
    assert backend.name == "torch"
    assert get_backend("TORCH").name == "torch"


@pytest.mark.skipif(cuda_available(), reason="a CUDA device is present: auto picks cuda")
def test_auto_without_device_is_the_cpu_runtime_and_cuda_is_an_error(monkeypatch):
    assert get_backend("auto").name == "cpu"  # the fused CPU runtime builds here (g++)
    monkeypatch.setenv("UMQ_RUNTIME", "0")
    assert get_backend("auto").name == "torch"
    with pytest.raises(UMQError) as info:
        get_backend("cuda")
    assert info.value.rule == "backend"
    assert info.value.hint == "use backend torch or auto"  # the CLI words it as --backend


def test_unknown_backend_name():
    with pytest.raises(UMQError) as info:
        get_backend("opencl")
    assert info.value.rule == "backend"
    assert all(name in str(info.value) for name in BACKEND_NAMES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_decode_is_codec_dequantize(dtype):
    _, packed = packed_weight(dtype=dtype, k=3, lo="fp8_e5m2", block=16)
    backend = get_backend("torch")
    assert torch.equal(bit_pattern(backend.decode(packed)), bit_pattern(dequantize(packed)))
    decoded32 = backend.decode(packed, torch.float32)
    assert decoded32.dtype == torch.float32
    assert torch.equal(bit_pattern(decoded32), bit_pattern(dequantize(packed, torch.float32)))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_matmul_contract(x_dtype):
    w, packed = packed_weight(k=2, lo="int8")
    x = torch.randn(2, 5, 64).to(x_dtype)
    y = get_backend("torch").matmul(x, packed)
    assert y.dtype == torch.float32 and y.shape == (2, 5, 48)
    flat = x.reshape(10, 64).float()
    reference = flat.double() @ dequantize(packed, torch.float32).double().T
    assert float(((y.reshape(10, 48).double() - reference).abs() - dot_error_bound(flat, packed)).max()) <= 0
    # and it is a quantized weight: close to, but not equal to, the dense product
    dense = flat @ w.T
    assert not torch.equal(y.reshape(10, 48), dense)
    assert float((y.reshape(10, 48) - dense).norm() / dense.norm()) < 0.02


def test_torch_matmul_rejects_wrong_width():
    _, packed = packed_weight()
    with pytest.raises(UMQError) as info:
        get_backend("torch").matmul(torch.randn(3, 63), packed)
    assert info.value.rule == "matmul-shape"
    assert "63" in str(info.value) and "64" in str(info.value)


# --------------------------------------------------------------------------- real GPU

gpu = pytest.mark.gpu


@pytest.fixture()
def cuda_backend():
    if not cuda_available():
        pytest.skip("no CUDA device / CuPy (the kernels run on the CPU shim in test_kernels_shim.py)")
    return get_backend("cuda")


@gpu
def test_auto_picks_cuda_with_device(cuda_backend):
    assert get_backend("auto").name == "cuda"


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lo", list(LoFormat))
def test_gpu_decode_bit_exact(cuda_backend, dtype, lo):
    for k in range(9):
        _, packed = packed_weight(129, 264, dtype, k=k, lo=lo, block=8)
        expected = dequantize(packed)
        actual = cuda_backend.decode(packed).cpu()
        assert torch.equal(bit_pattern(actual), bit_pattern(expected)), (k, lo)


@gpu
@pytest.mark.parametrize(("m", "rows", "cols"), [(1, 1, 8), (3, 70, 40), (17, 130, 264), (300, 512, 1024)])
def test_gpu_matmul_within_float32_bound(cuda_backend, m, rows, cols):
    _, packed = packed_weight(rows, cols, torch.float16, k=2, lo="fp8_e4m3", block=32)
    x = torch.randn(m, cols)
    y = cuda_backend.matmul(x.cuda(), packed).cpu()
    reference = x.double() @ dequantize(packed, torch.float32).double().T
    assert float(((y.double() - reference).abs() - dot_error_bound(x, packed)).max()) <= 0


@gpu
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("lo", list(LoFormat))
def test_gpu_gemv_within_float32_bound(cuda_backend, x_dtype, lo):
    """M = 1..16 runs the GEMV kernel (16-byte vector loads; R, C off its block sizes)."""
    for k, m in ((0, 1), (1, 2), (3, 16), (8, 5)):
        _, packed = packed_weight(1001, 520, torch.bfloat16, k=k, lo=lo, block=8)
        x = torch.randn(m, 520).to(x_dtype)
        y = cuda_backend.matmul(x.cuda(), packed).cpu()
        reference = x.double() @ dequantize(packed, torch.float32).double().T
        assert float(((y.double() - reference).abs() - dot_error_bound(x.float(), packed)).max()) <= 0, (k, m)


@gpu
@pytest.mark.parametrize("lo", list(LoFormat))
@pytest.mark.parametrize("m", [1, 16, 300])
def test_gpu_split_within_its_bound(lo, m):
    """The split backend on cuBLAS: FP8 (or int8) GEMM on the lo codes, 16-bit GEMM with
    float32 output on the hi values."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from umqcli.backends.split import SplitBackend
    from umqcli.testing.bounds import split_error_bound

    _, packed = packed_weight(200, 264, torch.float16, k=2, lo=lo, block=0)
    x = torch.randn(m, 264)
    y = SplitBackend().matmul(x.cuda(), packed).cpu()
    reference = x.double() @ dequantize(packed, torch.float32).double().T
    assert float(((y.double() - reference).abs() - split_error_bound(x, packed)).max()) <= 0


@pytest.mark.skipif(cuda_available(), reason="a CUDA device is present")
def test_cupy_runner_without_device_is_a_clear_error():
    from umqcli.backends.cuda import CupyRunner

    with pytest.raises(UMQError) as info:
        CupyRunner()
    assert info.value.rule == "backend" and "unavailable" in str(info.value)


def test_cupy_gets_16_bit_floats_as_int16_views():
    """CuPy before 14 has no bfloat16 dtype: the runner hands 16-bit float tensors (GEMV
    inputs, decode outputs) over as int16 views of the same memory."""
    from umqcli.backends.cuda import _cupy_viewable

    for dtype in (torch.bfloat16, torch.float16):
        tensor = torch.arange(4).to(dtype)
        view = _cupy_viewable(tensor)
        assert view.dtype == torch.int16 and view.data_ptr() == tensor.data_ptr()
    tensor = torch.zeros(3)
    assert _cupy_viewable(tensor) is tensor
