"""The seed formats UMQ is measured against: fake-quantize a weight, count its stored bits.

Every baseline is a frozen :class:`Baseline` with

- ``quantize_dequantize(w, act_absmax=None)``: float ``[R, C]`` (rows = output channels,
  columns = input channels, as in ``nn.Linear.weight``) -> float32 ``[R, C]``, the weight
  a reader of that format would decode;
- ``bits_per_element(shape, act_absmax=None)``: everything the format stores, per weight
  element: payload, scales, zero points, outlier columns kept in fp16 and their indices.

The registry :data:`BASELINES` (name -> Baseline) holds the seed list: FP8 E4M3/E5M2 per
output channel, FP8 E4M3 in 1x128 and 128x128 blocks (DeepSeek-V3), MXFP8 (OCP MX v1.0),
INT8 per output channel (absmax) and per 32 columns, LLM.int8() (bitsandbytes int8 vector-wise + fp16
outlier input columns; needs activation statistics), INT4 group-wise symmetric
(32/64/128), NF4 in blocks of 64 (bitsandbytes, with and without double quantization),
and fp16/bf16 casts as 16-bit references.

Where a real library runs on the CPU it is used (bitsandbytes for NF4 and the int8
vector-wise path, torch for the fp8 casts); the others are implemented here and checked
against a library in ``tests/test_baselines.py`` (ml_dtypes casts, an ml_dtypes MX
reference, bitsandbytes' int8 vector-wise quantizer).

The small functions :func:`fake_quant_fp8_channel`, :func:`fake_quant_int8_channel`,
:func:`fake_quant_fp8_blocks` and :func:`fake_quant_mx` are the public building blocks that
other modules (``verify``, ``calibrate``) reuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ._optional import require
from .codec import fake_quantize
from .errors import UMQError
from .format import GROUP, LoFormat, QuantParams
from .stats import OUTLIER_THRESHOLD

#: Input columns whose activation absmax exceeds this are kept in fp16 by LLM.int8()
#: (Dettmers et al. 2022, the bitsandbytes default ``llm_int8_threshold``): the outlier
#: threshold the statistics count with, defined once in :mod:`umqcli.stats`.
LLM_INT8_THRESHOLD = OUTLIER_THRESHOLD

_FP8_DTYPES: dict[str, torch.dtype] = {
    "e4m3": torch.float8_e4m3fn,
    "e5m2": torch.float8_e5m2,
}
#: Largest finite magnitude of each fp8 encoding (OCP 8-bit floating point, v1.0).
FP8_MAX: dict[str, float] = {"e4m3": 448.0, "e5m2": 57344.0}
#: emax of the element type: the exponent of its largest normal power of two (OCP MX
#: v1.0, section 5.3: 8 for E4M3, 15 for E5M2).
MX_ELEMENT_EMAX: dict[str, int] = {"e4m3": 8, "e5m2": 15}
_E8M0_MIN_EXP, _E8M0_MAX_EXP = -127, 127  # 0xFF is NaN and never written


# --------------------------------------------------------------------------- checks


def bitsandbytes_functional():
    """``bitsandbytes.functional``, imported without its CPU-backend warning about an
    optional hub kernel for 4-bit *matmuls* (``gemm_4bit_forward``), which nothing here
    uses: quantize/dequantize run on bitsandbytes' own CPU ops either way."""
    import logging
    import warnings

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # bitsandbytes wraps its default ops in torch.compile at import time, which
            # imports torch.utils.mkldnn: torch's own module still decorates with the
            # torch.jit.script_method it deprecates (14 warnings, none about our code).
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated",
                                    category=DeprecationWarning)
            bnbf = require("bitsandbytes.functional", extra="baselines", purpose="the NF4 and LLM.int8() baselines")
    finally:
        logger.setLevel(level)
    return bnbf



