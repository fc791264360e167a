"""``umq calibrate``: activation statistics from real text, and a per-tensor recipe."""

from __future__ import annotations

import shlex
from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..calibrate import CalibrationResult, CandidateSpace, calibrate
from ..errors import UMQError
from ..pack import default_output
from ._common import app, console, error_boundary, print_json, progress_bar

_DEFAULT_CANDIDATES = "k=0-8,lo=fp8_e4m3+int8,block=row+32+128,selection=magnitude+activation"


@app.command("calibrate")
@error_boundary
def calibrate_command(
    model: Annotated[Path, typer.Argument(help="A Hugging Face model directory (to run on --data) or a .safetensors file (weights-only search).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="The recipe JSON to write (for `umq pack --recipe`).")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Calibration text: a text file, or a directory of .txt/.md/.rst files.")] = None,
    stats_out: Annotated[Optional[Path], typer.Option("--stats-out", help="Write the activation statistics here (safetensors; for pack --stats and verify --activations).")] = None,
    stats: Annotated[Optional[Path], typer.Option("--stats", help="Reuse statistics from an earlier run instead of running the model.")] = None,
    budget_bits: Annotated[Optional[float], typer.Option("--budget-bits", help="Average stored bits per element (payload + mask + scale) over the packed tensors.")] = None,
    max_rel_error: Annotated[Optional[float], typer.Option("--max-rel-error", help="Per tensor, the cheapest configuration whose predicted relative output error is at most this.")] = None,
    candidates: Annotated[str, typer.Option("--candidates", show_default=False, help="Configurations to try: k=.., lo=.., block=.., selection=.. (comma-separated; '+' separates "
                                                                  "values, k accepts ranges). "
                                                                  f"[default: {_DEFAULT_CANDIDATES.replace(',', ', ').replace('=', ' = ')}]")] = _DEFAULT_CANDIDATES,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Calibration sequences.")] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", min=8, help="Tokens per sequence (special tokens included).")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per forward pass.")] = 8,
    sample_rows: Annotated[int, typer.Option("--sample-rows", min=0, help="Real input rows kept per layer in the stats file.")] = 128,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the row sample (same data + seed = same statistics).")] = 0,
    max_rows: Annotated[int, typer.Option("--max-rows", min=0, help="Estimate each candidate's error on this many evenly spaced weight rows (0 = all rows, the default: rows with outlier weights make subsets unreliable).")] = 0,
    include: Annotated[Optional[list[str]], typer.Option("--include", help="Only search tensors matching this glob or re:regex (as umq pack).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Never search tensors matching this glob or re:regex (as umq pack).")] = None,
    threads: Annotated[int, typer.Option("--threads", min=0, help="torch threads for running the model and the fused part of the search (0 = torch's default).")] = 0,
    hessian: Annotated[bool, typer.Option("--hessian", help="Also collect each linear input's Hessian E[x x^T] (float32, 4*C^2 bytes per distinct input) into --stats-out, for `umq pack --method gptq`.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON (no progress bar).")] = False,
) -> None:
    """Measure real activation statistics (per input channel of every linear layer) and
    pick, per tensor, the k / lo / block / selection that minimise the activation-weighted
    output error under a bit budget (or meet an error bound at the fewest bits).

    Without --data (or with --stats) the search runs on the weights alone (or on the given
    statistics). The recipe is written atomically; feed it to `umq pack --recipe`.
    """
    if (budget_bits is None) == (max_rel_error is None):
        raise UMQError("give exactly one of --budget-bits and --max-rel-error", rule="target")
    if data is not None and stats is not None:
        raise UMQError("give --data (measure statistics) or --stats (reuse them), not both", rule="data-and-stats")
    if stats_out is not None and data is None:
        raise UMQError("--stats-out needs --data: there is nothing measured to save", rule="stats-out-without-data")
    if data is not None and stats_out is None:
        raise UMQError("--data needs --stats-out: `umq pack --stats` (activation selection) and "
                       "`umq verify --activations` read the statistics", rule="options")
    space = CandidateSpace.parse(candidates)
    if threads:
        import torch

        torch.set_num_threads(threads)
    options = dict(
        data=data, stats_in=stats, stats_out=stats_out, recipe_out=out, budget_bits=budget_bits,
        max_rel_error=max_rel_error, space=space, samples=samples, seq_len=seq_len, batch_size=batch_size,
        sample_rows=sample_rows, seed=seed, max_rows=max_rows, include=include or (), exclude=exclude or (),
        hessian=hessian,
    )
    if as_json:
        result = calibrate(model, **options)
        print_json(summary_json(result))
        return
    progress = progress_bar(
        TextColumn("[bold]{task.fields[stage]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
    )
    with progress:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task("", total=total or None, stage=stage)
            progress.update(tasks[stage], completed=done, total=total or None)

        result = calibrate(model, progress=on_progress, **options)
    render_summary(result, model)


def summary_json(result: CalibrationResult) -> dict:
    search = result.search
    return {
        "recipe": None if result.recipe_path is None else str(result.recipe_path),
        "stats": None if result.stats_path is None else str(result.stats_path),
        "statistics": search.stats_source,
        "mode": search.mode,
        "target": search.target,
        "average_bits_per_element": search.average_bits,
        "rms_predicted_rel_error": search.rms_rel_error,
        "tokens": None if result.stats_run is None else int(result.stats_run.metadata["tokens"]),
        "tensors": {
            c.name: {**c.chosen.params.to_json(), "bits_per_element": c.chosen.bits,
                     "predicted_rel_error": c.chosen.rel_error, "candidates": len(c.candidates),
                     "outlier_channels": c.outlier_channels, "reason": c.reason}
            for c in search.choices
        },
    }


def render_summary(result: CalibrationResult, model: Path) -> None:
    search = result.search
    run = result.stats_run
    if run is not None:
        console.print(
            f"statistics: {run.metadata['tokens']} tokens in {run.metadata['samples']} sequences of "
            f"{run.metadata['seq_len']}, {len(run.stats)} linear layers"
            + (f" -> {result.stats_path}" if result.stats_path else ""),
            highlight=False,
        )
        if run.unmatched_modules:
            console.print(f"[yellow]no checkpoint tensor for {len(run.unmatched_modules)} linear module(s):[/] "
                          + ", ".join(run.unmatched_modules[:4]), highlight=False)
    table = Table(title=f"umq calibrate: {model.name} ({search.stats_source})", title_justify="left")
    for column, justify in (("tensor", "left"), ("k", "right"), ("lo", "left"), ("block", "right"),
                            ("select", "left"), ("bits", "right"), ("pred. error", "right")):
        table.add_column(column, justify=justify, overflow="fold")
    for c in search.choices:
        p = c.chosen.params
        table.add_row(c.name, str(p.k), p.lo.value, "row" if p.block == 0 else str(p.block),
                      p.selection.value, f"{c.chosen.bits:.3f}", f"{c.chosen.rel_error:.2e}")
    console.print(table)
    unusual = [c for c in search.choices if "median" in c.reason and "(median)" not in c.reason]
    if unusual:
        console.print("[bold]why some tensors got more (or fewer) hi slots:[/]")
        for c in unusual:
            console.print(f"  {c.name}: {c.reason}", highlight=False, markup=False, soft_wrap=True)
    ks = Counter(c.chosen.params.k for c in search.choices)
    target = (f"budget {search.target:g} bits/element" if search.mode == "budget"
              else f"max predicted error {search.target:g} per tensor")
    console.print(
        f"{len(search.choices)} tensors, {search.elements:,} elements: average "
        f"[bold]{search.average_bits:.3f}[/] bits/element ({target}), predicted relative output "
        f"error (element-weighted RMS) [bold]{search.rms_rel_error:.3e}[/]; k histogram "
        + " ".join(f"k={k}:{n}" for k, n in sorted(ks.items())),
        highlight=False,
    )
    if result.recipe_path is not None:
        console.print(f"recipe -> {result.recipe_path}; next:", highlight=False)
        # One line, never wrapped: it is meant to be copied.
        console.print(next_command(result, model), highlight=False, markup=False, soft_wrap=True)


def next_command(result: CalibrationResult, model: Path) -> str:
    """The ``umq pack`` command that applies the recipe, writing next to the recipe
    (not next to the model, which may sit in site-packages). The recipe records its
    statistics, so no --stats is needed."""
    recipe = result.recipe_path
    assert recipe is not None
    out = recipe.parent / default_output(model).name
    return shlex.join(["umq", "pack", str(model), "--recipe", str(recipe), "-o", str(out)])
