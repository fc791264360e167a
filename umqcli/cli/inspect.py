"""``umq inspect``: parameters, sizes and hi-mask density of a packed checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from ..inspect import InspectReport, TensorReport, check_checkpoint, inspect_checkpoint, png_name, render_png
from ..io import atomic_output
from ._common import app, console, error_boundary, human_bytes, print_json

SPARK = "▁▂▃▄▅▆▇█"
_SHORT = {"fp8_e4m3": "e4m3", "fp8_e5m2": "e5m2", "int8": "int8", "float16": "f16", "bfloat16": "bf16"}
SHADES = " ░▒▓█"


def sparkline(values, *, lo: float = 0.0, hi: float = 1.0) -> str:
    """One character per value, eighth-block heights between ``lo`` and ``hi``."""
    span = (hi - lo) or 1.0
    out = []
    for v in values:
        level = int(round((float(v) - lo) / span * (len(SPARK) - 1)))
        out.append(SPARK[max(0, min(len(SPARK) - 1, level))])
    return "".join(out)


def heatmap_text(heat, bottom: float, top: float) -> Text:
    """The density grid as shaded, coloured cells (two characters per cell), scaled so
    that ``bottom`` is dark and ``top`` is brightest."""
    ramp = (17, 18, 54, 90, 126, 162, 198, 204, 209, 215, 221, 227)  # 256-colour: blue -> magenta -> yellow
    text = Text()
    for row in heat:
        for value in row:
            v = max(0.0, min(1.0, (float(value) - bottom) / ((top - bottom) or 1.0)))
            shade = SHADES[min(len(SHADES) - 1, int(v * (len(SHADES) - 1) + 0.5))]
            colour = ramp[min(len(ramp) - 1, int(v * (len(ramp) - 1) + 0.5))]
            text.append(shade * 2, style=f"color({colour})")
        text.append("\n")
    return text


def render_table(report: InspectReport) -> None:
    table = Table(title=f"umq inspect: {report.path}", title_justify="left")
    wide = console.width >= 110  # narrow terminals: bytes and top columns go to --tensor / --json
    table.add_column("tensor", overflow="fold", min_width=18, ratio=1)
    table.add_column("shape", justify="right")
    table.add_column("k lo/hi block sel", overflow="fold")
    table.add_column("bits/el", justify="right")
    if wide:
        table.add_column("bytes", justify="right")
    table.add_column("hi per column", no_wrap=True, min_width=16)
    if wide:
        table.add_column("top columns", overflow="fold", min_width=12)
    for t in report.tensors:
        strip = t.strip(16)
        block = "row" if t.block == t.shape[1] else str(t.block)
        params = f"{t.k} {_SHORT.get(t.lo, t.lo)}/{_SHORT.get(t.hi, t.hi)} {block} {t.selection[:3]}"
        row = [t.name, "x".join(map(str, t.shape)), params, f"{t.bits_per_element:.3f}"]
        if wide:
            row.append(human_bytes(t.stored_bytes))
        row.append(sparkline(strip, hi=float(strip.max())))
        if wide:
            row.append(" ".join(f"{c}:{d:.2f}" for c, d in t.top_columns(2)))
        table.add_row(*row)
    console.print(table)
    packed_bytes = sum(t.stored_bytes for t in report.tensors)
    source_bytes = sum(t.source_bytes for t in report.tensors)
    console.print(
        f"{len(report.tensors)} quantized tensor(s): {human_bytes(packed_bytes)} (from {human_bytes(source_bytes)}); "
        f"{len(report.passthrough)} passed through: {human_bytes(sum(p[3] for p in report.passthrough))}",
        highlight=False,
    )


def render_detail(t: TensorReport) -> None:
    console.rule(f"[bold]{t.name}")
    console.print(
        f"shape {t.shape[0]} x {t.shape[1]} ({t.dtype}), k={t.k}, lo={t.lo}, hi={t.hi}, block={t.block}, "
        f"selection={t.selection}, scale_rule={t.scale_rule}: {t.bits_per_element:.3f} bits/element, "
        f"{human_bytes(t.stored_bytes)}", highlight=False)
    mean = float(t.column_density.mean())
    console.print(f"hi fraction per input column: mean {mean:.4f} (k/8 = {t.k / 8:.4f}), "
                  f"{t.outlier_columns(0.9)} column(s) hi in >= 90% of rows", highlight=False)
    console.print("top columns: " + ", ".join(f"{c} ({d:.1%})" for c, d in t.top_columns(8)), highlight=False)
    width = max(16, min(120, console.width - 8))
    strip = t.strip(width)
    peak = float(strip.max())
    console.print(f"hi fraction per input column (max per bin of {max(1, t.shape[1] // len(strip))} column(s); "
                  f"full height = {peak:.2f}):", highlight=False)
    console.print(Text(f"{peak:4.2f} ", style="dim") + Text(sparkline(strip, hi=peak), style="magenta"))
    last = str(t.shape[1] - 1)
    console.print(Text(f"     0{' ' * max(1, len(strip) - 1 - len(last))}{last}", style="dim"))
    total = int(t.position_counts.sum()) or 1
    console.print("hi per position in the group (count, share):")
    peak = int(t.position_counts.max()) or 1
    for position, count in enumerate(t.position_counts.tolist()):
        bar = "█" * int(round(40 * count / peak))
        console.print(f"  {position}: {bar:<40} {count:>10} {count / total:6.1%}", highlight=False)
    rows, cols = t.heatmap.shape
    bottom, top = float(t.heatmap.min()), float(t.heatmap.max())
    console.print(f"hi density heatmap ({rows} row bins x {cols} column bins of a {t.shape[0]} x {t.shape[1]} "
                  f"matrix; dark = {bottom:.3f}, bright = {top:.3f}; mean k/8 = {t.k / 8:.3f}):", highlight=False)
    console.print(heatmap_text(t.heatmap, bottom, top), end="", soft_wrap=True)


@app.command("inspect")
@error_boundary
def inspect_command(
    path: Annotated[Path, typer.Argument(help="A packed .safetensors file or model directory.")],
    tensor: Annotated[Optional[str], typer.Option("--tensor", help="Only this tensor (a name or glob), with full detail.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    png: Annotated[Optional[Path], typer.Option("--png", help="Write one PNG per tensor (heatmap, column density, positions) into this directory.")] = None,
    check: Annotated[bool, typer.Option("--check", help="Validate every FORMAT rule and crc32 first; exit 2 naming the first violation.")] = False,
) -> None:
    """Show each quantized tensor's parameters, size and where its hi slots are."""
    check_report = check_checkpoint(path) if check else None
    # Heatmap cells are two characters wide: fit the terminal.
    heat_cols = max(8, min(64, (console.width - 2) // 2))
    report = inspect_checkpoint(path, tensor=tensor, heat_shape=(16, heat_cols))
    written: list[str] = []
    if png is not None:
        png.mkdir(parents=True, exist_ok=True)
        for t in report.tensors:
            target = png / png_name(t.name)
            with atomic_output(target, force=True) as tmp:
                render_png(t, tmp)
            written.append(str(target))
    if as_json:
        payload = report.to_json(full=tensor is not None)
        if check_report is not None:
            payload["check"] = check_report.to_json()
        if written:
            payload["png"] = written
        print_json(payload)
        return
    if check_report is not None:
        console.print(f"[green]check ok[/]: {check_report.tensors_checked} quantized tensor(s) in "
                      f"{check_report.files} file(s): every FORMAT v1 rule and crc32 holds "
                      f"({human_bytes(check_report.bytes_checked)} verified)", highlight=False)
    render_table(report)
    if tensor is not None:
        for t in report.tensors:
            render_detail(t)
    if written:
        console.print(f"wrote {len(written)} PNG(s) to {png}", highlight=False)
