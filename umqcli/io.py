"""safetensors on disk: validated headers, lazy checkpoints, a streaming writer, atomic output.

Nothing here quantizes or prints. The pieces:

- :func:`read_header` parses and validates one file's header (truncated file, lying
  offsets, sizes that do not match dtype x shape, a file that is not safetensors at all)
  without reading any tensor data.
- :func:`open_checkpoint` gives a context-managed :class:`Checkpoint` over one
  ``.safetensors`` file or a Hugging Face model directory (``model.safetensors``, or shards
  listed by ``model.safetensors.index.json``; index entries that leave the directory are
  refused). Tensors are read one at a time, on demand.
- :class:`SafetensorsWriter` writes a safetensors file one tensor at a time: the layout
  (names, dtypes, shapes) is fixed up front, so every tensor's offset is known before any
  data exists; the header, whose metadata (crc32s) is only known at the end, goes into a
  space reserved for its largest possible size and is padded with spaces. Peak memory is
  the tensor being written, whatever the file size.
- :func:`atomic_output` yields a temporary path next to the output and renames it into
  place only when the block succeeds; any exception (``KeyboardInterrupt`` included)
  removes it.
- Directory helpers shared by ``pack`` and ``unpack``: :func:`copy_auxiliary_files`,
  :func:`write_index`, :func:`write_config`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Mapping, Sequence

import torch

from .codec import PackedTensor
from .errors import UMQError
from .format import DATA_SUFFIX, MASK_SUFFIX, META_TENSORS, SCALE_SUFFIX, SUFFIXES, TensorSpec, decode_metadata

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Headers above this are refused: real ones are a few MB, and a lying length field must
# not make us allocate gigabytes (safetensors' own limit is 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Files that hold weights in other formats; a mirrored directory does not copy them
# (they would hold the unquantized weights next to the packed ones).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
_COPY_CHUNK = 16 * 1024 * 1024

# safetensors dtype code -> (bytes per element, torch dtype or None when torch lacks it)
DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "BOOL": (1, torch.bool),
    "U8": (1, torch.uint8),
    "I8": (1, torch.int8),
    "F8_E5M2": (1, torch.float8_e5m2),
    "F8_E4M3": (1, torch.float8_e4m3fn),
    "F8_E8M0": (1, getattr(torch, "float8_e8m0fnu", None)),
    "I16": (2, torch.int16),
    "U16": (2, getattr(torch, "uint16", None)),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "I32": (4, torch.int32),
    "U32": (4, getattr(torch, "uint32", None)),
    "F32": (4, torch.float32),
    "C64": (8, torch.complex64),
    "F64": (8, torch.float64),
    "I64": (8, torch.int64),
    "U64": (8, getattr(torch, "uint64", None)),
}
# safetensors' Dtype enum order; save_file lays tensors out by descending rank, then name,
# which keeps every tensor aligned to its element size. The writer does the same, so for
# equal inputs its files are byte-identical to save_file's.
_DTYPE_RANK = {code: rank for rank, code in enumerate(
    ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16",
     "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"])}
TORCH_TO_CODE = {dtype: code for code, (_, dtype) in DTYPES.items() if dtype is not None}


def dtype_code(dtype: torch.dtype | str) -> str:
    """safetensors' code (``"F32"``, ``"BF16"`` ...) of a torch dtype or a code."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UMQError(f"unknown safetensors dtype {dtype!r}", rule="header-dtype")
        return dtype
    try:
        return TORCH_TO_CODE[dtype]
    except KeyError:
        raise UMQError(f"dtype {dtype} cannot be stored in safetensors", rule="header-dtype") from None


