"""Compute backends: decode a packed tensor and multiply by it.

One seam, several implementations with the same signatures:

- ``torch`` (:mod:`umqcli.backends.torch`): the reference twin, ``codec.dequantize``
  followed by a float32 matmul; runs anywhere torch runs.
- ``cuda`` (:mod:`umqcli.backends.cuda`): CuPy ``RawModule`` kernels compiled from the
  repository's ``kernels/*.cu``; a decode kernel and fused matmuls (a GEMV for M <= 16,
  64 x 64 tiles beyond) that read the packed bytes directly. Needs CuPy and a CUDA device.
- ``split`` (:mod:`umqcli.backends.split`): the seed's split matmul on stock torch GEMMs,
  an FP8/int8 GEMM on the lo codes plus a 16-bit GEMM on the hi values; it rounds the
  activations, so its matmul bound is looser (``umqcli.testing.bounds.split_error_bound``).
- ``cpu`` (:mod:`umqcli.backends.cpu`): the fused CPU decode-matmul of
  :mod:`umqcli.runtime` (C++ compiled on first use); needs a C++ compiler.

Every backend has ``.name`` and

- ``decode(packed, dtype=None) -> Tensor``: dense ``[R, C]`` in ``dtype`` (default: the
  source dtype recorded in the spec), bit-exact with :func:`umqcli.codec.dequantize`.
- ``matmul(x, packed) -> Tensor``: ``x`` float32/float16/bfloat16 ``[..., C]`` ->
  float32 ``[..., R]``, i.e. ``Y = X · Ŵᵀ`` with float32 accumulation.

``get_backend("auto")`` picks CUDA when CuPy and a device are present, else the fused
CPU backend when its library builds, else torch; ``get_backend("cuda")`` without them raises :class:`UMQError` (the CLI exits 2). Backends
never decide policy: they compute what they are asked, after checking shapes and dtypes.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

# Aliased: importing the ``torch`` submodule below rebinds the package attribute ``torch``.
import torch as _torch

from ..codec import PackedTensor
from ..errors import UMQError

BACKEND_NAMES = ("auto", "torch", "cuda", "split", "cpu")


@runtime_checkable
class Backend(Protocol):
    """What every backend offers (see the module docstring for shapes and dtypes)."""

    name: str

    def decode(self, packed: PackedTensor, dtype: _torch.dtype | None = None) -> _torch.Tensor: ...

    def matmul(self, x: _torch.Tensor, packed: PackedTensor) -> _torch.Tensor: ...


def check_matmul_input(x: _torch.Tensor, packed: PackedTensor) -> None:
    """Shared argument check of ``matmul``: a float tensor whose last dim is ``C``."""
    if not isinstance(x, _torch.Tensor) or not x.is_floating_point():
        raise UMQError(
            f"matmul input must be a floating-point tensor, got "
            f"{getattr(x, 'dtype', type(x).__name__)}",
            rule="matmul-input",
        )
    if x.dim() < 1 or x.shape[-1] != packed.spec.columns:
        raise UMQError(
            f"matmul input has shape {tuple(x.shape)}, its last dimension must equal the "
            f"weight's column count {packed.spec.columns} (weight shape {list(packed.spec.shape)})",
            rule="matmul-shape",
        )


def cuda_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    from . import cuda

    return cuda.is_available()


def cpu_available() -> bool:
    """True when the fused CPU runtime is enabled and its library builds and loads."""
    from .. import runtime

    return runtime.available()


def get_backend(name: str = "auto") -> Backend:
    """The backend called ``name``: ``"auto"`` (CUDA if available, else the fused CPU
    backend if it builds, else torch), ``"torch"``, ``"cuda"``, ``"split"`` or ``"cpu"``.
    Raises :class:`UMQError` (rule ``backend``) for an unknown name, for ``"cuda"`` where
    CuPy or a device is missing, and (rule ``runtime``) for ``"cpu"`` where the runtime is
    off or does not build."""
    name = str(getattr(name, "value", name)).lower()
    if name not in BACKEND_NAMES:
        raise UMQError(
            f"unknown backend {name!r} (one of: {', '.join(BACKEND_NAMES)})", rule="backend"
        )
    if name == "torch":
        from .torch import TorchBackend

        return TorchBackend()
    if name == "split":
        from .split import SplitBackend

        return SplitBackend()
    if name == "cpu":
        from .cpu import CpuBackend

        return CpuBackend()
    from . import cuda

    if cuda.is_available():
        return cuda.CudaBackend()
    if name == "cuda":
        raise UMQError(
            f"backend 'cuda' needs CuPy and a CUDA device: {cuda.unavailable_reason()}",
            rule="backend", hint="use backend torch or auto",
        )
    if cpu_available():
        from .cpu import CpuBackend

        return CpuBackend()
    from .torch import TorchBackend

    return TorchBackend()


__all__ = ["Backend", "BACKEND_NAMES", "check_matmul_input", "cpu_available", "cuda_available", "get_backend"]
