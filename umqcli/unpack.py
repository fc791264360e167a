"""Decode a packed checkpoint back to plain safetensors that any runtime loads.

``unpack(src, out)`` reads a packed ``.safetensors`` file or a packed Hugging Face model
directory (written by ``umq pack``) and writes the same tensor names and shapes, each
quantized tensor decoded (FORMAT §4) to its source dtype (or the ``dtype`` asked for),
every other tensor copied byte for byte. A directory is mirrored: the same shard file
names, a rewritten ``model.safetensors.index.json``, ``config.json`` without its
``quantization_config``, and the other files (tokenizer, ...) copied.

Memory stays bounded whatever the model size: tensors are read one at a time, pass-through
tensors are copied in chunks, and a quantized tensor is read, validated and decoded a slab
of rows at a time, each slab written as soon as it is decoded (peak: one slab's
temporaries, ~40 bytes x ``SLAB_ELEMENTS``). Output goes to a temporary
path renamed into place only when everything succeeded (io.atomic_output).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from .codec import PackedTensor, dequantize
from .errors import UMQError
from .format import (
    DATA_SUFFIX,
    MASK_SUFFIX,
    META_TENSORS,
    META_VERSION,
    SCALE_SUFFIX,
    SOURCE_DTYPES,
    SUFFIXES,
    TensorSpec,
)
from .io import (
    CONFIG_NAME,
    INDEX_NAME,
    Checkpoint,
    SafetensorsWriter,
    atomic_output,
    check_output_path,
    copy_auxiliary_files,
    open_checkpoint,
    write_config,
    write_index,
)

DTYPE_CHOICES = ("source", "float16", "bfloat16", "float32")
# Elements decoded per slab: the decode's temporaries (int64 byte offsets, float32 values,
# masks) take ~40 bytes per element, so a slab costs ~170 MB whatever the tensor size.
SLAB_ELEMENTS = 4 * 1024 * 1024

Progress = Callable[[str, int, int, int], None]
"""``progress(tensor_name, tensors_done, tensors_total, bytes_written)``, called after
each output tensor."""


@dataclass
class UnpackReport:
    """What :func:`unpack` wrote.

    - ``decoded``: quantized tensor name -> (source dtype, written dtype, shape).
    - ``passthrough``: names copied byte for byte.
    - ``files``: output files (relative to ``out`` for a directory).
    - ``bytes_in`` / ``bytes_out``: tensor data bytes read and written.
    """

    src: str
    out: str
    dtype: str
    decoded: dict[str, tuple[str, str, list[int]]] = field(default_factory=dict)
    passthrough: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0

    def to_json(self) -> dict:
        return {
            "src": self.src,
            "out": self.out,
            "dtype": self.dtype,
            "tensors_decoded": len(self.decoded),
            "tensors_passthrough": len(self.passthrough),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "files": self.files,
            "copied": self.copied,
            "decoded": {
                name: {"source_dtype": s, "dtype": d, "shape": shape}
                for name, (s, d, shape) in self.decoded.items()
            },
            "passthrough": self.passthrough,
        }


def target_dtype(spec: TensorSpec, dtype: str) -> torch.dtype:
    """The dtype a quantized tensor is written in: its source dtype for ``"source"``."""
    return spec.torch_dtype if dtype == "source" else SOURCE_DTYPES[dtype]


def unpack(
    src: str | Path,
    out: str | Path,
    *,
    dtype: str = "source",
    force: bool = False,
    progress: Progress | None = None,
) -> UnpackReport:
    """Decode the packed checkpoint ``src`` (file or model directory) into ``out``.

    ``dtype``: ``"source"`` (each tensor's recorded source dtype) or ``"float16"`` /
    ``"bfloat16"`` / ``"float32"`` for every decoded tensor; pass-through tensors are
    always copied unchanged. Raises :class:`UMQError` for a checkpoint that is not packed
    (rule ``not-packed``), any FORMAT violation or crc mismatch, ``out`` equal to or
    inside ``src`` and an existing ``out`` without ``force``; nothing is left at ``out``
    then and ``src`` is never modified.
    """
    if dtype not in DTYPE_CHOICES:
        raise UMQError(f"unknown dtype {dtype!r} (one of: {', '.join(DTYPE_CHOICES)})", rule="dtype")
    src, out = Path(src), Path(out)
    with open_checkpoint(src) as checkpoint:
        checkpoint.require_packed()
        check_output_path(src, out, force=force)
        report = UnpackReport(src=str(src), out=str(out), dtype=dtype)
        counter = _Counter(progress, len(checkpoint.passthrough_names()) + len(checkpoint.specs))
        if checkpoint.is_dir:
            with atomic_output(out, directory=True, force=force) as tmp:
                _unpack_dir(checkpoint, tmp, dtype, report, counter)
        else:
            with atomic_output(out, force=force) as tmp:
                _unpack_file(checkpoint, checkpoint.files[0], tmp, dtype, report, counter)
                report.files.append(out.name)
    return report


class _Counter:
    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = total
        self.tensors = 0
        self.bytes = 0

    def done(self, name: str, nbytes: int) -> None:
        self.tensors += 1
        self.bytes += nbytes
        if self.progress is not None:
            self.progress(name, self.tensors, self.total, self.bytes)


def _unpack_dir(checkpoint: Checkpoint, tmp: Path, dtype: str, report: UnpackReport, counter: _Counter) -> None:
    weight_map: dict[str, str] = {}
    total_size = 0
    for file in checkpoint.files:
        rel = checkpoint.relative_name(file)
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        names = _unpack_file(checkpoint, file, target, dtype, report, counter)
        report.files.append(rel)
        for name, nbytes in names.items():
            weight_map[name] = rel
            total_size += nbytes
    if checkpoint.index is not None:
        write_index(tmp, weight_map, total_size, base=checkpoint.index)
        report.files.append(INDEX_NAME)
    if write_config(checkpoint.root, tmp, None) is not None:  # None: drop quantization_config
        report.files.append(CONFIG_NAME)
    skip = [checkpoint.relative_name(f) for f in checkpoint.files] + [INDEX_NAME, CONFIG_NAME]
    copied, _ = copy_auxiliary_files(checkpoint.root, tmp, skip=skip)
    report.copied.extend(copied)


def _unpack_file(
    checkpoint: Checkpoint,
    file: Path,
    target: Path,
    dtype: str,
    report: UnpackReport,
    counter: _Counter,
) -> dict[str, int]:
    """Write the dense twin of one packed file; returns output name -> data bytes."""
    header = checkpoint.headers[file]
    specs = {name: spec for name, spec in checkpoint.specs.items() if checkpoint.spec_files[name] == file}
    parts = {name + suffix for name in specs for suffix in SUFFIXES}
    for name in specs:
        if name in header.entries:
            raise UMQError(
                "stored both as a plain tensor and as a quantized one: the dense file would hold it twice",
                rule="duplicate-tensor",
                file=file,
                tensor=name,
            )
    layout: list[tuple[str, torch.dtype | str, tuple[int, ...]]] = []
    for name, entry in header.entries.items():
        if name in parts:
            continue
        layout.append((name, entry.dtype, entry.shape))
    for name, spec in specs.items():
        layout.append((name, target_dtype(spec, dtype), spec.shape))
    # The dense file keeps the source's metadata (format: pt, ...) minus every umq key
    # (umq.version, umq.tensors and any a later writer adds): it is no longer packed.
    metadata = {k: v for k, v in header.metadata.items() if k not in (META_VERSION, META_TENSORS) and not k.startswith("umq.")}
    written: dict[str, int] = {}
    with SafetensorsWriter(target, layout, metadata_reserve=metadata) as writer:
        for name, entry in header.entries.items():
            if name in parts:
                continue
            writer.write_bytes(name, checkpoint.iter_bytes(name))
            written[name] = entry.nbytes
            report.passthrough.append(name)
            report.bytes_in += entry.nbytes
            counter.done(name, entry.nbytes)
        for name, spec in specs.items():
            out_dtype = target_dtype(spec, dtype)
            writer.write_bytes(name, _decoded_slabs(checkpoint, name, spec, out_dtype, file))
            nbytes = spec.rows * spec.columns * out_dtype.itemsize
            written[name] = nbytes
            report.decoded[name] = (spec.dtype, str(out_dtype).removeprefix("torch."), list(spec.shape))
            report.bytes_in += spec.stored_bytes
            counter.done(name, nbytes)
        writer.close(metadata)
    report.bytes_out += sum(written.values())
    return written


def _all_finite(values: torch.Tensor) -> bool:
    """``isfinite(values).all()`` in one reduction pass: min and max propagate NaN, and an
    infinity is the min or the max (several times faster than ``torch.isfinite``)."""
    low, high = torch.aminmax(values)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def _checked_decode(slab: PackedTensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """Decode one slab to ``dtype`` after checking every FORMAT §7 per-element rule
    (popcount, scales, lo codes; the crc32s are chained over slabs by the caller). A
    non-finite decoded value is then a value beyond ``dtype``'s range."""
    slab.validate(name=name, check_crc=False)
    dense = dequantize(slab, dtype).contiguous()
    if not _all_finite(dense):
        r, c = (~torch.isfinite(dense)).nonzero()[0].tolist()
        raise UMQError(
            f"decoded value at [{r}, {c}] is {dense[r, c].item()} in {str(dtype).removeprefix('torch.')} "
            f"(beyond its range)",
            rule="non-finite", hint="unpack with dtype float32 or source",
            tensor=name,
        )
    return dense


def _decoded_slabs(
    checkpoint: Checkpoint, name: str, spec: TensorSpec, dtype: torch.dtype, file: Path
) -> Iterator[memoryview]:
    """The decoded tensor's bytes (row-major), one slab of rows at a time, read straight
    from the file: only one slab (packed and decoded) is in memory at once. The stored
    shapes were checked against the spec when the checkpoint was opened.

    Each slab is checked against every per-element rule (popcount, scales, lo codes)
    before it is decoded; the crc32s are chained over the slabs and compared at the end,
    so a corrupted tensor fails the run (and the atomic output removes what was written).
    """
    rows_per_slab = max(1, SLAB_ELEMENTS // spec.columns)
    running = {"data": 0, "mask": 0, "scale": 0}
    for start in range(0, spec.rows, rows_per_slab):
        stop = min(start + rows_per_slab, spec.rows)
        parts = {
            key: checkpoint.get(name + suffix, rows=(start, stop))
            for key, suffix in (("data", DATA_SUFFIX), ("mask", MASK_SUFFIX), ("scale", SCALE_SUFFIX))
        }
        for key, tensor in parts.items():
            running[key] = zlib.crc32(tensor.reshape(-1).view(torch.uint8).numpy(), running[key])
        slab = PackedTensor.from_stored(
            dataclasses.replace(spec, shape=(stop - start, spec.columns)), parts["data"], parts["mask"], parts["scale"]
        )
        try:
            dense = _checked_decode(slab, dtype, name)
        except UMQError as exc:
            exc.message = f"rows {start}..{stop - 1}: {exc.message}"
            raise exc.located(file=file)
        yield memoryview(dense.view(torch.uint8).reshape(-1).numpy())
    for key, actual in running.items():
        if actual != spec.crc32.get(key):
            raise UMQError(
                f"crc32 of {key} is {actual}, header says {spec.crc32.get(key)}: the file is corrupted",
                rule="crc32",
                file=file,
                tensor=name,
            )


__all__ = ["DTYPE_CHOICES", "UnpackReport", "target_dtype", "unpack"]
