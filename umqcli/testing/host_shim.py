"""Run the CUDA kernels on the CPU: ``kernels/*.cu`` compiled by g++ through
``kernels/host_shim.h`` (fibers for CUDA threads, a real ``__syncthreads`` barrier).

The kernel sources are compiled UNMODIFIED into one shared library
(``kernels/host_shim.cpp``), loaded with ctypes. :class:`HostShimRunner` implements the
same :class:`~umqcli.backends.cuda.KernelRunner` interface as the CuPy runner, so
``CudaBackend(runner=HostShimRunner.build(dir))`` executes the real launchers and the
real kernels on machines without a GPU (CI). It is a test vehicle, not a fast path:
blocks run one after another on one core.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

import torch

from ..errors import UMQError
from ..nvrtc import kernel_dir

SHIM_SOURCES = (
    "host_shim.h", "host_shim.cpp", "umq_common.cuh", "umq_decode.cu", "umq_matmul.cu", "umq_gemv.cu",
    "shim_selftest.cu",
)
# -ffp-contract=off: no fused multiply-add, so every float32 product is rounded on its
# own (decode(q) * scale must round exactly once, as in the torch codec).
COMPILE_FLAGS = ("-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-Wall", "-Wno-unknown-pragmas")
STATUS = {1: "unknown kernel", 2: "threads of a block disagree on __syncthreads()", 3: "bad launch configuration"}


def shim_digest() -> str:
    """A hash of the shim and kernel sources and the flags: the library's cache key."""
    digest = hashlib.sha256(" ".join(COMPILE_FLAGS).encode())
    directory = kernel_dir()
    for name in SHIM_SOURCES:
        digest.update((directory / name).read_bytes())
    return digest.hexdigest()[:16]


def build_library(out_dir: str | Path, compiler: str | None = None) -> Path:
    """Compile the shim library into ``out_dir`` (reused when the sources are unchanged)."""
    out_dir = Path(out_dir)
    target = out_dir / f"libumq_shim-{shim_digest()}.so"
    if target.is_file():
        return target
    compiler = compiler or os.environ.get("CXX") or shutil.which("g++")
    if not compiler:
        raise UMQError("no C++ compiler (g++) found to build the kernel host shim", rule="host-shim")
    out_dir.mkdir(parents=True, exist_ok=True)
    directory = kernel_dir()
    partial = target.with_suffix(f".tmp{os.getpid()}")
    result = subprocess.run(
        [compiler, *COMPILE_FLAGS, f"-I{directory}", str(directory / "host_shim.cpp"), "-o", str(partial)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise UMQError(f"g++ failed on the kernel host shim:\n{result.stderr}", rule="host-shim")
    partial.replace(target)  # atomic: a concurrent build never sees half a library
    return target


class HostShimRunner:
    """:class:`~umqcli.backends.cuda.KernelRunner` that runs kernels on the CPU."""

    device = torch.device("cpu")

    def __init__(self, library: str | Path) -> None:
        self.library_path = Path(library)
        self._lib = ctypes.CDLL(str(self.library_path))
        self._launch = self._lib.umq_shim_launch
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [ctypes.POINTER(ctypes.c_void_p)]

    @classmethod
    def build(cls, out_dir: str | Path) -> "HostShimRunner":
        return cls(build_library(out_dir))

    def launch(
        self,
        source: str,
        kernel: str,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: Sequence[torch.Tensor | int],
    ) -> None:
        values = []
        for arg in args:
            if isinstance(arg, torch.Tensor):
                if arg.device.type != "cpu" or not arg.is_contiguous():
                    raise UMQError("host shim arguments must be contiguous CPU tensors", rule="host-shim")
                values.append(ctypes.c_void_p(arg.data_ptr()))
            else:
                values.append(ctypes.c_int(int(arg)))
        pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        status = self._launch(kernel.encode(), *grid, *block, pointers)
        if status != 0:
            raise UMQError(
                f"{source}:{kernel} grid {grid} block {block}: {STATUS.get(status, status)}",
                rule="host-shim",
            )