def _check_weight(w: torch.Tensor, name: str) -> torch.Tensor:
    """float32 copy of a 2-D finite weight, or :class:`UMQError` naming the rule."""
    if w.dim() != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise UMQError(f"{name}: expected a non-empty 2-D weight, got shape {tuple(w.shape)}", rule="shape")
    if not w.is_floating_point():
        raise UMQError(f"{name}: expected a float weight, got {w.dtype}", rule="source-dtype")
    w32 = w.detach().float()
    if not bool(torch.isfinite(w32).all()):
        raise UMQError(f"{name}: the weight holds NaN or infinite values", rule="finite")
    return w32


def _check_divides(columns: int, block: int, name: str) -> None:
    if columns % block:
        raise UMQError(
            f"{name}: blocks of {block} columns do not divide the column count {columns}",
            rule="block",
        )


# --------------------------------------------------------------------------- building blocks


def fake_quant_fp8_blocks(
    w: torch.Tensor, fmt: str = "e4m3", block_cols: int | None = None, block_rows: int = 1
) -> torch.Tensor:
    """Absmax-scaled fp8 round trip with one float32 scale per ``block_rows x block_cols``
    tile (``block_cols=None``: the whole row, i.e. per output channel).

    ``w``: float ``[R, C]`` with ``block_cols | C`` and ``block_rows | R``. Returns float32
    ``[R, C]``. ``scale = amax / MAX`` (MAX = 448 for E4M3, 57344 for E5M2); values are
    clamped to ``[-MAX, MAX]`` before the cast because E5M2 overflows to inf rather than
    saturating; the cast rounds to nearest even. An all-zero tile decodes to zeros.
    """
    w32 = _check_weight(w, f"fp8_{fmt}")
    rows, cols = w32.shape
    block_cols = cols if block_cols is None else block_cols
    _check_divides(cols, block_cols, f"fp8_{fmt}")
    if block_rows == 1 and block_cols % GROUP == 0:
        # One scale per row segment: exactly UMQ with k = 0, so the codec's own round trip.
        params = QuantParams(k=0, lo=LoFormat(f"fp8_{fmt}"), block=block_cols)
        return fake_quantize(w32, params, dtype=torch.float32)
    if rows % block_rows:
        raise UMQError(
            f"fp8_{fmt}: blocks of {block_rows} rows do not divide the row count {rows}", rule="block"
        )
    limit = FP8_MAX[fmt]
    tiles = w32.view(rows // block_rows, block_rows, cols // block_cols, block_cols)
    scale = tiles.abs().amax(dim=(1, 3), keepdim=True) / limit
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = (tiles / safe).clamp_(-limit, limit).to(_FP8_DTYPES[fmt])
    return (q.float() * scale).view(rows, cols)


def fake_quant_fp8_channel(w: torch.Tensor, fmt: str = "e4m3") -> torch.Tensor:
    """FP8 (``"e4m3"`` or ``"e5m2"``) with one float32 absmax scale per output channel
    (row): float ``[R, C]`` -> float32 ``[R, C]``."""
    return fake_quant_fp8_blocks(w, fmt, None, 1)


def int8_channel_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: float ``[R, C]`` -> (int8 codes ``[R, C]`` in
    ``[-127, 127]``, float32 row absmax ``[R]``); ``w_hat = q * absmax / 127``.

    The same arithmetic as bitsandbytes' ``int8_vectorwise_quant``
    (``round(w * (127 / absmax))``, round half to even), except that an all-zero row gives
    zero codes instead of NaN.
    """
    w32 = _check_weight(w, "int8")
    absmax = w32.abs().amax(dim=1)
    safe = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    q = torch.round(w32 * (127.0 / safe).unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q, absmax


def fake_quant_int8_channel(w: torch.Tensor) -> torch.Tensor:
    """INT8 absmax per output channel round trip: float ``[R, C]`` -> float32 ``[R, C]``."""
    q, absmax = int8_channel_quantize(w)
    return q.float() * (absmax / 127.0).unsqueeze(1)


def mx_scale_exponents(w: torch.Tensor, fmt: str = "e4m3", block: int = 32) -> torch.Tensor:
    """int32 ``[R, C / block]``: the E8M0 shared exponent of each MX block (OCP MX v1.0
    section 6.3): ``floor(log2(amax)) - emax_elem``, clamped to E8M0's range
    ``[-127, 127]``; an all-zero block gets -127."""
    w32 = _check_weight(w, f"mxfp8_{fmt}")
    rows, cols = w32.shape
    _check_divides(cols, block, f"mxfp8_{fmt}")
    amax = w32.view(rows, cols // block, block).abs().amax(-1)
    # frexp gives amax = m * 2^e with m in [0.5, 1): floor(log2(amax)) = e - 1, exactly
    # (no log2 rounding near powers of two).
    _, exponent = torch.frexp(amax)
    shared = exponent.to(torch.int32) - 1 - MX_ELEMENT_EMAX[fmt]
    shared = torch.where(amax == 0, torch.full_like(shared, _E8M0_MIN_EXP), shared)
    return shared.clamp_(_E8M0_MIN_EXP, _E8M0_MAX_EXP)


def fake_quant_mx(w: torch.Tensor, fmt: str = "e4m3", block: int = 32) -> torch.Tensor:
    """MXFP8 round trip (OCP MX v1.0): blocks of ``block`` consecutive columns share a
    power-of-two scale ``X = 2^(floor(log2(amax)) - emax_elem)``; each element is
    ``w / X`` cast to fp8 with saturation (clamp to +-MAX, then round to nearest even).

    ``w``: float ``[R, C]``, ``block | C``. Returns float32 ``[R, C]``.
    """
    w32 = _check_weight(w, f"mxfp8_{fmt}")
    rows, cols = w32.shape
    exponents = mx_scale_exponents(w32, fmt, block)
    # 2^e as float32 (2^-127 is a float32 subnormal, still exact).
    scale = torch.ldexp(torch.ones_like(exponents, dtype=torch.float32), exponents).unsqueeze(-1)
    limit = FP8_MAX[fmt]
    blocks = w32.view(rows, cols // block, block)
    q = (blocks / scale).clamp_(-limit, limit).to(_FP8_DTYPES[fmt])
    return (q.float() * scale).view(rows, cols)


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Baseline:
    """A quantization format UMQ is compared against.

    ``name`` is unique (``"fp8_e4m3-channel"``), ``family`` groups variants for plots
    (``"fp8"``, ``"mxfp8"``, ``"int8"``, ``"llm.int8"``, ``"int4"``, ``"nf4"``, ``"16-bit"``),
    ``library`` says whose code computes the values.
    """

    name: str
    family: str
    library: ClassVar[str] = "torch"
    needs_activations: ClassVar[bool] = False

    @property
    def params(self) -> dict[str, Any]:
        """The format's parameters as a JSON-ready dict."""
        return {}

    def unsupported(self, shape: tuple[int, int]) -> str | None:
        """Why this format cannot store a tensor of ``shape`` (``None``: it can)."""
        return None

    def row_local(self, shape: tuple[int, int]) -> bool:
        """True when each decoded row depends on that row of the weight only, so a
        subset of rows can be quantized on its own (``compare`` samples rows)."""
        return True

    def quantize_dequantize(self, w: torch.Tensor, act_absmax: torch.Tensor | None = None) -> torch.Tensor:
        """float ``[R, C]`` -> float32 ``[R, C]`` as decoded from this format.

        ``act_absmax``: float32 ``[C]``, max |x_j| per input channel (only LLM.int8 uses it).
        """
        raise NotImplementedError

    def bits_per_element(self, shape: tuple[int, int], act_absmax: torch.Tensor | None = None) -> float:
        """Stored bits per weight element for a tensor of ``shape`` ``(R, C)``."""
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "library": self.library, "params": self.params}


