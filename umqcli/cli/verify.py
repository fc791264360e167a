"""``umq verify``: integrity and matmul error of a packed checkpoint, for humans and CI."""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..io import atomic_output
from ..errors import UMQError
from ..verify import (
    DEFAULT_MAX_REL_ERROR, DEFAULT_ROWS, DEFAULT_SEED, VerifyReport, junit_error_xml, junit_xml, verify,
)
from ..perplexity import DEFAULT_MAX_TOKENS, DEFAULT_WINDOW, PerplexityIncrease, packed_perplexity, perplexity_inputs
from ._common import EXIT_OK, EXIT_THRESHOLD, app, console, error_boundary, fail, print_json, progress_bar


class BackendChoice(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"
    torch = "torch"


@app.command("verify")
@error_boundary
def verify_command(
    packed: Annotated[Path, typer.Argument(help="A packed .safetensors file or HF model directory.")],
    reference: Annotated[Optional[Path], typer.Option("--reference", help="The unquantized source it was packed from: checks shapes, dtypes, hi values bit for bit and pass-through bytes, and measures error against the real weights (without it: against the codec's decode).")] = None,
    activations: Annotated[Optional[Path], typer.Option("--activations", help="Activation stats from `umq calibrate`: real input rows replace the Gaussian X.")] = None,
    backend: Annotated[BackendChoice, typer.Option("--backend", help="auto (CUDA when a device is present, else the fused CPU runtime, else torch), cuda, cpu or torch.")] = BackendChoice.auto,
    rows: Annotated[int, typer.Option("--rows", min=1, help="Input rows X per tensor.")] = DEFAULT_ROWS,
    max_rel_error: Annotated[float, typer.Option("--max-rel-error", min=0.0, help="Fail (exit 1) when a tensor's relative output error ||Y - Y_ref|| / ||Y_ref|| is above this.")] = DEFAULT_MAX_REL_ERROR,
    tensor: Annotated[Optional[list[str]], typer.Option("--tensor", help="Only tensors matching this glob or re:regex (repeatable).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the Gaussian input rows.")] = DEFAULT_SEED,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON (no table, no progress bar).")] = False,
    junit: Annotated[Optional[Path], typer.Option("--junit", help="Also write a JUnit XML report (one test case per tensor).")] = None,
    perplexity: Annotated[Optional[Path], typer.Option("--perplexity", help="A UTF-8 text: perplexity of the --reference model and of the packed one (both HF causal LM directories) on it.")] = None,
    max_ppl_increase: Annotated[Optional[float], typer.Option("--max-ppl-increase", min=0.0, help="Fail (exit 1) when the packed perplexity is more than this many percent above the reference's.")] = None,
    ppl_window: Annotated[int, typer.Option("--ppl-window", min=2, help="Perplexity window, tokens.")] = DEFAULT_WINDOW,
    ppl_tokens: Annotated[int, typer.Option("--ppl-tokens", min=2, help="Perplexity over the text's first N tokens.")] = DEFAULT_MAX_TOKENS,
) -> None:
    """Check a packed checkpoint: integrity first (FORMAT rules, crc32, reference), then
    per tensor the error of Y = X·Ŵᵀ against X·Wᵀ next to plain FP8 / INT8 per-channel.

    Exit 0: every tensor within --max-rel-error; 1: some tensor above it; 2: invalid
    input (corrupted file, mismatched reference, unavailable backend).
    """
    if not math.isfinite(max_rel_error):
        raise UMQError(f"--max-rel-error must be a finite number >= 0, got {max_rel_error}", rule="tolerance")
    if max_ppl_increase is not None and not math.isfinite(max_ppl_increase):
        raise UMQError(f"--max-ppl-increase must be a finite number >= 0, got {max_ppl_increase}", rule="tolerance")
    if perplexity is not None and reference is None:
        raise fail("--perplexity needs --reference (the unquantized model to compare against)")
    if max_ppl_increase is not None and perplexity is None:
        raise fail("--max-ppl-increase needs --perplexity TEXT")
    if perplexity is not None:
        perplexity_inputs(packed, reference, perplexity)  # bad input fails now, not after every check has run
    options = dict(
        reference=reference, activations=activations, backend=backend.value, rows=rows,
        max_rel_error=max_rel_error, tensors=tensor or (), seed=seed,
    )
    try:
        report = _run(packed, options, as_json)
    except UMQError as exc:
        if junit is not None:  # CI still gets a report saying why (then exit 2)
            _write_junit(junit, junit_error_xml(packed, exc))
        raise
    ppl = None if perplexity is None else packed_perplexity(
        packed, reference, perplexity, window=ppl_window, max_tokens=ppl_tokens
    )
    ppl_passed = ppl is None or max_ppl_increase is None or ppl.increase_pct <= max_ppl_increase
    if junit is not None:
        _write_junit(junit, junit_xml(report))
    if as_json:
        print_json({**report.to_json(), **({} if ppl is None else {"perplexity": ppl.to_json()})})
    else:
        render_report(report)
        if ppl is not None:
            render_perplexity(ppl, perplexity, max_ppl_increase)
    raise typer.Exit(EXIT_OK if report.passed and ppl_passed else EXIT_THRESHOLD)


def render_perplexity(ppl: PerplexityIncrease, text: Path, max_increase: float | None) -> None:
    table = Table(title=f"perplexity on {text}: first {ppl.tokens} tokens, windows of {ppl.window}", show_header=True)
    for header in ("reference", "packed", "increase"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_row(f"{ppl.reference:.4f}", f"{ppl.packed:.4f}", f"{ppl.increase_pct:+.3f}%")
    console.print(table)
    if max_increase is not None:
        verdict = "[green]within" if ppl.increase_pct <= max_increase else "[bold red]above"
        console.print(f"{verdict} --max-ppl-increase {max_increase:g}%[/]", highlight=False)


def _write_junit(path: Path, text: str) -> None:
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _run(packed: Path, options: dict, as_json: bool) -> VerifyReport:
    """verify(), with a progress bar on stderr unless the output is JSON."""
    if as_json:
        return verify(packed, **options)
    progress = progress_bar(
        TextColumn("[bold]verify"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}", style="dim"),
    )
    with progress:
        task = progress.add_task("integrity", total=None)

        def on_progress(name: str, done: int, total: int) -> None:
            progress.update(task, completed=done, total=total, description=name)

        return verify(packed, progress=on_progress, **options)


def _pct(value: float) -> str:
    """A relative error as a percentage, always two decimals (one column, one format)."""
    return f"{100 * value:.2f}%"


def _spec_text(spec) -> str:
    """``384x1536, 1 fp8_e4m3/row, 10.02 b``: shape, k, lo/block and stored bits per element."""
    block = "row" if spec.block == spec.columns else str(spec.block)
    return f"{spec.rows}x{spec.columns}, {spec.k} {spec.lo.value}/{block}, {spec.bits_per_element:.2f} b"


def _rows_text(report: VerifyReport) -> str:
    used = report.rows_used
    if not used:
        return "no rows"
    count = str(used[0]) if len(used) == 1 else f"{used[0]}-{used[-1]}"
    if report.activations:
        capped = f" (the stats file's sample; --rows {report.rows} caps it)" if used[-1] < report.rows else ""
        return f"{count} rows of activations from {report.activations}{capped}"
    return f"{count} Gaussian rows (seed {report.seed})"


def render_report(report: VerifyReport) -> None:
    if not report.measures_quantization:
        _render_integrity_only(report)
        return
    console.print(
        f"[bold]umq verify[/] {report.packed} against the reference {report.reference}: {report.backend} backend, "
        f"Y = X·Ŵᵀ vs Y_ref = X·Wᵀ on {_rows_text(report)}",
        highlight=False,
    )
    table = Table(show_header=True, header_style="bold")
    table.add_column("tensor\n[dim]shape, k lo/block, bits", overflow="fold", ratio=1)
    for header in ("rel. error", "max abs\nerror", "SQNR\n(dB)", "cosine", "FP8\nper-channel", "INT8\nper-channel",
                   "status"):
        table.add_column(header, justify="right", no_wrap=True)
    for result in report.tensors:
        error = result.error
        table.add_row(
            f"{result.name}\n[dim]{_spec_text(result.spec)}",
            _pct(error.rel_error),
            f"{error.max_abs_error:.2g}",
            "inf" if error.sqnr_db == float("inf") else f"{error.sqnr_db:.1f}",
            f"{error.cosine:.4f}",
            *(_pct(result.baselines[name].rel_error) for name in ("fp8_e4m3-channel", "int8-channel")),
            "[green]ok" if result.passed else "[bold red]FAIL",
        )
    console.print(table)
    console.print(
        "[dim]rel. error = ||Y - Y_ref|| / ||Y_ref|| (Frobenius); max abs error = max |Y - Y_ref|; "
        "FP8 / INT8 per-channel: the rel. error of the same weight as plain FP8 E4M3 / INT8 with one scale "
        "per output channel (8 bits + scale), for comparison; status: rel. error within --max-rel-error.[/]",
        highlight=False,
    )
    checks = ", ".join(report.integrity)
    console.print(f"integrity: {checks}; {report.passthrough_checked} pass-through tensors byte-identical",
                  highlight=False)
    failures = report.failures
    if failures:
        worst = max(failures, key=lambda t: t.error.rel_error)
        console.print(
            f"[bold red]{len(failures)} of {len(report.tensors)} tensors above --max-rel-error "
            f"{report.max_rel_error:g}[/] (worst: {worst.name}, {_pct(worst.error.rel_error)})",
            highlight=False,
        )
    else:
        worst = max(report.tensors, key=lambda t: t.error.rel_error)
        console.print(
            f"[green]all {len(report.tensors)} tensors within --max-rel-error {report.max_rel_error:g}[/] "
            f"(worst: {worst.name}, {_pct(worst.error.rel_error)}) in {report.seconds:.1f} s",
            highlight=False,
        )


def _render_integrity_only(report: VerifyReport) -> None:
    """Without --reference there is no unquantized weight to measure against: say so, and
    show what was checked (the backend's matmul against the codec's own decode)."""
    console.print(
        f"[bold]umq verify[/] {report.packed}: integrity only (no --reference, so no quantization error "
        f"was measured; pass --reference SRC for that)",
        highlight=False,
    )
    table = Table(show_header=True, header_style="bold")
    table.add_column("tensor", overflow="fold", ratio=1)
    table.add_column("shape, k lo/block, bits", no_wrap=True)
    table.add_column(f"{report.backend} matmul\nvs codec decode", justify="right", no_wrap=True)
    for result in report.tensors:
        agrees = "[green]same" if result.error.rel_error == 0.0 else f"{result.error.rel_error:.1e} rel."
        table.add_row(result.name, _spec_text(result.spec), agrees)
    console.print(table)
    console.print(f"[green]integrity ok[/]: {', '.join(report.integrity)} of {len(report.tensors)} tensors; "
                  f"matmul on {_rows_text(report)} in {report.seconds:.1f} s", highlight=False)
