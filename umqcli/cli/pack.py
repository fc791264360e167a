"""``umq pack``: quantize a safetensors file or Hugging Face model directory."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from ..errors import UMQError
from ..format import LoFormat, Method, QuantParams, ScaleRule, Selection
from ..pack import PackProgress, PackSummary, pack
from ..recipe import Recipe
from ._common import app, console, error_boundary, human_bytes, print_json, progress_bar


@app.command("pack")
@error_boundary
def pack_command(
    src: Annotated[Path, typer.Argument(help="A .safetensors file or a Hugging Face model directory.")],
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output file/directory [default: SRC with a .umq suffix]")] = None,
    k: Annotated[Optional[int], typer.Option("--k", help="Hi (16-bit) elements per group of 8, 0..8 [default: 1]")] = None,
    lo: Annotated[Optional[LoFormat], typer.Option("--lo", help="8-bit encoding of the other 8-k [default: fp8_e4m3]")] = None,
    hi: Annotated[Optional[str], typer.Option("--hi", help="16-bit encoding: auto, float16 or bfloat16 [default: auto = source dtype; float16 for float32 unless a hi value overflows]")] = None,
    block: Annotated[Optional[int], typer.Option("--block", help="Columns per lo scale, a multiple of 8; 0 = one scale per row [default: 0]")] = None,
    select: Annotated[Optional[Selection], typer.Option("--select", help="How hi positions are chosen [default: magnitude]")] = None,
    method: Annotated[Optional[Method], typer.Option("--method", help="How lo values are rounded: rtn (to nearest) or gptq (error feedback through the input Hessian; needs --stats from `umq calibrate --hessian`) [default: rtn]")] = None,
    scale_rule: Annotated[Optional[ScaleRule], typer.Option("--scale-rule", help="How lo scales are chosen: absmax, clip or clip-hessian (clip-ratio search per block) [default: absmax]")] = None,
    recipe_path: Annotated[Optional[Path], typer.Option("--recipe", help="Per-tensor parameters from `umq calibrate` (flags set the defaults for tensors it does not name).")] = None,
    stats: Annotated[Optional[Path], typer.Option("--stats", help="Activation statistics from `umq calibrate` (needed by --select activation and --method gptq; with --recipe, the statistics it records are used by default).")] = None,
    include: Annotated[Optional[list[str]], typer.Option("--include", help="Only pack tensors matching this glob or re:regex (repeatable; lifts the default exclusions).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Never pack tensors matching this glob or re:regex (repeatable).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON (no progress bar).")] = False,
) -> None:
    """Pack every eligible 2-D weight: per group of 8, k stay 16-bit, 8-k go 8-bit.

    Everything else (1-D, integer, 3-D, excluded) passes through byte for byte. Output is
    written to a temporary path and renamed when complete.
    """
    recipe = Recipe.load(recipe_path) if recipe_path is not None else None
    base = (recipe.defaults if recipe is not None and recipe.defaults is not None else QuantParams())
    given = {key: value for key, value in
             (("k", k), ("lo", lo), ("hi", hi), ("block", block), ("selection", select),
              ("method", method), ("scale_rule", scale_rule)) if value is not None}
    try:
        # QuantParams validates every value (UMQError naming the rule and the valid
        # values); hi "auto" -> None.
        params = QuantParams(**{**_fields(base), **given}) if given else base
    except UMQError as exc:
        raise exc.located(file=src) from None
    act_sq = hessians = None
    if recipe is not None:  # the recipe's own statistics unless --stats names others (same hash)
        stats = recipe.statistics_file(stats)
    if stats is not None:
        from ..stats import load_stats

        loaded = load_stats(stats)
        act_sq = {name: item.act_sq for name, item in loaded.items()}
        hessians = {name: item.hessian for name, item in loaded.items() if item.hessian is not None}

    if as_json:
        summary = pack(src, out, params=params, recipe=recipe, include=include or (), exclude=exclude or (),
                       act_sq=act_sq, hessians=hessians, force=force)
        print_json(summary.to_json())
        return

    progress = progress_bar(
        TextColumn("[bold]{task.fields[tensors]}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}", style="dim"),
    )
    with progress:
        task = progress.add_task("", total=None, tensors="")

        def on_progress(event: PackProgress) -> None:
            progress.update(
                task, completed=event.bytes_done, total=event.bytes_total,
                tensors=f"{event.tensors_done}/{event.tensors_total} tensors", description=event.current,
            )

        summary = pack(src, out, params=params, recipe=recipe, include=include or (), exclude=exclude or (),
                       act_sq=act_sq, hessians=hessians, force=force, progress=on_progress)
    render_summary(summary)


def _fields(params: QuantParams) -> dict:
    return {"k": params.k, "lo": params.lo, "hi": params.hi, "block": params.block,
            "selection": params.selection, "scale_rule": params.scale_rule, "method": params.method}


def render_summary(summary: PackSummary) -> None:
    table = Table(title=f"umq pack: {summary.source} -> {summary.output}", show_header=True, title_justify="left")
    table.add_column("")
    table.add_column("tensors", justify="right")
    table.add_column("bytes in", justify="right")
    table.add_column("bytes out", justify="right")
    table.add_column("bits/element", justify="right")
    table.add_column("weight rel. error (mean / worst)", justify="left")
    packed, passed = summary.packed, summary.passthrough
    bpe = summary.packed_bits_per_element
    src_bpe = summary.packed_source_bits_per_element
    worst = summary.error_worst
    error = "-" if summary.error_mean is None else (
        f"{summary.error_mean:.4g} / {worst.rel_error:.4g} ({worst.name})" if worst else f"{summary.error_mean:.4g}")
    table.add_row(
        "packed", str(len(packed)), human_bytes(sum(t.bytes_in for t in packed)), human_bytes(sum(t.bytes_out for t in packed)),
        "-" if bpe is None else f"{src_bpe:.0f} -> {bpe:.3f}", error,
    )
    table.add_row("passed through", str(len(passed)), human_bytes(sum(t.bytes_in for t in passed)),
                  human_bytes(sum(t.bytes_out for t in passed)), "unchanged", "-")
    ratio = summary.bytes_out / summary.bytes_in if summary.bytes_in else 0.0
    table.add_row("[bold]total", str(len(summary.tensors)), human_bytes(summary.bytes_in), human_bytes(summary.bytes_out),
                  f"{ratio:.1%} of input", "")
    console.print(table)
    console.print(f"{summary.seconds:.1f} s, {summary.throughput_mb_s:.0f} MB/s of input", highlight=False)
    if passed:
        reasons: dict[str, list[str]] = defaultdict(list)
        for item in passed:
            reasons[item.reason].append(item.name)
        why = Table(title="passed through", title_justify="left", show_header=True)
        why.add_column("reason")
        why.add_column("tensors", justify="right")
        why.add_column("e.g.")
        for reason, names in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
            why.add_row(reason, str(len(names)), ", ".join(names[:2]) + (" ..." if len(names) > 2 else ""))
        console.print(why)
    if summary.copied_files:
        console.print(f"copied {len(summary.copied_files)} other file(s): {', '.join(summary.copied_files[:6])}"
                      + (" ..." if len(summary.copied_files) > 6 else ""), highlight=False)
    if summary.skipped_files:
        console.print(f"[yellow]not copied (weights in another format):[/] {', '.join(summary.skipped_files)}",
                      highlight=False)
