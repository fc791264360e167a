"""Compile the CUDA kernels with NVRTC, without a GPU: the CI compile check.

CuPy's ``RawModule`` asks the driver for the device's architecture, so it cannot compile
where no GPU is present. NVRTC itself needs no device: ``cuda-python``'s
``cuda.bindings.nvrtc`` with the ``nvidia-cuda-nvrtc-cu12`` wheel compiles
``kernels/*.cu`` to a cubin for any ``sm_XX`` or to PTX for any ``compute_XX``. The
include path carries the CUDA runtime headers of the ``nvidia-cuda-runtime-cu12`` wheel,
which must be the same CUDA major.minor as NVRTC (a mismatch fails inside the headers),
so :func:`toolkit_versions` checks that first.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from .errors import UMQError

# Architectures CI compiles for: Ampere (A100, RTX 30), Ada (L4, RTX 40), Hopper (H100).
CI_ARCHITECTURES = ("sm_80", "sm_86", "sm_89", "sm_90")
PTX_ARCHITECTURE = "compute_70"  # PTX JIT-compiles on any sm_70+ device
KERNEL_SOURCES = ("umq_decode.cu", "umq_matmul.cu", "umq_gemv.cu")


def kernel_dir() -> Path:
    """The directory holding ``umq_common.cuh`` and the ``.cu`` files: the repository's
    top-level ``kernels/`` (editable install), or ``umqcli/kernels`` in a built wheel."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "kernels", package / "kernels"):
        if (candidate / "umq_common.cuh").is_file():
            return candidate
    raise UMQError(
        f"CUDA kernel sources not found (looked in {package.parent / 'kernels'} and "
        f"{package / 'kernels'})",
        rule="kernel-sources",
    )


def runtime_include_dir() -> Path:
    """``include/`` of the nvidia-cuda-runtime-cu12 wheel (cuda_runtime.h and friends)."""
    import nvidia.cuda_runtime

    for root in nvidia.cuda_runtime.__path__:
        include = Path(root) / "include"
        if (include / "cuda_runtime.h").is_file():
            return include
    raise UMQError("nvidia-cuda-runtime-cu12 has no include/cuda_runtime.h", rule="nvrtc")


def toolkit_versions() -> tuple[tuple[int, int], tuple[int, int]]:
    """((NVRTC major, minor), (runtime headers major, minor)); raises when they differ."""
    from cuda.bindings import nvrtc

    status, major, minor = nvrtc.nvrtcVersion()
    _check(status, "nvrtcVersion")
    header_version = importlib.metadata.version("nvidia-cuda-runtime-cu12")
    h_major, h_minor = (int(part) for part in header_version.split(".")[:2])
    if (major, minor) != (h_major, h_minor):
        raise UMQError(
            f"NVRTC is CUDA {major}.{minor} but the runtime headers are {header_version}: "
            f"install matching nvidia-cuda-nvrtc-cu12 / nvidia-cuda-runtime-cu12",
            rule="nvrtc",
        )
    return (major, minor), (h_major, h_minor)


@dataclass(frozen=True)
class CompileResult:
    """One successful compile: ``binary`` is a cubin (``sm_XX``) or PTX text
    (``compute_XX``); ``log`` holds NVRTC's warnings (empty when clean)."""

    source: str
    arch: str
    binary: bytes
    log: str


def _check(result, what: str) -> None:
    from cuda.bindings import nvrtc

    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, text = nvrtc.nvrtcGetErrorString(result)
        raise UMQError(f"{what} failed: {text.decode()}", rule="nvrtc")


def compile_kernel(source: str, arch: str, extra_options: tuple[str, ...] = ()) -> CompileResult:
    """Compile ``kernels/<source>`` for ``arch`` (``"sm_80"`` -> cubin, ``"compute_80"``
    -> PTX). ``extra_options``: more NVRTC flags (``--ptxas-options=-v`` puts the
    register, spill and shared-memory report in the log). Raises :class:`UMQError` (rule
    ``nvrtc``) with NVRTC's log on any error."""
    from cuda.bindings import nvrtc

    directory = kernel_dir()
    path = directory / source
    text = path.read_bytes()
    status, program = nvrtc.nvrtcCreateProgram(text, source.encode(), 0, [], [])
    _check(status, "nvrtcCreateProgram")
    try:
        options = [
            f"--gpu-architecture={arch}".encode(),
            b"--std=c++17",
            f"--include-path={directory}".encode(),
            f"--include-path={runtime_include_dir()}".encode(),
            *(option.encode() for option in extra_options),
        ]
        (status,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
        log = _program_log(program)
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise UMQError(f"{source} does not compile for {arch}:\n{log}", rule="nvrtc", file=str(path))
        if arch.startswith("sm_"):
            status, size = nvrtc.nvrtcGetCUBINSize(program)
            _check(status, "nvrtcGetCUBINSize")
            binary = bytearray(size)
            (status,) = nvrtc.nvrtcGetCUBIN(program, binary)
            _check(status, "nvrtcGetCUBIN")
        else:
            status, size = nvrtc.nvrtcGetPTXSize(program)
            _check(status, "nvrtcGetPTXSize")
            binary = bytearray(size)
            (status,) = nvrtc.nvrtcGetPTX(program, binary)
            _check(status, "nvrtcGetPTX")
        return CompileResult(source=source, arch=arch, binary=bytes(binary), log=log)
    finally:
        nvrtc.nvrtcDestroyProgram(program)


def _program_log(program) -> str:
    from cuda.bindings import nvrtc

    status, size = nvrtc.nvrtcGetProgramLogSize(program)
    _check(status, "nvrtcGetProgramLogSize")
    # NVRTC writes into the buffer: it must be mutable. (`b" " * size` would be written
    # through, and for size 1 -- an empty log -- that is CPython's shared one-byte b" "
    # object, turning every later b" " in the process into b"\x00".)
    log = bytearray(size)
    (status,) = nvrtc.nvrtcGetProgramLog(program, log)
    _check(status, "nvrtcGetProgramLog")
    return bytes(log).rstrip(b"\x00 ").decode(errors="replace").strip()


def compile_all(archs: tuple[str, ...] = CI_ARCHITECTURES + (PTX_ARCHITECTURE,)) -> list[CompileResult]:
    """Every kernel source for every architecture; the first failure raises."""
    toolkit_versions()
    return [compile_kernel(source, arch) for source in KERNEL_SOURCES for arch in archs]


def main() -> None:  # pragma: no cover - a convenience for `python -m umqcli.nvrtc`
    for result in compile_all():
        kind = "cubin" if result.arch.startswith("sm_") else "ptx"
        note = f"  ({result.log})" if result.log else ""
        print(f"{result.source:16s} {result.arch:12s} {kind:5s} {len(result.binary):8d} bytes{note}")


if __name__ == "__main__":  # pragma: no cover
    main()