@dataclass(frozen=True)
class Cast16(Baseline):
    """Plain fp16 / bf16 cast (round to nearest even): the 16-bit reference points."""

    dtype_name: str = "float16"

    @property
    def params(self) -> dict[str, Any]:
        return {"dtype": self.dtype_name}

    def quantize_dequantize(self, w, act_absmax=None):
        w32 = _check_weight(w, self.name)
        dtype = torch.float16 if self.dtype_name == "float16" else torch.bfloat16
        return w32.to(dtype).float()

    def bits_per_element(self, shape, act_absmax=None):
        return 16.0


@dataclass(frozen=True)
class FP8Blocks(Baseline):
    """FP8 with one float32 absmax scale per ``block_rows x block_cols`` tile
    (``block_cols = 0``: per output channel). Values via torch's fp8 casts."""

    fmt: str = "e4m3"
    block_cols: int = 0
    block_rows: int = 1

    @property
    def params(self) -> dict[str, Any]:
        return {"fmt": self.fmt, "block_cols": self.block_cols or "row", "block_rows": self.block_rows}

    def unsupported(self, shape):
        rows, cols = shape
        if self.block_cols and cols % self.block_cols:
            return f"{self.block_cols} does not divide {cols} columns"
        if rows % self.block_rows:
            return f"{self.block_rows} does not divide {rows} rows"
        return None

    def row_local(self, shape):
        return self.block_rows == 1

    def quantize_dequantize(self, w, act_absmax=None):
        return fake_quant_fp8_blocks(w, self.fmt, self.block_cols or None, self.block_rows)

    def bits_per_element(self, shape, act_absmax=None):
        rows, cols = shape
        tile = (self.block_cols or cols) * self.block_rows
        return 8.0 + 32.0 / tile


