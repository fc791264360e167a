"""CUDA backend: the kernels of ``kernels/*.cu`` through CuPy, with validating launchers.

Modelled on thinc's ``backends/_custom_kernels.py``:

- one CuPy ``RawModule`` per ``.cu`` file, compiled lazily on first use for the current
  device's architecture (CuPy picks the arch and keeps its on-disk cache) and kept in a
  per-process cache; one availability flag (:func:`is_available`);
- torch tensors are handed to CuPy through DLPack (``cupy.from_dlpack``), no copies, and
  launched on torch's current stream;
- every launcher checks dtype, shape, contiguity and every bound before a launch, and
  falls back to the torch twin for what the kernels do not cover (a dimension beyond
  int32, an output dtype other than float32/float16/bfloat16 is decoded in float32 and
  cast, which is exact).

The launch planning (grids, argument lists) is separate from the launch itself
(:class:`KernelRunner`): :class:`CupyRunner` launches on a GPU, and
:class:`umqcli.testing.host_shim.HostShimRunner` runs the same kernels, from the same
sources, on the CPU, so CI exercises these launchers without a GPU.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Protocol, Sequence

import torch

from ..codec import PackedTensor, check_stored_layout
from .._optional import require_cupy
from ..errors import UMQError
from ..format import DATA_SUFFIX, HI_KERNEL_CODES, LO_KERNEL_CODES, MASK_SUFFIX, SCALE_SUFFIX
from ..nvrtc import kernel_dir
from . import check_matmul_input

DECODE_SOURCE = "umq_decode.cu"
MATMUL_SOURCE = "umq_matmul.cu"
GEMV_SOURCE = "umq_gemv.cu"
# The small-M kernel takes x in its own dtype (exact conversion to float32 in registers).
GEMV_KERNELS = {
    torch.float32: "umq_gemv_f32",
    torch.float16: "umq_gemv_f16",
    torch.bfloat16: "umq_gemv_bf16",
}
GEMV_MAX_M = 16  # UMQ_GEMV_MAX_M of umq_gemv.cu: up to here the GEMV kernel, beyond it the tiles
GEMV_ROWS = 8  # UMQ_GEMV_ROWS: W rows per block (one per warp)
GEMV_THREADS = 256
VECTOR_ALIGN = 16  # the GEMV kernel reads x and the payload with 16-byte vector loads
DECODE_KERNELS = {
    torch.float32: "umq_decode_f32",
    torch.float16: "umq_decode_f16",
    torch.bfloat16: "umq_decode_bf16",
}
DECODE_THREADS = 256
DECODE_MAX_BLOCKS = 65535  # grid-stride loop: more blocks than this buy nothing
MATMUL_TILE_M = 64  # UMQ_TILE_M, UMQ_TILE_N and UMQ_THREADS of umq_matmul.cu
MATMUL_TILE_N = 64
MATMUL_THREADS = 256
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y: larger M is launched in slices
INT32_MAX = 2**31 - 1


class KernelRunner(Protocol):
    """Launches one kernel of one ``.cu`` file. ``device``: where tensors must live."""

    device: torch.device

    def launch(
        self,
        source: str,
        kernel: str,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: Sequence[torch.Tensor | int],
    ) -> None: ...


# --------------------------------------------------------------------------- availability


@lru_cache(maxsize=1)
def _probe() -> str | None:
    """None when CuPy and a device are usable, else the reason why not."""
    # The cheap test first: a CPU-only torch cannot hand tensors to a GPU kernel anyway,
    # and importing CuPy costs a few hundred ms on every CLI run.
    if not torch.cuda.is_available():
        return "this torch build or machine has no CUDA device (torch.cuda.is_available() is False)"
    try:
        cupy = require_cupy("the cuda backend")
    except UMQError as exc:
        return exc.message
    except Exception as exc:  # a broken CUDA install fails inside CuPy's own import
        return f"CuPy is not importable ({exc.__class__.__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no usable CUDA device ({exc})"
    if count <= 0:
        return "no CUDA device found"
    return None


def is_available() -> bool:
    """True when CuPy imports and a CUDA device is usable from both CuPy and torch."""
    return _probe() is None


def unavailable_reason() -> str:
    return _probe() or ""


# --------------------------------------------------------------------------- CuPy runner


# (source file, device index) -> compiled RawModule, shared by every runner of the process.
_MODULES: dict[tuple[str, int], object] = {}


class CupyRunner:
    """Launches the kernels on the current CUDA device with CuPy.

    One ``RawModule`` per ``.cu`` file and device, compiled on first use (NVRTC, for the
    device's own architecture) and cached for the process.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        if not is_available():
            raise UMQError(f"backend 'cuda' is unavailable: {unavailable_reason()}", rule="backend")
        self._cupy = require_cupy("the cuda backend")
        self.device = device or torch.device("cuda", torch.cuda.current_device())

    def module(self, source: str):
        """The compiled ``RawModule`` of ``kernels/<source>`` (compiled once per device)."""
        key = (source, self.device.index)
        if key not in _MODULES:
            directory = kernel_dir()
            code = (directory / source).read_text()
            with self._cupy.cuda.Device(self.device.index):
                _MODULES[key] = self._cupy.RawModule(code=code, options=("--std=c++17", f"-I{directory}"))
        return _MODULES[key]

    def launch(self, source, kernel, grid, block, args) -> None:
        cupy = self._cupy
        function = self.module(source).get_function(kernel)
        stream = torch.cuda.current_stream(self.device)
        with cupy.cuda.Device(self.device.index), cupy.cuda.ExternalStream(stream.cuda_stream):
            # Inside the stream context DLPack exchanges on torch's own stream: no copy,
            # no extra synchronisation.
            converted = tuple(
                cupy.from_dlpack(_cupy_viewable(arg)) if isinstance(arg, torch.Tensor) else cupy.int32(arg)
                for arg in args
            )
            function(grid, block, converted)


def _cupy_viewable(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a same-width integer view of it when CuPy may not know its dtype
    (bfloat16 has no CuPy dtype before CuPy 14; the kernels take raw bit patterns anyway)."""
    if tensor.dtype in (torch.bfloat16, torch.float16):
        return tensor.view(torch.int16)
    return tensor


# --------------------------------------------------------------------------- launchers


def _packed_on(packed: PackedTensor, device: torch.device, name: str | None) -> tuple[torch.Tensor, ...]:
    """data, mask, scale on ``device``, after checking dtypes, shapes and contiguity."""
    spec = packed.spec
    tensors = []
    check_stored_layout(packed, name=name)
    for suffix, tensor in ((DATA_SUFFIX, packed.data), (MASK_SUFFIX, packed.mask), (SCALE_SUFFIX, packed.scale)):
        if not tensor.is_contiguous():
            raise UMQError(
                f"{suffix[1:]} is not contiguous (strides {tensor.stride()}); the kernel reads "
                f"row-major bytes: pass .contiguous() tensors",
                rule="kernel-layout",
                tensor=name,
            )
        tensors.append(tensor.to(device))
    if spec.k < 0 or spec.k > 8 or spec.block <= 0 or spec.block % 8 or spec.columns % spec.block:
        raise UMQError(
            f"k={spec.k}, block={spec.block} is outside what FORMAT v1 allows for {spec.columns} columns",
            rule="kernel-input",
            tensor=name,
        )
    return tuple(tensors)


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when its first byte is 16-byte aligned, else an aligned copy (a
    fresh allocation; a view into a memory-mapped file can start anywhere)."""
    return tensor if tensor.data_ptr() % VECTOR_ALIGN == 0 else tensor.clone()


def _beyond_kernel(*sizes: int) -> bool:
    """True when a size does not fit the kernels' int32 arguments."""
    return any(size > INT32_MAX for size in sizes)


class CudaBackend:
    """Decode and fused matmul with the ``kernels/*.cu`` kernels (contract: see
    :mod:`umqcli.backends`). ``runner`` defaults to :class:`CupyRunner`; tests pass a
    :class:`~umqcli.testing.host_shim.HostShimRunner` to run the same launchers on the
    CPU. Results are returned on ``x``'s device (decode: on the runner's device)."""

    name = "cuda"

    def __init__(self, runner: KernelRunner | None = None) -> None:
        self.runner = runner if runner is not None else CupyRunner()
        self.fallbacks = 0  # how many calls went to the torch twin (kernel limits)

    def decode(self, packed: PackedTensor, dtype: torch.dtype | None = None, *, name: str | None = None) -> torch.Tensor:
        """Dense ``[R, C]`` in ``dtype`` (default: the source dtype), bit-exact with
        ``codec.dequantize``. uint8/float32 packed tensors, contiguous, any device."""
        spec = packed.spec
        target = dtype or spec.torch_dtype
        rows, cols = spec.shape
        if _beyond_kernel(rows, cols, rows * cols // 8):
            return self._fallback().decode(packed, target)
        data, mask, scale = _packed_on(packed, self.runner.device, name)
        kernel_dtype = target if target in DECODE_KERNELS else torch.float32
        out = torch.empty(rows, cols, dtype=kernel_dtype, device=self.runner.device)
        groups = rows * (cols // 8)
        blocks = min(-(-groups // DECODE_THREADS), DECODE_MAX_BLOCKS)
        self.runner.launch(
            DECODE_SOURCE,
            DECODE_KERNELS[kernel_dtype],
            (blocks, 1, 1),
            (DECODE_THREADS, 1, 1),
            (data, mask, scale, out, rows, cols, spec.k, spec.block, LO_KERNEL_CODES[spec.lo], HI_KERNEL_CODES[spec.hi]),
        )
        # float32 -> float64 (or any wider float) is exact, so the cast keeps bit-exactness.
        return out if kernel_dtype == target else out.to(target)

    def matmul(self, x: torch.Tensor, packed: PackedTensor, *, name: str | None = None) -> torch.Tensor:
        """``x`` float ``[..., C]`` -> float32 ``[..., R]`` = ``x · Ŵᵀ``, fused from the
        packed bytes with float32 accumulation. Up to ``GEMV_MAX_M`` rows of ``x`` go to
        the GEMV kernel (``x`` read in float32/float16/bfloat16 as given), more to the
        64 x 64 tile kernel (``x`` cast to contiguous float32, no copy when it already is)."""
        check_matmul_input(x, packed)
        spec = packed.spec
        rows, cols = spec.shape
        lead = x.shape[:-1]
        flat = x.reshape(-1, cols)
        m = flat.shape[0]
        if _beyond_kernel(rows, cols, m, m * cols, m * rows, rows * cols):
            return self._fallback().matmul(x, packed)
        out_device = x.device
        if m == 0:  # nothing to launch (a zero-size grid is a launch error)
            return torch.empty(*lead, rows, dtype=torch.float32, device=out_device)
        data, mask, scale = _packed_on(packed, self.runner.device, name)
        if m <= GEMV_MAX_M:
            y = self._gemv(flat, data, mask, scale, spec)
        else:
            y = self._tiles(flat, data, mask, scale, spec)
        return y.reshape(*lead, rows).to(out_device)

    def _gemv(self, flat, data, mask, scale, spec) -> torch.Tensor:
        """M <= 16: one warp per W row, 16-byte vector loads (umq_gemv.cu)."""
        m, cols = flat.shape
        rows = spec.rows
        kernel_dtype = flat.dtype if flat.dtype in GEMV_KERNELS else torch.float32
        x = _aligned(flat.to(device=self.runner.device, dtype=kernel_dtype).contiguous())
        y = torch.empty(m, rows, dtype=torch.float32, device=self.runner.device)
        self.runner.launch(
            GEMV_SOURCE,
            GEMV_KERNELS[kernel_dtype],
            (-(-rows // GEMV_ROWS), 1, 1),
            (GEMV_THREADS, 1, 1),
            (x, _aligned(data), mask, scale, y, m, rows, cols, spec.k, spec.block,
             LO_KERNEL_CODES[spec.lo], HI_KERNEL_CODES[spec.hi]),
        )
        return y

    def _tiles(self, flat, data, mask, scale, spec) -> torch.Tensor:
        """Any M: 64 x 64 output tiles (umq_matmul.cu), x in float32."""
        m, cols = flat.shape
        rows = spec.rows
        flat = flat.to(device=self.runner.device, dtype=torch.float32).contiguous()
        y = torch.empty(m, rows, dtype=torch.float32, device=self.runner.device)
        # gridDim.y is capped at 65535: launch M in slices of at most 65535 tiles.
        slice_rows = MAX_GRID_Y * MATMUL_TILE_M
        for start in range(0, m, slice_rows):
            x_part = flat[start : start + slice_rows]
            y_part = y[start : start + slice_rows]
            part = x_part.shape[0]
            grid = (-(-rows // MATMUL_TILE_N), -(-part // MATMUL_TILE_M), 1)
            self.runner.launch(
                MATMUL_SOURCE,
                "umq_matmul_f32",
                grid,
                (MATMUL_THREADS, 1, 1),
                (x_part, data, mask, scale, y_part, part, rows, cols, spec.k, spec.block,
                 LO_KERNEL_CODES[spec.lo], HI_KERNEL_CODES[spec.hi]),
            )
        return y

    def _fallback(self):
        from .torch import TorchBackend

        self.fallbacks += 1
        return TorchBackend()

    def __repr__(self) -> str:
        return f"CudaBackend(runner={self.runner.__class__.__name__}, device={self.runner.device})"


def kernel_sources() -> list[Path]:
    """The ``.cu`` files this backend compiles (for the NVRTC check and the shim)."""
    directory = kernel_dir()
    return [directory / DECODE_SOURCE, directory / MATMUL_SOURCE]
