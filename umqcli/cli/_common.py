"""What every command shares: the Typer app, consoles, and the error boundary.

Commands stay thin: parse options, call one core function, render what it returns.
User-facing failures (:class:`UMQError`, OS errors such as a full disk, Ctrl-C) become
one line on stderr and exit code 2; no traceback, and the core's atomic writers have
already removed any partial output by the time the error reaches here.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from ..errors import UMQError

EXIT_OK = 0
EXIT_THRESHOLD = 1  # a check ran and some value is over its limit
EXIT_INVALID = 2  # invalid input, nothing (or nothing new) written

app = typer.Typer(
    name="umq",
    help="Unstructured mixture quantization for safetensors checkpoints: in every group "
    "of 8 weights, k stay 16-bit and the rest go 8-bit with a shared scale.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can be multi-GB tensors
    add_completion=False,
    rich_markup_mode="markdown",  # reflow docstring paragraphs to the terminal width
)

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = EXIT_INVALID) -> typer.Exit:
    """Print ``message`` to stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code)


def error_boundary(fn: F) -> F:
    """Turn user-facing failures into one stderr line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UMQError as exc:
            raise fail(_escape(str(exc))) from None
        except KeyboardInterrupt:
            raise fail("interrupted; no output was left behind") from None
        except OSError as exc:
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            raise fail(_escape(f"{where}{exc.strerror or exc}")) from None

    return wrapper  # type: ignore[return-value]


def human_bytes(nbytes: int) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, as file managers show sizes)."""
    value = float(nbytes)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def print_json(payload: Any) -> None:
    """Machine-readable output: plain JSON on stdout, nothing else."""
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


@app.callback()
def _root() -> None:
    """Unstructured mixture quantization for safetensors checkpoints: in every group of 8
    weights, k stay 16-bit and the rest go 8-bit with a shared scale."""