@dataclass(frozen=True)
class MXFP8(Baseline):
    """OCP MX v1.0 MXFP8: 8-bit elements, one E8M0 (8-bit power-of-two) scale per block
    of 32 consecutive elements along the reduction (input) dimension."""

    fmt: str = "e4m3"
    block: int = 32

    @property
    def params(self) -> dict[str, Any]:
        return {"fmt": self.fmt, "block": self.block, "scale": "e8m0"}

    def unsupported(self, shape):
        return None if shape[1] % self.block == 0 else f"{self.block} does not divide {shape[1]} columns"

    def quantize_dequantize(self, w, act_absmax=None):
        return fake_quant_mx(w, self.fmt, self.block)

    def bits_per_element(self, shape, act_absmax=None):
        return 8.0 + 8.0 / self.block


@dataclass(frozen=True)
class Int8Channel(Baseline):
    """INT8 symmetric absmax, one float32 scale per output channel."""

    @property
    def params(self) -> dict[str, Any]:
        return {"scale": "absmax/127 per row"}

    def quantize_dequantize(self, w, act_absmax=None):
        return fake_quant_int8_channel(w)

    def bits_per_element(self, shape, act_absmax=None):
        return 8.0 + 32.0 / shape[1]


@dataclass(frozen=True)
class _ColumnGroups(Baseline):
    """A format with one scale per ``group`` consecutive input columns."""

    group: int

    def unsupported(self, shape):
        return None if shape[1] % self.group == 0 else f"{self.group} does not divide {shape[1]} columns"

    def _groups(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` checked, in float32, viewed as ``[R, C / group, group]``."""
        w32 = _check_weight(w, self.name)
        rows, cols = w32.shape
        _check_divides(cols, self.group, self.name)
        return w32.view(rows, cols // self.group, self.group)


@dataclass(frozen=True)
class Int8Group(_ColumnGroups):
    """INT8 symmetric absmax with one float32 scale per ``group`` consecutive input
    columns: UMQ's k = 0 values without the mask byte (not a seed format; the fair
    reference for what UMQ's hi elements add beyond finer scales)."""

    group: int = 32

    @property
    def params(self) -> dict[str, Any]:
        return {"group": self.group, "scale": "fp32 absmax/127"}

    def quantize_dequantize(self, w, act_absmax=None):
        groups = self._groups(w)
        return fake_quant_int8_channel(groups.reshape(-1, self.group)).view(groups.shape[0], -1)

    def bits_per_element(self, shape, act_absmax=None):
        return 8.0 + 32.0 / self.group


def llm_int8_outlier_columns(act_absmax: torch.Tensor, threshold: float = LLM_INT8_THRESHOLD) -> torch.Tensor:
    """int64 ``[n]``: input channels whose activation absmax exceeds ``threshold``."""
    return torch.nonzero(act_absmax.float() > threshold).view(-1)


@dataclass(frozen=True)
class LLMInt8(Baseline):
    """LLM.int8() mixed-precision decomposition (Dettmers et al. 2022), weight side.

    Input columns whose activation absmax exceeds ``threshold`` stay fp16 (with their
    int32 column indices); the rest is int8 vector-wise (one float32 absmax per output
    row over the non-outlier columns), computed by bitsandbytes' ``int8_vectorwise_quant``
    on the fp16 weight. Without activation statistics it does not apply.
    """

    threshold: float = LLM_INT8_THRESHOLD
    library: ClassVar[str] = "bitsandbytes"
    needs_activations: ClassVar[bool] = True

    @property
    def params(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "outliers": "fp16 input columns"}

    def _outliers(self, columns: int, act_absmax: torch.Tensor | None) -> torch.Tensor:
        if act_absmax is None:
            raise UMQError(f"{self.name} needs activation statistics (umq calibrate)", rule="activation-stats")
        if tuple(act_absmax.shape) != (columns,):
            raise UMQError(
                f"{self.name}: activation absmax has shape {tuple(act_absmax.shape)}, expected ({columns},)",
                rule="activation-stats",
            )
        return llm_int8_outlier_columns(act_absmax, self.threshold)

    def quantize_dequantize(self, w, act_absmax=None):
        bnbf = bitsandbytes_functional()
        w32 = _check_weight(w, self.name)
        outliers = self._outliers(w32.shape[1], act_absmax)
        w16 = w32.to(torch.float16)
        if not bool(torch.isfinite(w16).all()):
            raise UMQError(f"{self.name}: the weight overflows float16", rule="hi-overflow")
        inliers = w16.clone()
        inliers[:, outliers] = 0
        q, row_absmax, _ = bnbf.int8_vectorwise_quant(inliers, threshold=0.0)
        # bitsandbytes divides by a zero row absmax (NaN codes); such rows decode to 0.
        zero_rows = row_absmax == 0
        q = q.masked_fill(zero_rows.unsqueeze(1), 0)
        w_hat = bnbf.int8_vectorwise_dequant(q, row_absmax).float()
        w_hat[:, outliers] = w16[:, outliers].float()
        return w_hat

    def bits_per_element(self, shape, act_absmax=None):
        rows, cols = shape
        n_out = int(self._outliers(cols, act_absmax).numel())
        stored = 8 * rows * (cols - n_out) + 16 * rows * n_out + 32 * rows + 32 * n_out
        return stored / (rows * cols)


@dataclass(frozen=True)
class Int4Group(_ColumnGroups):
    """INT4 symmetric group-wise: ``group`` consecutive input columns share one float16
    scale ``absmax / 7``; codes ``round(w / scale)`` in ``[-7, 7]`` (no zero point)."""

    group: int = 128

    @property
    def params(self) -> dict[str, Any]:
        return {"group": self.group, "scale": "fp16 absmax/7", "zero_point": None}

    def quantize_dequantize(self, w, act_absmax=None):
        groups = self._groups(w)
        # The stored scale is fp16: quantize with the rounded value a reader will see.
        scale = (groups.abs().amax(-1, keepdim=True) / 7.0).to(torch.float16).float()
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round(groups / safe).clamp_(-7, 7)
        return (q * scale).view(groups.shape[0], -1)

    def bits_per_element(self, shape, act_absmax=None):
        return 4.0 + 16.0 / self.group


@dataclass(frozen=True)
class NF4(Baseline):
    """NF4 (QLoRA) via bitsandbytes ``quantize_4bit``: blocks of ``block`` consecutive
    elements of the flattened weight, one float32 absmax each; with ``double_quant`` the
    absmaxes are themselves 8-bit blockwise-quantized (blocks of 256, one float32 each,
    plus one float32 offset)."""

    block: int = 64
    double_quant: bool = False
    library: ClassVar[str] = "bitsandbytes"

    @property
    def params(self) -> dict[str, Any]:
        return {"block": self.block, "double_quant": self.double_quant}

    def row_local(self, shape):
        # Blocks run over the flattened tensor: they stay inside rows when C divides; the
        # double-quantized absmaxes share 8-bit scales across 256 blocks, i.e. across rows.
        return shape[1] % self.block == 0 and not self.double_quant

    def quantize_dequantize(self, w, act_absmax=None):
        bnbf = bitsandbytes_functional()
        w32 = _check_weight(w, self.name).contiguous()
        packed, state = bnbf.quantize_4bit(
            w32, blocksize=self.block, compress_statistics=self.double_quant, quant_type="nf4"
        )
        return bnbf.dequantize_4bit(packed, state).float().view(w32.shape)

    def bits_per_element(self, shape, act_absmax=None):
        numel = shape[0] * shape[1]
        blocks = math.ceil(numel / self.block)
        if self.double_quant:
            scale_bits = 8 * blocks + 32 * math.ceil(blocks / 256) + 32
        else:
            scale_bits = 32 * blocks
        return (4 * 2 * math.ceil(numel / 2) + scale_bits) / numel


def _registry() -> dict[str, Baseline]:
    entries: list[Baseline] = [
        Cast16("fp16", "16-bit", "float16"),
        Cast16("bf16", "16-bit", "bfloat16"),
        FP8Blocks("fp8_e4m3-channel", "fp8", "e4m3", 0, 1),
        FP8Blocks("fp8_e5m2-channel", "fp8", "e5m2", 0, 1),
        FP8Blocks("fp8_e4m3-1x128", "fp8", "e4m3", 128, 1),
        FP8Blocks("fp8_e4m3-128x128", "fp8", "e4m3", 128, 128),
        MXFP8("mxfp8_e4m3", "mxfp8", "e4m3", 32),
        MXFP8("mxfp8_e5m2", "mxfp8", "e5m2", 32),
        Int8Channel("int8-channel", "int8"),
        Int8Group("int8-g32", "int8", 32),
        LLMInt8("llm.int8", "llm.int8"),
        Int4Group("int4-g32", "int4", 32),
        Int4Group("int4-g64", "int4", 64),
        Int4Group("int4-g128", "int4", 128),
        NF4("nf4-b64", "nf4", 64, False),
        NF4("nf4-b64-dq", "nf4", 64, True),
    ]
    return {b.name: b for b in entries}


#: Every baseline by name, in a stable order.
BASELINES: dict[str, Baseline] = _registry()


def get_baseline(name: str) -> Baseline:
    """The baseline called ``name``; :class:`UMQError` listing the choices otherwise."""
    try:
        return BASELINES[name]
    except KeyError:
        raise UMQError(f"unknown baseline {name!r} (one of: {', '.join(BASELINES)})", rule="baseline") from None


__all__ = [
    "BASELINES",
    "Baseline",
    "FP8_MAX",
    "LLM_INT8_THRESHOLD",
    "MX_ELEMENT_EMAX",
    "fake_quant_fp8_blocks",
    "fake_quant_fp8_channel",
    "fake_quant_int8_channel",
    "fake_quant_mx",
    "get_baseline",
    "int8_channel_quantize",
    "llm_int8_outlier_columns",
    "mx_scale_exponents",
]
