"""``umq inspect``: what a packed checkpoint holds, and where its hi slots went.

For each quantized tensor: its parameters and size, and statistics of the hi mask (the
"bitmap"), computed from the mask bytes alone, slab by slab (the payload is not read):

- ``column_density``: float32 ``[C]``, the fraction of rows in which input column ``j`` is
  hi. The mean is ``k / 8``; columns near 1.0 are the outlier input channels that the
  selection keeps 16-bit in (almost) every row.
- ``position_counts``: int64 ``[8]``, how many groups have position ``i`` hi (a skew toward
  low positions would betray tie-breaking on flat groups, e.g. zeros).
- ``heatmap``: float32 ``[H, W]``, the hi fraction over a grid of row x column bins.

:func:`check_checkpoint` validates every FORMAT rule (shapes, dtypes, popcount, scales, lo
codes, crc32) of every quantized tensor and raises the first violation. Nothing here
prints; the CLI renders the reports (terminal charts, ``--png``).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .codec import unpack_mask
from ._optional import require
from .errors import UMQError
from .format import GROUP, MASK_SUFFIX
from .io import open_checkpoint

# Rows of mask bytes unpacked at once: 8 bytes of bool per mask byte, so ~64 MB per slab.
_MASK_SLAB_BYTES = 1 << 23


@dataclass
class TensorReport:
    """Parameters and hi-mask statistics of one quantized tensor (see module docstring)."""

    name: str
    file: str
    shape: tuple[int, int]
    dtype: str
    k: int
    lo: str
    hi: str
    block: int
    selection: str
    scale_rule: str
    bits_per_element: float
    stored_bytes: int
    column_density: torch.Tensor  # float32 [C]
    position_counts: torch.Tensor  # int64 [8]
    heatmap: torch.Tensor  # float32 [H, W]

    @property
    def source_bytes(self) -> int:
        itemsize = 4 if self.dtype == "float32" else 2
        return self.shape[0] * self.shape[1] * itemsize

    def top_columns(self, count: int = 8) -> list[tuple[int, float]]:
        """The ``count`` input columns most often hi: (column, hi fraction), densest first
        (ties toward the lower column)."""
        if self.column_density.numel() == 0:
            return []
        count = min(count, self.column_density.numel())
        # Stable descending order: sort by (-density, column).
        order = torch.argsort(-self.column_density.double(), stable=True)[:count]
        return [(int(c), float(self.column_density[c])) for c in order]

    def outlier_columns(self, threshold: float = 0.9) -> int:
        """How many columns are hi in at least ``threshold`` of the rows."""
        return int((self.column_density >= threshold).sum())

    def strip(self, bins: int = 64) -> torch.Tensor:
        """``column_density`` downsampled to at most ``bins`` values (max per bin, so a
        single outlier column stays visible)."""
        return _bin_max(self.column_density, bins)

    def to_json(self, *, full: bool = False) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "name": self.name,
            "file": self.file,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "k": self.k,
            "lo": self.lo,
            "hi": self.hi,
            "block": self.block,
            "selection": self.selection,
            "scale_rule": self.scale_rule,
            "bits_per_element": round(self.bits_per_element, 4),
            "bytes": self.stored_bytes,
            "source_bytes": self.source_bytes,
            "mean_density": float(self.column_density.mean()) if self.column_density.numel() else 0.0,
            "outlier_columns_90": self.outlier_columns(0.9),
            "top_columns": [{"column": c, "density": round(d, 6)} for c, d in self.top_columns()],
            "position_counts": [int(x) for x in self.position_counts],
            "column_strip": [round(float(x), 4) for x in self.strip()],
            "heatmap": [[round(float(x), 4) for x in row] for row in self.heatmap],
        }
        if full:
            obj["column_density"] = [round(float(x), 6) for x in self.column_density]
        return obj


@dataclass
class InspectReport:
    """Every tensor of a checkpoint: quantized ones with :class:`TensorReport`s, the rest
    listed as pass-through (name, dtype code, shape)."""

    path: Path
    files: list[str]
    tensors: list[TensorReport] = field(default_factory=list)
    passthrough: list[tuple[str, str, tuple[int, ...], int]] = field(default_factory=list)

    @property
    def stored_bytes(self) -> int:
        return sum(t.stored_bytes for t in self.tensors) + sum(p[3] for p in self.passthrough)

    def to_json(self, *, full: bool = False) -> dict[str, Any]:
        packed_elements = sum(t.shape[0] * t.shape[1] for t in self.tensors)
        return {
            "path": str(self.path),
            "files": self.files,
            "quantized": len(self.tensors),
            "passthrough": len(self.passthrough),
            "bytes": self.stored_bytes,
            "packed_bits_per_element": (8.0 * sum(t.stored_bytes for t in self.tensors) / packed_elements
                                        if packed_elements else None),
            "tensors": [t.to_json(full=full) for t in self.tensors],
            "passthrough_tensors": [{"name": n, "dtype": d, "shape": list(s), "bytes": b}
                                    for n, d, s, b in self.passthrough],
        }


def _bin_max(values: torch.Tensor, bins: int) -> torch.Tensor:
    n = values.numel()
    if n <= bins:
        return values.clone()
    edges = [math.floor(i * n / bins) for i in range(bins + 1)]
    return torch.stack([values[edges[i]:edges[i + 1]].max() for i in range(bins)])


def _bin_index(n: int, bins: int) -> torch.Tensor:
    """int64 ``[n]``: which of ``bins`` equal bins each of ``n`` positions falls in."""
    return torch.arange(n, dtype=torch.int64) * bins // n


def mask_statistics(mask_rows: Callable[[int, int], torch.Tensor], rows: int, columns: int,
                    heat_shape: tuple[int, int] = (16, 64)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(column_density float32 [C], position_counts int64 [8], heatmap float32 [H, W]) of a
    mask read slab by slab: ``mask_rows(r0, r1)`` -> uint8 ``[r1 - r0, C / 8]``."""
    heat_rows, heat_cols = min(heat_shape[0], rows), min(heat_shape[1], columns)
    column_hits = torch.zeros(columns, dtype=torch.int64)
    positions = torch.zeros(GROUP, dtype=torch.int64)
    heat = torch.zeros(heat_rows, heat_cols, dtype=torch.float64)
    row_bin = _bin_index(rows, heat_rows)
    col_bin = _bin_index(columns, heat_cols)
    per_slab = max(1, _MASK_SLAB_BYTES // max(columns, 1))
    for r0 in range(0, rows, per_slab):
        r1 = min(rows, r0 + per_slab)
        bits = unpack_mask(mask_rows(r0, r1))  # bool [r, C]
        as_int = bits.to(torch.int64)
        column_hits += as_int.sum(0)
        positions += as_int.view(r1 - r0, columns // GROUP, GROUP).sum((0, 1))
        per_row_bins = torch.zeros(r1 - r0, heat_cols, dtype=torch.float64).index_add_(1, col_bin, bits.double())
        heat.index_add_(0, row_bin[r0:r1], per_row_bins)
    cells = (torch.bincount(row_bin, minlength=heat_rows).double().unsqueeze(1)
             * torch.bincount(col_bin, minlength=heat_cols).double().unsqueeze(0))
    return (column_hits.double() / rows).float(), positions, (heat / cells).float()


def inspect_checkpoint(path: str | Path, *, tensor: str | None = None, heat_shape: tuple[int, int] = (16, 64),
                       progress: Callable[[int, int, str], None] | None = None) -> InspectReport:
    """Report every quantized tensor of a packed file or directory (or those whose name
    matches ``tensor``, a name or glob). Reads only headers and mask bytes."""
    with open_checkpoint(path) as ckpt:
        ckpt.require_packed()
        names = list(ckpt.specs)
        if tensor is not None:
            names = [n for n in names if n == tensor or fnmatch.fnmatchcase(n, tensor)]
            if not names:
                raise UMQError(
                    f"no quantized tensor matches {tensor!r} ({len(ckpt.specs)} quantized tensors in the checkpoint)",
                    rule="missing-tensor", file=path, tensor=tensor,
                )
        report = InspectReport(path=Path(path), files=[ckpt.relative_name(f) for f in ckpt.files])
        for i, name in enumerate(names):
            if progress is not None:
                progress(i, len(names), name)
            spec = ckpt.specs[name]
            mask_name = name + MASK_SUFFIX  # its shape was checked when the checkpoint was opened
            density, positions, heat = mask_statistics(
                lambda r0, r1: ckpt.get(mask_name, rows=(r0, r1)), spec.rows, spec.columns, heat_shape)
            report.tensors.append(TensorReport(
                name=name, file=ckpt.relative_name(ckpt.spec_files[name]), shape=spec.shape, dtype=spec.dtype,
                k=spec.k, lo=spec.lo.value, hi=spec.hi.value, block=spec.block, selection=spec.selection,
                scale_rule=spec.scale_rule, bits_per_element=spec.bits_per_element, stored_bytes=spec.stored_bytes,
                column_density=density, position_counts=positions, heatmap=heat,
            ))
        if tensor is None:
            for name in ckpt.passthrough_names():
                entry = ckpt.entry(name)
                report.passthrough.append((name, entry.dtype, entry.shape, entry.nbytes))
        if progress is not None:
            progress(len(names), len(names), "")
    return report


@dataclass
class CheckReport:
    """What :func:`check_checkpoint` verified."""

    path: Path
    files: int
    tensors_checked: int
    passthrough: int
    bytes_checked: int

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "ok": True, "files": self.files, "tensors_checked": self.tensors_checked,
                "passthrough": self.passthrough, "bytes_checked": self.bytes_checked}


def check_checkpoint(path: str | Path, *, progress: Callable[[int, int, str], None] | None = None) -> CheckReport:
    """Validate every FORMAT v1 rule of every quantized tensor; raise the first violation.

    Covered: the header (safetensors validity, ``umq.version``, each ``umq.tensors``
    entry: §7 via :func:`~umqcli.format.decode_metadata`), the three stored tensors being
    present with the right dtypes and shapes, crc32 of each, popcount == k of every mask
    byte, finite non-negative scales, no NaN/Inf lo codes; and stored ``NAME.umq_*``
    tensors that no ``umq.tensors`` entry claims (rule ``orphan``).
    """
    with open_checkpoint(path) as ckpt:  # header, index, version, spec, stored-shape and orphan rules
        ckpt.require_packed()
        names = list(ckpt.specs)
        checked_bytes = 0
        for i, name in enumerate(names):
            if progress is not None:
                progress(i, len(names), name)
            ckpt.packed(name, check_crc=True)  # raises UMQError naming file, tensor and rule
            checked_bytes += ckpt.specs[name].stored_bytes
        if progress is not None:
            progress(len(names), len(names), "")
        return CheckReport(Path(path), len(ckpt.files), len(names), len(ckpt.passthrough_names()), checked_bytes)


def render_png(report: TensorReport, path: Path) -> Path:
    """One PNG per tensor: the 2-D density heatmap, the per-column hi fraction, and the
    per-position counts. Uses matplotlib's Agg backend (no display needed)."""
    matplotlib = require("matplotlib", extra="plot", purpose="--png heatmaps")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(11, 6.5), dpi=100)
    grid = fig.add_gridspec(2, 2, height_ratios=[2.2, 1], width_ratios=[4, 1], hspace=0.35, wspace=0.25)
    ax_heat = fig.add_subplot(grid[0, :])
    rows, cols = report.shape
    # Scale to the data (at least 2 k/8) so the structure shows; the colour bar gives values.
    vmax = min(1.0, max(float(report.heatmap.max()), 2 * report.k / GROUP, 1e-6))
    image = ax_heat.imshow(report.heatmap.numpy(), aspect="auto", cmap="magma", vmin=0.0, vmax=vmax,
                           extent=(0, cols, rows, 0), interpolation="nearest")
    ax_heat.set_title(f"{report.name}  [{rows} x {cols}]  k={report.k} {report.lo}/{report.hi} block={report.block}"
                      f"  ({report.bits_per_element:.2f} bits/element)", fontsize=10)
    ax_heat.set_xlabel("input column")
    ax_heat.set_ylabel("row")
    fig.colorbar(image, ax=ax_heat, label="hi fraction")
    ax_cols = fig.add_subplot(grid[1, 0])
    ax_cols.plot(report.column_density.numpy(), linewidth=0.7, color="#b5367a")
    ax_cols.axhline(report.k / GROUP, color="gray", linestyle="--", linewidth=0.8, label=f"k/8 = {report.k / GROUP:.3f}")
    ax_cols.set_xlim(0, cols)
    ax_cols.set_ylim(0, 1.02)
    ax_cols.set_xlabel("input column")
    ax_cols.set_ylabel("hi fraction")
    ax_cols.legend(loc="upper right", fontsize=8)
    ax_pos = fig.add_subplot(grid[1, 1])
    ax_pos.bar(range(GROUP), report.position_counts.numpy(), color="#3b6fb6")
    ax_pos.set_xticks(range(GROUP))
    ax_pos.set_xlabel("position in group")
    ax_pos.set_title("hi per position", fontsize=9)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def png_name(tensor_name: str) -> str:
    """A file name for a tensor's PNG (path separators and oddities replaced)."""
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in tensor_name)
    return f"{safe}.png"

