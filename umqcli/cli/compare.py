"""``umq compare``: quality per bit of UMQ configurations against the seed baselines."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..compare import CompareReport, add_perplexity, compare_checkpoint, plot_report
from ..perplexity import DEFAULT_MAX_TOKENS, DEFAULT_WINDOW
from ..errors import UMQError
from ._common import app, console, error_boundary, fail, print_json, progress_bar


@app.command("compare")
@error_boundary
def compare_command(
    src: Annotated[Path, typer.Argument(help="Source .safetensors file or Hugging Face model directory.")],
    activations: Annotated[
        Optional[Path],
        typer.Option(
            "--activations",
            help="Stats file from umq calibrate: its real input rows replace the Gaussian X, "
            "enables selection=activation and LLM.int8().",
        ),
    ] = None,
    tensor: Annotated[
        Optional[list[str]],
        typer.Option(
            "--tensor",
            help="Compare only tensors matching this glob (or 're:REGEX'); repeatable. "
            "Default: every 2-D float weight with columns % 8 == 0 except embeddings and lm_head.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full report (per tensor too) as JSON.")] = False,
    png: Annotated[
        Optional[Path], typer.Option("--png", help="Write a plot of error against bits to this PNG file.")
    ] = None,
    x_rows: Annotated[int, typer.Option("--x-rows", min=1, help="Input rows X per tensor (Gaussian or sampled).")] = 256,
    weight_rows: Annotated[
        int,
        typer.Option("--weight-rows", min=0, help="Output rows sampled per tensor, 0 = all (sampling misses rare outlier rows)."),
    ] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the Gaussian inputs and row samples.")] = 0,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Tensors measured in parallel.")] = 2,
    per_tensor: Annotated[
        bool, typer.Option("--per-tensor", help="Also print, per tensor, the most accurate format under each budget.")
    ] = False,
    perplexity: Annotated[
        Optional[Path],
        typer.Option("--perplexity", help="A UTF-8 text: adds the perplexity of the SRC model (a causal LM directory) "
                     "with every compared weight fake-quantized by each format."),
    ] = None,
    ppl_window: Annotated[int, typer.Option("--ppl-window", min=2, help="Perplexity window, tokens.")] = DEFAULT_WINDOW,
    ppl_tokens: Annotated[int, typer.Option("--ppl-tokens", min=2, help="Perplexity over the text's first N tokens.")] = DEFAULT_MAX_TOKENS,
) -> None:
    """Bits per element (everything stored) and output error (relative Frobenius, SQNR)
    for UMQ configs (k 0/1/2/4 x lo x block row/32 x selection) and the seed baselines
    (FP8 per-channel and 1x128 blocks, MXFP8, INT8 per-channel, LLM.int8(), INT4 groups,
    NF4), per tensor and weighted by element count; the Pareto front is marked."""
    if png is not None:
        _check_png_target(png, src)  # fail before minutes of work, not after
    options = dict(activations=activations, patterns=tensor or (), x_rows=x_rows, weight_rows=weight_rows,
                   seed=seed, workers=workers)
    report = _run(src, options, as_json)
    if perplexity is not None:
        _add_perplexity(report, perplexity, ppl_window, ppl_tokens, quiet=as_json)
    if png is not None:
        _write_png(report, png)
    if as_json:
        print_json(report.to_json())
        return
    render_report(report, per_tensor=per_tensor, png=png)


def _check_png_target(png: Path, src: Path) -> None:
    if png.exists() and src.exists() and png.resolve() == src.resolve():
        raise fail(f"--png {png} is the source checkpoint; refusing to overwrite an input")
    if not png.resolve().parent.is_dir():
        raise fail(f"--png {png}: the parent directory does not exist")


def _run(src: Path, options: dict, as_json: bool) -> CompareReport:
    """compare_checkpoint(), with a progress bar on stderr unless the output is JSON."""
    if as_json:
        return compare_checkpoint(src, **options)
    with progress_bar(
        TextColumn("[bold]compare"), BarColumn(), MofNCompleteColumn(), TextColumn("tensors"), TimeElapsedColumn(),
    ) as bar:
        task = bar.add_task("", total=None)

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return compare_checkpoint(src, progress=progress, **options)


def render_report(report: CompareReport, *, per_tensor: bool, png: Path | None) -> None:
    console.print(format_table(report))
    console.print(budget_table(report))
    if per_tensor:
        console.print(tensor_table(report))
    for name, reason in report.skipped_formats.items():
        console.print(f"[yellow]skipped[/] {name}: {reason}", highlight=False)
    for name, reason in report.skipped_tensors.items():
        console.print(f"[yellow]not compared[/] {name}: {reason}", highlight=False)
    if png is not None:
        console.print(f"plot written to {png}", highlight=False)


def _add_perplexity(report: CompareReport, text: Path, window: int, tokens: int, quiet: bool) -> None:
    if quiet:
        add_perplexity(report, text, window=window, max_tokens=tokens)
        return
    with progress_bar(TextColumn("[bold]perplexity"), BarColumn(), MofNCompleteColumn(), TextColumn("formats"),
                      TimeElapsedColumn()) as bar:
        task = bar.add_task("", total=None)
        add_perplexity(report, text, window=window, max_tokens=tokens,
                       progress=lambda stage, done, total: bar.update(task, completed=done, total=total))


def _write_png(report: CompareReport, png: Path) -> None:
    from ..io import atomic_output

    try:
        with atomic_output(png, force=True) as tmp:
            plot_report(report, tmp)
    except UMQError as exc:
        raise exc.located(file=png)


def _err(value: float | None) -> str:
    return "-" if value is None else f"{value:.3e}"


def _db(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.1f}"


def format_table(report: CompareReport) -> Table:
    inputs = (
        f"real activation rows from {report.activations}"
        if report.inputs == "activations"
        else f"{report.tensors[0].x_rows} seeded Gaussian input rows (seed {report.seed})"
    )
    sampled = sum(t.weight_rows for t in report.tensors) < sum(t.shape[0] for t in report.tensors)
    table = Table(
        title=f"umq compare {report.source}: {len(report.tensors)} tensors, "
        f"{report.elements:,} elements, {inputs}"
        + (", sampled output rows" if sampled else ""),
        caption="★ = Pareto front (no format has fewer bits and lower error). bits: stored "
        "bits per element; out err: ||X(W-Ŵ)ᵀ||/||XWᵀ||, w err: ||W-Ŵ||/||W||, both "
        "element-weighted RMS over tensors.",
        show_header=True,
    )
    table.add_column("", justify="center", no_wrap=True)
    table.add_column("format", no_wrap=True)
    table.add_column("bits", justify="right", no_wrap=True)
    table.add_column("out err", justify="right", no_wrap=True)
    table.add_column("SQNR dB", justify="right", no_wrap=True)
    table.add_column("w err", justify="right", no_wrap=True)
    ppl = report.perplexity
    if ppl is not None:
        table.add_column(f"ppl\n(ref {ppl['reference']:.3f})", justify="right", no_wrap=True)
        table.caption += (f" ppl: perplexity of the model with every compared weight in the format, "
                          f"{ppl['tokens']} tokens of {ppl['text']} in windows of {ppl['window']}.")
    table.add_column("note", overflow="fold")
    for r in report.formats:
        style = "bold" if r.pareto else None
        cells = [
            "★" if r.pareto else "",
            r.name,
            "-" if r.bits is None else f"{r.bits:.3f}",
            _err(r.rel_error),
            _db(r.sqnr_db),
            _err(r.weight_error),
        ]
        if ppl is not None:
            cells.append("-" if r.perplexity is None else _ppl(r.perplexity, ppl["reference"]))
        table.add_row(*cells, r.note, style=style)
    return table


def _ppl(value: float, reference: float) -> str:
    return f"{value:.3f} ({100 * (value / reference - 1):+.2f}%)"


def budget_table(report: CompareReport) -> Table:
    table = Table(
        title="best at each budget (bits per element at most); the winner in bold green",
        show_header=True,
    )
    table.add_column("budget", justify="right", no_wrap=True)
    table.add_column("best UMQ config", no_wrap=True)
    table.add_column("its err", justify="right", no_wrap=True)
    table.add_column("best baseline", no_wrap=True)
    table.add_column("its err", justify="right", no_wrap=True)
    for b in report.budgets:
        umq_style = "bold green" if b.winner and b.winner == b.best_umq else ""
        base_style = "bold green" if b.winner and b.winner == b.best_baseline else ""
        table.add_row(
            f"{b.bits:.3f}",
            Text(b.best_umq or "(none fits)", style=umq_style),
            Text(_err(b.best_umq_error), style=umq_style),
            Text(b.best_baseline or "(none fits)", style=base_style),
            Text(_err(b.best_baseline_error), style=base_style),
        )
    return table


def tensor_table(report: CompareReport) -> Table:
    """Per tensor: the most accurate format (UMQ or baseline) under each budget."""
    table = Table(title="per tensor: output rel. error of the best format under each budget", show_header=True)
    table.add_column("tensor")
    table.add_column("shape", justify="right")
    budgets = [b.bits for b in report.budgets]
    for bits in budgets:
        table.add_column(f"≤{bits:.2f}: best", overflow="fold")
    for t in report.tensors:
        cells = []
        for bits in budgets:
            fit = [
                (r.per_tensor[t.name].rel_error, r.name)
                for r in report.formats
                if t.name in r.per_tensor and r.per_tensor[t.name].bits <= bits + 1e-9
            ]
            cells.append("-" if not fit else f"{min(fit)[1]} {min(fit)[0]:.2e}")
        table.add_row(t.name, "x".join(map(str, t.shape)), *cells)
    return table