# --------------------------------------------------------------------------- header


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: where its bytes are.

    ``start``/``end`` are absolute byte offsets in ``file`` (header included), so
    ``end - start == nbytes == prod(shape) * itemsize``.
    """

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = DTYPES[self.dtype][1]
        if dtype is None:
            raise UMQError(
                f"dtype {self.dtype} has no torch equivalent in this torch version",
                rule="header-dtype", file=self.file, tensor=self.name,
            )
        return dtype


@dataclass(frozen=True)
class Header:
    """A validated safetensors header: tensors in file order and ``__metadata__``."""

    file: Path
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int  # 8 + header length
    file_size: int


def read_header(path: str | Path) -> Header:
    """Parse and validate the header of one safetensors file without reading tensor data.

    Refuses, with :class:`UMQError` naming the file and the rule: a missing file
    (``missing``), a file too short for its header (``truncated``), a header that is not
    a JSON object of entries, or whose ``__metadata__`` is not an object of strings
    (``not-safetensors``), unknown dtypes (``header-dtype``), bad shapes
    (``header-shape``), offsets outside the file or overlapping (``header-offsets``), and
    a byte size that is not ``prod(shape) * itemsize`` (``header-size``).
    """
    path = Path(path)
    header_len, file_size, raw = _read_header_bytes(path)
    header = _parse_header_json(raw, path)
    metadata = _header_metadata(header.pop("__metadata__", None), path)
    data_start = 8 + header_len
    entries = {
        name: _header_entry(name, info, path, data_start, file_size - data_start)
        for name, info in header.items()
    }
    _check_no_overlap(entries.values(), path)
    return Header(file=path, entries=entries, metadata=metadata, data_start=data_start, file_size=file_size)


def _read_header_bytes(path: Path) -> tuple[int, int, bytes]:
    """(header length, file size, the header's raw bytes); the length field is checked
    against a limit and the file size before anything of that size is read."""
    if not path.exists():
        raise UMQError("no such file", rule="missing", file=path)
    if path.is_dir():
        raise UMQError("is a directory, expected a .safetensors file", rule="not-safetensors", file=path)
    file_size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise UMQError(
                f"{file_size} bytes: too short for a safetensors header (needs 8 + header)",
                rule="truncated", file=path,
            )
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise UMQError(
                f"header length field says {header_len} bytes (limit {MAX_HEADER_BYTES}): "
                "not a safetensors file",
                rule="not-safetensors", file=path,
            )
        if 8 + header_len > file_size:
            raise UMQError(
                f"header needs {8 + header_len} bytes but the file has {file_size}",
                rule="truncated", file=path,
            )
        return header_len, file_size, fh.read(header_len)


def _parse_header_json(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UMQError("header is not UTF-8 JSON: not a safetensors file", rule="not-safetensors", file=path) from None
    if not isinstance(header, dict):
        raise UMQError("header is not a JSON object: not a safetensors file", rule="not-safetensors", file=path)
    return header


def _header_metadata(metadata: Any, path: Path) -> dict[str, str]:
    """``__metadata__``: absent or null means none; anything else must be an object of
    strings (``""``, ``[]``, ``0`` or ``false`` are not "no metadata": safetensors itself
    refuses them, so a umq reader must too)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise UMQError(
            f"__metadata__ must be an object mapping strings to strings, got {type(metadata).__name__}",
            rule="not-safetensors", file=path,
        )
    return dict(metadata)


def _header_entry(name: str, info: Any, path: Path, data_start: int, data_size: int) -> TensorEntry:
    """One header entry, validated: dtype, shape, offsets inside the data, size."""

    def bad(message: str, rule: str) -> UMQError:
        return UMQError(message, rule=rule, file=path, tensor=name)

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise bad("entry lacks dtype / shape / data_offsets", "not-safetensors")
    code = info["dtype"]
    if not isinstance(code, str) or code not in DTYPES:
        raise bad(f"unknown dtype {code!r}", "header-dtype")
    shape = info["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise bad(f"shape {shape!r} is not a list of non-negative integers", "header-shape")
    offsets = info["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise bad(f"data_offsets {offsets!r} are not two ordered non-negative integers", "header-offsets")
    begin, end = offsets
    if end > data_size:
        raise bad(
            f"data_offsets [{begin}, {end}] run past the end of the data ({data_size} bytes): "
            "truncated or lying header",
            "header-offsets",
        )
    numel = 1
    for d in shape:
        numel *= d
    expected = numel * DTYPES[code][0]
    if end - begin != expected:
        raise bad(
            f"data_offsets [{begin}, {end}] hold {end - begin} bytes but {code}{shape} needs {expected}",
            "header-size",
        )
    return TensorEntry(name, path, code, tuple(shape), data_start + begin, data_start + end)


def _check_no_overlap(entries: Iterable[TensorEntry], path: Path) -> None:
    spans = sorted((e.start, e.end, e.name) for e in entries)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise UMQError(
                f"bytes [{b1}, {min(e0, e1)}] are claimed by both '{n0}' and '{n1}'",
                rule="header-offsets", file=path, tensor=n1,
            )


# --------------------------------------------------------------------------- checkpoint


class Checkpoint:
    """A lazy view of one safetensors file or a Hugging Face model directory.

    Stored names (``names()``) are what the files hold; for a packed checkpoint the
    quantized tensors appear as their three ``NAME.umq_*`` parts, ``specs`` maps each
    source ``NAME`` to its :class:`TensorSpec` and ``passthrough_names()`` lists the rest.
    Use as a context manager (or call :meth:`close`) to release file handles.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.is_dir = self.path.is_dir()
        self.index: dict[str, Any] | None = None
        self._handles: dict[Path, BinaryIO] = {}
        self._lock = threading.Lock()
        if self.is_dir:
            files = self._resolve_dir()
        else:
            if not self.path.exists():
                raise UMQError("no such file or directory", rule="missing", file=self.path)
            files = [self.path]
        self.headers: dict[Path, Header] = {f: read_header(f) for f in files}
        self.files: list[Path] = files
        self._entries: dict[str, TensorEntry] = {}
        for header in self.headers.values():
            for name, entry in header.entries.items():
                if name in self._entries:
                    raise UMQError(
                        f"tensor stored twice: in {self._entries[name].file.name} and {entry.file.name}",
                        rule="duplicate-tensor", file=entry.file, tensor=name,
                    )
                self._entries[name] = entry
        if self.index is not None:
            self._check_index()
        self.specs: dict[str, TensorSpec] = {}
        self.spec_files: dict[str, Path] = {}
        for f, header in self.headers.items():
            for name, spec in decode_metadata(header.metadata, file=f).items():
                for suffix in SUFFIXES:
                    part = header.entries.get(name + suffix)
                    if part is None:
                        raise UMQError(
                            f"umq.tensors lists it but '{name + suffix}' is not in the same file",
                            rule="stored-missing", file=f, tensor=name,
                        )
                if name in self.specs:
                    raise UMQError("quantized tensor listed in two files", rule="duplicate-tensor", file=f, tensor=name)
                self.specs[name] = spec
                self.spec_files[name] = f
        self._check_stored_parts()

    def require_packed(self) -> None:
        """Raise ``UMQError`` (rule ``not-packed``) when no header lists a quantized
        tensor: the one test every reader of packed checkpoints (inspect, verify, unpack)
        applies, so a plain checkpoint is refused the same way everywhere."""
        if not self.specs:
            raise not_packed(self.path)

    # -- construction helpers
    def _resolve_dir(self) -> list[Path]:
        index_path = self.path / INDEX_NAME
        if index_path.exists():
            self.index, shards = read_index(index_path)
            files: list[Path] = []
            for tensor, shard in shards.items():
                if not shard.exists():
                    raise UMQError(f"index points to '{self.index['weight_map'][tensor]}', which does not exist",
                                   rule="index-missing", file=index_path, tensor=tensor)
                if shard not in files:
                    files.append(shard)
            _check_unlisted_shards(self.path, files, index_path)
            return sorted(files)
        single = self.path / SINGLE_NAME
        if single.exists():
            return [single]
        candidates = sorted(p for p in self.path.glob("*.safetensors") if p.is_file())
        if len(candidates) == 1:
            return candidates
        if not candidates:
            raise UMQError("directory holds no .safetensors file", rule="missing", file=self.path)
        raise UMQError(
            f"{len(candidates)} .safetensors files but no {INDEX_NAME} says which belong to the model",
            rule="index-missing", file=self.path,
        )

    def _check_index(self) -> None:
        index_path = self.path / INDEX_NAME
        root = self.path
        weight_map = self.index["weight_map"]
        for tensor, rel in weight_map.items():
            entry = self._entries.get(tensor)
            shard = _safe_child(root, rel, index_path, tensor)
            if entry is None or entry.file != shard:
                raise UMQError(
                    f"index maps it to '{rel}' but that file does not hold it",
                    rule="index-mismatch", file=index_path, tensor=tensor,
                )
        for name, entry in self._entries.items():
            if name not in weight_map:
                raise UMQError(f"stored in {entry.file.name} but missing from the index",
                               rule="index-mismatch", file=index_path, tensor=name)

    def _check_stored_parts(self) -> None:
        """Header-only FORMAT §2 rules, checked before any reader sizes anything from a
        spec: each quantized tensor's three stored tensors have the dtype and shape its
        spec implies (``stored-dtype`` / ``stored-shape``), and no ``NAME.umq_*`` tensor is
        stored without a ``umq.tensors`` entry claiming it (``orphan``: it would otherwise
        pass as a dense tensor of raw packed bytes)."""
        claimed: set[str] = set()
        for name, spec in self.specs.items():
            expected = spec.stored_shapes()
            for suffix, stored_code in ((DATA_SUFFIX, "U8"), (MASK_SUFFIX, "U8"), (SCALE_SUFFIX, "F32")):
                entry = self._entries[name + suffix]
                claimed.add(entry.name)
                if entry.dtype != stored_code or entry.shape != expected[suffix]:
                    raise UMQError(
                        f"{suffix[1:]} is stored as {entry.dtype}{list(entry.shape)}, expected "
                        f"{stored_code}{list(expected[suffix])} for shape {list(spec.shape)}, k={spec.k}, "
                        f"block={spec.block}",
                        rule="stored-shape" if entry.dtype == stored_code else "stored-dtype",
                        file=self.spec_files[name], tensor=name,
                    )
        for name, entry in self._entries.items():
            if name.endswith(SUFFIXES) and name not in claimed:
                source = name.rsplit(".", 1)[0]
                raise UMQError(f"'{name}' is stored but umq.tensors has no entry for it", rule="orphan",
                               file=entry.file, tensor=source)

    # -- context management
    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    # -- queries
    @property
    def root(self) -> Path:
        """The directory holding the files (the file's parent for a single file)."""
        return self.path if self.is_dir else self.path.parent

    @property
    def metadata(self) -> dict[str, str]:
        """The files' ``__metadata__`` merged (first file wins), ``umq.tensors`` left out
        (parsed into :attr:`specs`)."""
        merged: dict[str, str] = {}
        for header in self.headers.values():
            for key, value in header.metadata.items():
                if key != META_TENSORS:
                    merged.setdefault(key, value)
        return merged

    def names(self) -> list[str]:
        """Every stored tensor name, file by file in header order."""
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise UMQError("no such tensor in the checkpoint", rule="missing-tensor",
                           file=self.path, tensor=name) from None

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(torch dtype, shape) of a stored tensor, from the header alone."""
        entry = self.entry(name)
        return entry.torch_dtype, entry.shape

    def passthrough_names(self) -> list[str]:
        """Stored names that are not part of a quantized tensor."""
        parts = {name + suffix for name in self.specs for suffix in SUFFIXES}
        return [name for name in self._entries if name not in parts]

    def file_of(self, name: str) -> Path:
        return self.entry(name).file

    def relative_name(self, file: Path) -> str:
        """A file's name relative to the model directory, as the index spells it
        (output shards mirror these names)."""
        return file.relative_to(self.path).as_posix() if self.is_dir else file.name

    def _handle(self, file: Path) -> BinaryIO:
        with self._lock:  # worker threads read concurrently; open each file once
            handle = self._handles.get(file)
            if handle is None:
                handle = self._handles[file] = open(file, "rb")
            return handle

    def _read_into(self, entry: TensorEntry, offset: int, buffer: torch.Tensor) -> None:
        """Fill uint8 ``buffer`` from ``entry``'s bytes starting ``offset`` bytes in.

        Positional reads (``preadv``), so worker threads can read while others write.
        """
        view = memoryview(buffer.numpy())
        fd = self._handle(entry.file).fileno()
        position, done = entry.start + offset, 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], position + done)
            if got <= 0:
                raise UMQError(
                    f"read {done} of {len(view)} bytes: the file changed or was truncated",
                    rule="truncated", file=entry.file, tensor=entry.name,
                )
            done += got

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The stored tensor read now into memory of its own (dtype and shape as stored).

        ``rows=(r0, r1)`` reads only rows ``r0:r1`` of the first axis (a contiguous byte
        range in row-major storage), so a large matrix can be processed in slabs.
        """
        entry = self.entry(name)
        dtype = entry.torch_dtype
        shape = entry.shape
        offset, nbytes = 0, entry.nbytes
        if rows is not None:
            r0, r1 = rows
            if not shape or not 0 <= r0 <= r1 <= shape[0]:
                raise ValueError(f"rows {rows} out of range for shape {list(shape)}")
            row_bytes = nbytes // shape[0] if shape[0] else 0
            offset, nbytes = r0 * row_bytes, (r1 - r0) * row_bytes
            shape = (r1 - r0, *shape[1:])
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            self._read_into(entry, offset, buffer)
        return buffer.view(dtype).view(shape)

    def iter_bytes(self, name: str, chunk: int = _COPY_CHUNK) -> Iterator[memoryview]:
        """The stored bytes of a tensor in chunks of at most ``chunk`` bytes (for copies
        that must not hold a whole tensor, and for dtypes torch lacks)."""
        entry = self.entry(name)
        buffer = torch.empty(min(chunk, entry.nbytes), dtype=torch.uint8)
        offset = 0
        while offset < entry.nbytes:
            part = buffer[: min(chunk, entry.nbytes - offset)]
            self._read_into(entry, offset, part)
            offset += part.numel()
            yield memoryview(part.numpy())

    def packed(self, name: str, *, check_crc: bool = True) -> PackedTensor:
        """The quantized tensor ``name`` (a key of :attr:`specs`), validated against every
        FORMAT §7 rule (crc32 included unless ``check_crc=False``)."""
        spec = self.specs.get(name)
        if spec is None:
            raise UMQError("not a quantized tensor of this checkpoint", rule="missing-tensor",
                           file=self.path, tensor=name)
        packed = PackedTensor.from_stored(
            spec, self.get(name + DATA_SUFFIX), self.get(name + MASK_SUFFIX), self.get(name + SCALE_SUFFIX)
        )
        try:
            packed.validate(name=name, check_crc=check_crc)
        except UMQError as exc:
            raise exc.located(file=self.spec_files[name])
        return packed


def not_packed(path: str | Path) -> UMQError:
    """The refusal of a checkpoint without a quantized tensor, alike from every reader."""
    return UMQError("not a packed checkpoint: no quantized tensor (umq.tensors is empty or missing)",
                    rule="not-packed", file=path)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a ``.safetensors`` file or a Hugging Face model directory (see :class:`Checkpoint`)."""
    return Checkpoint(path)


def read_index(index_path: str | Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """``model.safetensors.index.json`` and each tensor's shard path, held to the index
    rules that need no shard (``index``: JSON with a ``weight_map`` object of strings;
    ``index-path``: every entry inside the index's directory). The shards' presence and
    contents are :class:`Checkpoint`'s to check."""
    index_path = Path(index_path)
    index = _load_index(index_path)
    return index, {tensor: _safe_child(index_path.parent, rel, index_path, tensor)
                   for tensor, rel in index["weight_map"].items()}


def _load_index(index_path: Path) -> dict[str, Any]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UMQError(f"not valid JSON ({exc})", rule="index", file=index_path) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise UMQError("needs a \"weight_map\" object mapping tensor names to file names",
                       rule="index", file=index_path)
    return index


def _check_unlisted_shards(root: Path, listed: Sequence[Path], index_path: Path) -> None:
    """Refuse a ``.safetensors`` file beside the index that the index leaves out but that
    holds packed tensors (``index-unlisted``): its quantized weights would be missing
    from every reader's view of the model. Unlisted files without umq content (or that
    are not safetensors at all) are not part of the model and stay ignored."""
    for candidate in sorted(root.glob("*.safetensors")):
        if candidate in listed or not candidate.is_file():
            continue
        try:
            header = read_header(candidate)
        except UMQError:
            continue
        packed_names = [name for name in header.entries if name.endswith(SUFFIXES)]
        if META_TENSORS in header.metadata or packed_names:
            raise UMQError(
                f"{candidate.name} holds packed tensors but the index does not list it",
                rule="index-unlisted", file=index_path, tensor=packed_names[0] if packed_names else None,
            )


def _safe_child(root: Path, rel: str, index_path: Path, tensor: str) -> Path:
    """``root / rel`` if ``rel`` is a plain relative path that stays inside ``root``.

    The check is lexical (no absolute paths, drive letters or ``..``): symlinks the user
    placed inside the directory are followed, as the Hugging Face cache relies on them.
    """
    candidate = Path(rel)
    if not rel or candidate.is_absolute() or candidate.drive or ".." in candidate.parts or "\\" in rel:
        raise UMQError(
            f"index entry '{rel}' points outside the model directory {root}",
            rule="index-path", file=index_path, tensor=tensor,
        )
    return root / candidate


# --------------------------------------------------------------------------- writer


@dataclass(frozen=True)
class Slot:
    """One tensor of a file being written: name, safetensors dtype code, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][0]
        for d in self.shape:
            n *= d
        return n


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor, in any order, in bounded memory.

    ``layout``: every tensor the file will hold, as ``(name, dtype, shape)`` (dtype a torch
    dtype or safetensors code). Data is ordered like ``safetensors.save_file`` does (by
    dtype rank, wider first, then by name) so that every tensor is aligned to its element
    size; the header is padded to a multiple of 8. ``metadata_reserve`` is the largest
    ``__metadata__`` :meth:`close` may be given (a mapping whose JSON size is measured, or
    a byte count); space for it is reserved before the data, and the final header is padded
    with spaces to that size, so the data never moves. For a fixed layout and metadata the
    bytes are always the same.
    """

    def __init__(
        self,
        path: str | Path,
        layout: Iterable[tuple[str, torch.dtype | str, Sequence[int]]],
        *,
        metadata_reserve: Mapping[str, str] | int | None = None,
    ) -> None:
        self.path = Path(path)
        slots = [Slot(name, dtype_code(dtype), tuple(int(d) for d in shape)) for name, dtype, shape in layout]
        names = [s.name for s in slots]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in layout")
        slots.sort(key=lambda s: (-_DTYPE_RANK[s.dtype], s.name))
        self.slots = {s.name: s for s in slots}
        self.offsets: dict[str, tuple[int, int]] = {}
        position = 0
        for s in slots:
            self.offsets[s.name] = (position, position + s.nbytes)
            position += s.nbytes
        self.data_size = position
        if isinstance(metadata_reserve, int):
            reserve_bytes = metadata_reserve
        else:
            reserve_bytes = len(self._header_json(dict(metadata_reserve or {})))
        # The header's own JSON without metadata is fixed; the reserve covers the largest.
        self.header_size = _round_up(max(reserve_bytes, len(self._header_json({}))), 8)
        self.data_start = 8 + self.header_size
        self._written: dict[str, int] = {}
        self._file: BinaryIO | None = open(self.path, "wb")
        try:
            self._file.truncate(self.data_start + self.data_size)
        except BaseException:
            self._file.close()
            raise

    def _header_json(self, metadata: Mapping[str, str]) -> bytes:
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        for name, slot in self.slots.items():
            begin, end = self.offsets[name]
            header[name] = {"dtype": slot.dtype, "shape": list(slot.shape), "data_offsets": [begin, end]}
        return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On error just release the handle: the atomic output around us removes the file.
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one whole tensor (must match the layout's dtype and shape)."""
        slot = self._slot(name)
        if dtype_code(tensor.dtype) != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise ValueError(
                f"tensor '{name}' is {dtype_code(tensor.dtype)}{list(tensor.shape)}, "
                f"layout says {slot.dtype}{list(slot.shape)}"
            )
        self.write_part(name, 0, tensor)

    def write_part(self, name: str, offset: int, tensor: torch.Tensor | bytes | memoryview) -> None:
        """Write bytes of tensor ``name`` starting ``offset`` bytes into it (e.g. a slab of
        rows: ``offset = r0 * row_bytes``). Parts must not overlap; :meth:`close` checks
        that they add up to the whole tensor (:meth:`rewind` starts a tensor over)."""
        slot = self._slot(name)
        if isinstance(tensor, torch.Tensor):
            if tensor.numel() == 0:
                return
            flat = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
            data = memoryview(flat.numpy())
        else:
            data = memoryview(tensor).cast("B")
        begin, end = self.offsets[name]
        if offset < 0 or offset + len(data) > end - begin:
            raise ValueError(f"tensor '{name}': bytes [{offset}, {offset + len(data)}) outside its {end - begin}")
        assert self._file is not None, "writer is closed"
        self._file.seek(self.data_start + begin + offset)
        self._file.write(data)
        self._written[name] = self._written.get(name, 0) + len(data)
        if self._written[name] > slot.nbytes:
            raise ValueError(f"tensor '{name}': more than {slot.nbytes} bytes written (overlapping parts)")

    def write_bytes(self, name: str, chunks: Iterable[bytes | memoryview]) -> None:
        """Write one tensor from raw byte chunks in order (e.g. :meth:`Checkpoint.iter_bytes`)."""
        offset = 0
        for chunk in chunks:
            self.write_part(name, offset, chunk)
            offset += len(chunk)

    def rewind(self, name: str) -> None:
        """Forget what was written of ``name`` so it can be written again from scratch."""
        self._written.pop(name, None)

    def _slot(self, name: str) -> Slot:
        slot = self.slots.get(name)
        if slot is None:
            raise KeyError(f"tensor '{name}' is not in this writer's layout")
        return slot

    def close(self, metadata: Mapping[str, str] | None = None) -> int:
        """Write the header (with ``metadata``) and close; returns the file size.

        Every tensor of the layout must have been written.
        """
        assert self._file is not None, "writer is closed"
        missing = [name for name, slot in self.slots.items() if self._written.get(name, 0) != slot.nbytes]
        if missing:
            raise ValueError(f"{len(missing)} tensor(s) not completely written, e.g. '{missing[0]}'")
        header = self._header_json(dict(metadata or {}))
        if len(header) > self.header_size:
            raise ValueError(
                f"header of {len(header)} bytes exceeds the {self.header_size} reserved: "
                "metadata_reserve was too small"
            )
        self._file.seek(0)
        self._file.write(struct.pack("<Q", self.header_size))
        self._file.write(header + b" " * (self.header_size - len(header)))
        self._file.flush()
        self._file.close()
        self._file = None
        return self.data_start + self.data_size


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


# --------------------------------------------------------------------------- atomic output


def check_output_path(src: str | Path, out: str | Path, *, force: bool) -> None:
    """Refuse an output that would overwrite or sit inside the input, or that exists
    without ``force`` (rules ``out-is-src``, ``out-inside-src``, ``out-exists``)."""
    src_r, out_r = Path(src).resolve(), Path(out).resolve()
    if out_r == src_r:
        raise UMQError("output is the input; choose another -o", rule="out-is-src", file=out)
    if src_r.is_dir() and out_r.is_relative_to(src_r):
        raise UMQError(f"output is inside the input directory {src_r}; choose another -o",
                       rule="out-inside-src", file=out)
    if out_r.is_dir() and src_r.is_relative_to(out_r):
        raise UMQError("the input is inside the output; replacing the output would delete it", rule="out-is-src",
                       file=out)
    if Path(out).exists() or Path(out).is_symlink():
        if not force:
            raise UMQError("exists", rule="out-exists", file=out, hint="pass force=True to replace it")


@contextlib.contextmanager
def atomic_output(out: str | Path, *, directory: bool = False, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``out``; on success rename it to ``out``.

    ``directory=True`` creates a temporary directory to fill; otherwise the caller creates
    the file. An existing ``out`` is refused unless ``force`` (then replaced only after the
    new output is complete). On any exception, ``KeyboardInterrupt`` included, the
    temporary path is removed and ``out`` is left as it was.
    """
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not force:
        raise UMQError("exists", rule="out-exists", file=out, hint="pass force=True to replace it")
    parent = out.parent
    if not parent.is_dir():
        raise UMQError("the output's parent directory does not exist", rule="out-parent", file=out)
    token = uuid.uuid4().hex[:12]
    tmp = parent / f".{out.name}.umq-tmp-{token}"
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if out.exists() or out.is_symlink():
            # Move the old output aside first: rename over a non-empty directory fails.
            old = parent / f".{out.name}.umq-old-{token}"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            _remove(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# --------------------------------------------------------------------------- HF directories


def copy_auxiliary_files(src_dir: str | Path, dst_dir: str | Path, *, skip: Iterable[str | Path] = ()) -> tuple[list[str], list[str]]:
    """Copy every file of a model directory that is not a weight file (recursively,
    following symlinks as the HF cache uses them); returns (copied, skipped) relative paths.

    Skipped: ``skip`` (paths relative to ``src_dir``: the shards and index the caller
    rewrites, ``config.json`` when it rewrites that), weight files of any format
    (:data:`WEIGHT_SUFFIXES`, which would hold the unquantized weights) and dot-files.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    skip_set = {Path(p).as_posix() for p in skip}
    copied, skipped = [], []
    for path in sorted(src_dir.rglob("*")):
        rel = path.relative_to(src_dir)
        if any(part.startswith(".") for part in rel.parts) or path.is_dir():
            continue
        key = rel.as_posix()
        if key in skip_set:
            continue
        if path.name.endswith(WEIGHT_SUFFIXES) or path.name.endswith(".index.json"):
            skipped.append(key)
            continue
        target = dst_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        copied.append(key)
    return copied, skipped


def write_index(dst_dir: str | Path, weight_map: Mapping[str, str], total_size: int,
                base: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.safetensors.index.json``: ``{"metadata": {..., "total_size"},
    "weight_map": {tensor: file}}`` with tensors sorted (as transformers writes it).
    ``base`` is the source index, whose other metadata keys are kept."""
    metadata = dict((base or {}).get("metadata") or {})
    metadata["total_size"] = int(total_size)
    index = {"metadata": metadata, "weight_map": {k: weight_map[k] for k in sorted(weight_map)}}
    path = Path(dst_dir) / INDEX_NAME
    path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return path


def write_config(src_dir: str | Path, dst_dir: str | Path, quantization_config: Mapping[str, Any] | None) -> Path | None:
    """Copy ``config.json`` with ``quantization_config`` set (or removed when ``None``).

    Returns the written path, or ``None`` when the source has no config.json.
    """
    src = Path(src_dir) / CONFIG_NAME
    if not src.exists():
        return None
    try:
        config = json.loads(src.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UMQError(f"not valid JSON ({exc})", rule="config", file=src) from None
    if not isinstance(config, dict):
        raise UMQError("not a JSON object", rule="config", file=src)
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = dict(quantization_config)
    dst = Path(dst_dir) / CONFIG_NAME
    dst.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return dst


def packed_layout(name: str, spec_shapes: Mapping[str, tuple[int, int]]) -> list[tuple[str, torch.dtype, tuple[int, int]]]:
    """Writer layout entries of one quantized tensor from ``TensorSpec.stored_shapes()``."""
    return [
        (name + DATA_SUFFIX, torch.uint8, spec_shapes[DATA_SUFFIX]),
        (name + MASK_SUFFIX, torch.uint8, spec_shapes[MASK_SUFFIX]),
        (name + SCALE_SUFFIX, torch.float32, spec_shapes[SCALE_SUFFIX]),
    ]
