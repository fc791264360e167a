"""``umq unpack``: decode a packed checkpoint back to plain safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
from rich.table import Table

from ..unpack import DTYPE_CHOICES, unpack
from ._common import app, console, error_boundary, fail, print_json, progress_bar


@app.command("unpack")
@error_boundary
def unpack_command(
    packed: Annotated[Path, typer.Argument(help="Packed .safetensors file or model directory (written by umq pack).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dense output: a file for a file, a directory for a directory.")],
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="dtype of the decoded tensors: source (each tensor's recorded source dtype), "
            "float16, bfloat16 or float32. Pass-through tensors are always copied unchanged.",
        ),
    ] = "source",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Decode every quantized tensor to a plain dense tensor (same names and shapes) so
    any runtime can load the result; directories are mirrored with their index and
    config.json (quantization_config removed)."""
    if dtype not in DTYPE_CHOICES:
        raise fail(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    if as_json:
        report = unpack(packed, out, dtype=dtype, force=force)
        print_json(report.to_json())
        return
    with progress_bar(
        TextColumn("[bold]unpack"), BarColumn(), MofNCompleteColumn(), TextColumn("tensors"),
        TextColumn("{task.fields[written]}"), TextColumn("{task.description}"),
    ) as bar:
        task = bar.add_task("", total=None, written="")

        def progress(name: str, done: int, total: int, written: int) -> None:
            bar.update(task, completed=done, total=total, description=name, written=f"{written / 2**20:,.1f} MiB")

        report = unpack(packed, out, dtype=dtype, force=force, progress=progress)

    table = Table(title=f"umq unpack {packed} -> {out}", show_header=True)
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("tensors decoded", str(len(report.decoded)))
    table.add_row("tensors copied unchanged", str(len(report.passthrough)))
    written = sorted({dtype for _, dtype, _ in report.decoded.values()})
    chosen = " (each tensor's source dtype)" if report.dtype == "source" else ""
    table.add_row("dtype of decoded tensors", (", ".join(written) or "-") + chosen)
    table.add_row("tensor bytes in (packed)", f"{report.bytes_in:,}")
    table.add_row("tensor bytes out (dense)", f"{report.bytes_out:,}")
    table.add_row("files written", ", ".join(report.files))
    if report.copied:
        table.add_row("files copied", ", ".join(report.copied))
    console.print(table)
