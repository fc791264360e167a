"""FORMAT v1 vocabulary (``shared/FORMAT.md``): encodings, parameters, per-tensor specs.

A source tensor ``NAME`` of shape ``[R, C]`` is stored as three tensors
(``NAME.umq_data``, ``NAME.umq_mask``, ``NAME.umq_scale``) plus one entry of the header's
``umq.tensors`` JSON object: a :class:`TensorSpec`. This module knows the words and the
rules; it never touches tensor values (``codec``) or files (``io``).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Mapping

import torch

from .errors import UMQError

FORMAT_VERSION = 1
GROUP = 8  # elements per group; fixed by FORMAT v1

DATA_SUFFIX = ".umq_data"
MASK_SUFFIX = ".umq_mask"
SCALE_SUFFIX = ".umq_scale"
SUFFIXES = (DATA_SUFFIX, MASK_SUFFIX, SCALE_SUFFIX)

META_FORMAT = "format"
META_VERSION = "umq.version"
META_TENSORS = "umq.tensors"
# Optional: name -> CRC-32 of the tensor's umq.tensors entry (docs/validation.md), so a
# flipped dtype or swapped lo/hi in the header is caught like a flipped data byte.
META_TENSORS_CRC = "umq.tensors.crc32"
# config.json's quantization_config.quant_method in a packed model directory.
QUANT_METHOD = "umq"


class LoFormat(str, Enum):
    """The 8-bit encoding of lo elements (one byte each, scaled by the block's scale)."""

    FP8_E4M3 = "fp8_e4m3"
    """OCP E4M3FN: sign | 4 exponent bits (bias 7) | 3 mantissa bits. No infinities;
    0x7F / 0xFF are NaN and never written. Largest finite value 448."""

    FP8_E5M2 = "fp8_e5m2"
    """OCP E5M2: sign | 5 exponent bits (bias 15) | 2 mantissa bits. Infinities and NaNs
    are never written. Largest finite value 57344."""

    INT8 = "int8"
    """Two's complement integer in [-127, 127] (-128 is never written); round half to
    even."""

    @property
    def max_value(self) -> float:
        """The largest finite magnitude the encoding represents (FORMAT §4 ``MAX``)."""
        return _LO_MAX[self]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype whose bit pattern is the stored byte."""
        return _LO_TORCH[self]


_LO_MAX = {LoFormat.FP8_E4M3: 448.0, LoFormat.FP8_E5M2: 57344.0, LoFormat.INT8: 127.0}
_LO_TORCH = {
    LoFormat.FP8_E4M3: torch.float8_e4m3fn,
    LoFormat.FP8_E5M2: torch.float8_e5m2,
    LoFormat.INT8: torch.int8,
}


class HiFormat(str, Enum):
    """The 16-bit encoding of hi elements: two bytes, little-endian, not scaled."""

    FLOAT16 = "float16"
    """IEEE binary16: sign | 5 exponent bits (bias 15) | 10 mantissa bits."""

    BFLOAT16 = "bfloat16"
    """bfloat16: sign | 8 exponent bits (bias 127) | 7 mantissa bits (float32's top half)."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float16 if self is HiFormat.FLOAT16 else torch.bfloat16


# Each encoding's number as a kernel argument: UMQ_LO_* / UMQ_HI_* of
# kernels/umq_common.cuh, shared by the CUDA kernels and the numba pass (umqcli/_fused.py).
# One table; tests/test_kernels_nvrtc.py reads the .cuh and checks it against this one.
LO_KERNEL_CODES = {LoFormat.FP8_E4M3: 0, LoFormat.FP8_E5M2: 1, LoFormat.INT8: 2}
HI_KERNEL_CODES = {HiFormat.FLOAT16: 0, HiFormat.BFLOAT16: 1}


class Selection(str, Enum):
    """How the k hi positions of each group are chosen (the mask records the result)."""

    MAGNITUDE = "magnitude"
    """The k largest |w| (float32) of the group, ties toward the lower position. The
    reference rule: its bytes are pinned by FORMAT §5 and the conformance vectors."""

    ERROR = "error"
    """Error-greedy: hi where the lo encoding loses most (see ``codec.select_error``)."""

    ACTIVATION = "activation"
    """Error-greedy weighted by the per-input-channel activation second moment E[x_j^2],
    i.e. the expected output error (see ``codec.select_error``)."""

    SALIENCY = "saliency"
    """Error-greedy weighted by ``1 / [H^-1]_jj`` of the layer's input Hessian, the GPTQ /
    SpQR outlier criterion (seeded with the k largest ``w^2 / [H^-1]_jj``); needs the
    Hessian, so only with the ``gptq`` method (see ``gptq.select_hi``)."""


class ScaleRule(str, Enum):
    """How each block's lo scale is chosen. Readers only ever see the stored scale."""

    ABSMAX = "absmax"
    """scale = float32(amax over the block's lo elements) / MAX (0 when amax is 0)."""

    CLIP = "clip"
    """absmax times the clip ratio (a grid in [0.5, 1]) with the least squared lo error
    of the block (see ``gptq.search_scales``)."""

    CLIP_HESSIAN = "clip-hessian"
    """As ``clip``, the squared error weighted per input column by the Hessian diagonal
    ``H_jj = E[x_j^2]`` (the activation statistics)."""


class Method(str, Enum):
    """How the lo values are rounded (the bytes are FORMAT v1 either way)."""

    RTN = "rtn"
    """Each lo value rounded to nearest on its own (``codec.quantize``)."""

    GPTQ = "gptq"
    """Column by column with second-order error feedback through the inverse of the
    layer's input Hessian (Frantar et al. 2022; see :mod:`umqcli.gptq`). Recorded in the
    file as ``selection = "<selection>+gptq"``."""


SOURCE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = {v: k for k, v in SOURCE_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """FORMAT's name of a source dtype; raises for anything that is not a float source."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise UMQError(
            f"dtype {dtype} cannot be quantized (float32, float16 or bfloat16 only)",
            rule="source-dtype",
        ) from None


@dataclass(frozen=True)
class QuantParams:
    """What the user asks for one tensor. ``hi=None`` means auto and ``block=0`` means one
    scale per row; both are resolved against the tensor into a :class:`TensorSpec`.

    - ``k``: hi elements per group of 8 (0..8).
    - ``lo``: the 8-bit encoding of the other ``8 - k``.
    - ``hi``: the 16-bit encoding of the k; ``None``: the source dtype for 16-bit
      sources, float16 for float32 sources when every hi value is finite in float16,
      else bfloat16.
    - ``block``: columns sharing one lo scale (a multiple of 8 dividing C), 0 for a row.
    - ``selection``: which positions are hi.
    - ``scale_rule``: how each block's lo scale is chosen.
    - ``method``: how lo values are rounded (``rtn`` or ``gptq``, which needs the Hessian).
    """

    k: int = 1
    lo: LoFormat = LoFormat.FP8_E4M3
    hi: HiFormat | None = None
    block: int = 0
    selection: Selection = Selection.MAGNITUDE
    scale_rule: ScaleRule = ScaleRule.ABSMAX
    method: Method = Method.RTN
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        # Accept plain strings (from JSON, the CLI) and normalise them to the enums.
        object.__setattr__(self, "lo", _enum(LoFormat, self.lo, "lo"))
        if self.hi is not None and self.hi != "auto":
            object.__setattr__(self, "hi", _enum(HiFormat, self.hi, "hi", extra=("auto",)))
        else:
            object.__setattr__(self, "hi", None)
        object.__setattr__(self, "selection", _enum(Selection, self.selection, "selection"))
        object.__setattr__(self, "scale_rule", _enum(ScaleRule, self.scale_rule, "scale_rule"))
        object.__setattr__(self, "method", _enum(Method, self.method, "method"))
        if self.selection is Selection.SALIENCY and self.method is not Method.GPTQ:
            raise UMQError("selection 'saliency' needs the gptq method (it uses the Hessian)",
                           rule="selection")
        if not isinstance(self.k, int) or not 0 <= self.k <= GROUP:
            raise UMQError(f"k must be an integer in 0..8, got {self.k!r}", rule="k")
        if not isinstance(self.block, int) or self.block < 0 or self.block % GROUP:
            raise UMQError(
                f"block must be 0 (one scale per row) or a positive multiple of 8, got {self.block!r}",
                rule="block",
            )

    def resolve_block(self, columns: int) -> int:
        """The block size for a tensor with ``columns`` columns (0 -> one per row)."""
        block = columns if self.block == 0 else self.block
        if columns % block:
            raise UMQError(
                f"block {block} does not divide the column count {columns}", rule="block"
            )
        return block

    @property
    def recorded_selection(self) -> str:
        """The ``selection`` string written to the file: the selection, plus ``+gptq``
        when the lo values were rounded with error feedback."""
        if self.method is Method.GPTQ:
            return f"{self.selection.value}+{self.method.value}"
        return self.selection.value

    @property
    def needs_hessian(self) -> bool:
        """Whether packing with these parameters needs the layer's input statistics
        beyond E[x^2]: the gptq method (the Hessian)."""
        return self.method is Method.GPTQ

    def bits_per_element(self, columns: int | None = None) -> float:
        """Stored bits per element: payload + mask + scale (FORMAT §6)."""
        block = self.block or columns
        scale_bits = 0.0 if block is None else 32.0 / block
        return (GROUP + self.k + 1) * 8 / GROUP + scale_bits

    def to_json(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "lo": self.lo.value,
            "hi": "auto" if self.hi is None else self.hi.value,
            "block": self.block,
            "selection": self.selection.value,
            "scale_rule": self.scale_rule.value,
            "method": self.method.value,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "QuantParams":
        known = {"k", "lo", "hi", "block", "selection", "scale_rule", "method"}
        unknown = set(obj) - known
        if unknown:
            raise UMQError(f"unknown parameter(s) {sorted(unknown)}", rule="params")
        return cls(**{key: obj[key] for key in known if key in obj})

    def with_(self, **changes: Any) -> "QuantParams":
        return replace(self, **changes)


def _enum(kind: type[Enum], value: Any, what: str, extra: tuple[str, ...] = ()):
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join([*extra, *(m.value for m in kind)])  # type: ignore[attr-defined]
        raise UMQError(f"unknown {what} {value!r} (one of: {choices})", rule=what) from None


@dataclass(frozen=True)
class TensorSpec:
    """One ``umq.tensors`` entry: everything a reader needs to decode one tensor."""

    shape: tuple[int, int]
    dtype: str
    k: int
    lo: LoFormat
    hi: HiFormat
    block: int
    selection: str
    scale_rule: str = ScaleRule.ABSMAX.value
    crc32: Mapping[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def columns(self) -> int:
        return self.shape[1]

    @property
    def groups(self) -> int:
        return self.shape[1] // GROUP

    @property
    def group_bytes(self) -> int:
        return GROUP + self.k

    @property
    def torch_dtype(self) -> torch.dtype:
        return SOURCE_DTYPES[self.dtype]

    def stored_shapes(self) -> dict[str, tuple[int, int]]:
        """Expected shape of each stored tensor, by suffix (FORMAT §2)."""
        rows, cols = self.shape
        return {
            DATA_SUFFIX: (rows, self.groups * self.group_bytes),
            MASK_SUFFIX: (rows, self.groups),
            SCALE_SUFFIX: (rows, cols // self.block),
        }

    @property
    def stored_bytes(self) -> int:
        shapes = self.stored_shapes()
        d, m, s = (shapes[x][0] * shapes[x][1] for x in SUFFIXES)
        return d + m + 4 * s

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.stored_bytes / (self.shape[0] * self.shape[1])

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "k": self.k,
            "lo": self.lo.value,
            "hi": self.hi.value,
            "block": self.block,
            "selection": self.selection,
            "scale_rule": self.scale_rule,
            "crc32": {key: int(self.crc32[key]) for key in ("data", "mask", "scale")},
        }

    @classmethod
    def from_json(cls, obj: Any, *, tensor: str | None = None) -> "TensorSpec":
        """Parse and validate one entry; every violation names the rule (FORMAT §7)."""

        def fail(message: str, rule: str) -> UMQError:
            return UMQError(message, rule=rule, tensor=tensor)

        if not isinstance(obj, Mapping):
            raise fail("umq.tensors entry is not a JSON object", "spec")
        missing = {"shape", "dtype", "k", "lo", "hi", "block", "selection", "crc32"} - set(obj)
        if missing:
            raise fail(f"umq.tensors entry lacks {sorted(missing)}", "spec")
        shape = obj["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) != 2
            or not all(isinstance(x, int) and x > 0 for x in shape)
        ):
            raise fail(f"shape must be two positive integers, got {shape!r}", "shape")
        rows, cols = shape
        if cols % GROUP:
            raise fail(f"column count {cols} is not a multiple of 8", "shape")
        if not isinstance(obj["dtype"], str) or obj["dtype"] not in SOURCE_DTYPES:
            raise fail(f"unknown dtype {obj['dtype']!r}", "dtype")
        k = obj["k"]
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= GROUP:
            raise fail(f"k must be an integer in 0..8, got {k!r}", "k")
        try:
            lo = LoFormat(obj["lo"])
        except ValueError:
            raise fail(f"unknown lo encoding {obj['lo']!r}", "lo") from None
        try:
            hi = HiFormat(obj["hi"])
        except ValueError:
            raise fail(f"unknown hi encoding {obj['hi']!r}", "hi") from None
        block = obj["block"]
        if not isinstance(block, int) or block <= 0 or block % GROUP or cols % block:
            raise fail(
                f"block {block!r} must be a positive multiple of 8 dividing {cols}", "block"
            )
        scale_rule = obj.get("scale_rule", ScaleRule.ABSMAX.value)
        if not isinstance(obj["selection"], str) or not isinstance(scale_rule, str):
            raise fail("selection and scale_rule must be strings", "spec")
        crc = obj["crc32"]
        if not isinstance(crc, Mapping) or set(crc) != {"data", "mask", "scale"} or not all(
            isinstance(v, int) and 0 <= v < 2**32 for v in crc.values()
        ):
            raise fail("crc32 must hold u32 values for data, mask and scale", "crc32")
        return cls(
            shape=(rows, cols),
            dtype=obj["dtype"],
            k=k,
            lo=lo,
            hi=hi,
            block=block,
            selection=obj["selection"],
            scale_rule=scale_rule,
            crc32=dict(crc),
        )


def entry_crc32(entry: Any) -> int:
    """CRC-32 of one ``umq.tensors`` entry in its canonical JSON (keys sorted, no spaces,
    ASCII): the same for any spacing or key order a writer chose."""
    canonical = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return zlib.crc32(canonical.encode("ascii"))


def encode_metadata(
    specs: Mapping[str, TensorSpec], extra: Mapping[str, str] | None = None, *, widest: bool = False
) -> dict[str, str]:
    """The safetensors ``__metadata__`` of a packed file (FORMAT §1), with the entries'
    checksums (``umq.tensors.crc32``). ``widest``: every checksum at its largest value,
    for a writer reserving header room before the real ones are known."""
    meta = dict(extra or {})
    meta[META_FORMAT] = "pt"
    meta[META_VERSION] = str(FORMAT_VERSION)
    entries = {name: spec.to_json() for name, spec in specs.items()}
    meta[META_TENSORS] = json.dumps(entries, separators=(",", ":"))
    meta[META_TENSORS_CRC] = json.dumps(
        {name: 2**32 - 1 if widest else entry_crc32(entry) for name, entry in entries.items()},
        separators=(",", ":"),
    )
    return meta


def decode_metadata(metadata: Mapping[str, str] | None, *, file: str | None = None) -> dict[str, TensorSpec]:
    """Parse the ``umq.tensors`` of a header; an empty dict for a plain checkpoint.

    Refuses an unknown ``umq.version`` and any malformed entry (FORMAT §7).
    """
    metadata = metadata or {}
    if META_VERSION not in metadata and META_TENSORS not in metadata:
        return {}
    version = metadata.get(META_VERSION)
    if version != str(FORMAT_VERSION):
        raise UMQError(
            f"umq.version {version!r} is not supported (this reader knows {FORMAT_VERSION})",
            rule="version",
            file=file,
        )
    try:
        entries = json.loads(metadata.get(META_TENSORS, "{}"))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise UMQError(f"umq.tensors is not valid JSON ({exc})", rule="spec", file=file) from None
    if not isinstance(entries, dict):
        raise UMQError("umq.tensors is not a JSON object", rule="spec", file=file)
    specs = {}
    for name, entry in entries.items():
        try:
            specs[name] = TensorSpec.from_json(entry, tensor=name)
        except UMQError as exc:
            raise exc.located(file=file)
    # After the entries' own rules, which say more precisely what is wrong.
    if META_TENSORS_CRC in metadata:
        _check_entry_checksums(entries, metadata[META_TENSORS_CRC], file)
    return specs


def _check_entry_checksums(entries: Mapping[str, Any], text: str, file: str | None) -> None:
    """``umq.tensors.crc32``, when a writer stored it: an object giving every entry's
    :func:`entry_crc32`, each matching (rule ``spec-crc32``)."""
    try:
        checksums = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        checksums = None
    if not isinstance(checksums, dict) or set(checksums) != set(entries):
        raise UMQError(
            f"{META_TENSORS_CRC} must be a JSON object with one CRC-32 per umq.tensors entry",
            rule="spec-crc32", file=file,
        )
    for name, entry in entries.items():
        actual = entry_crc32(entry)
        if type(checksums[name]) is not int or checksums[name] != actual:
            raise UMQError(
                f"umq.tensors entry has CRC-32 {actual}, {META_TENSORS_CRC} says {checksums[name]!r}: "
                "the header is corrupted",
                rule="spec-crc32", file=file, tensor=name,
            )
