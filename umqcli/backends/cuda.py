"""CUDA backend: CuPy RawModule kernels from ``kernels/*.cu`` (filled in below)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _probe() -> str | None:
    """None when CuPy and a device are usable, else the reason why not."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install
        return f"CuPy is not importable ({exc.__class__.__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no usable CUDA device ({exc})"
    return None if count > 0 else "no CUDA device found"


def is_available() -> bool:
    return _probe() is None


def unavailable_reason() -> str:
    return _probe() or ""


class CudaBackend:  # completed with the kernels
    name = "cuda"
