"""What every command shares: the Typer app, consoles, and the error boundary.

Commands stay thin: parse options, call one core function, render what it returns.
User-facing failures (:class:`UMQError`, OS errors such as a full disk, Ctrl-C) become
one line on stderr and exit code 2; no traceback, and the core's atomic writers have
already removed any partial output by the time the error reaches here.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Annotated, Any, Callable, TypeVar

import typer
from rich.console import Console
from rich.progress import Progress
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from ..errors import UMQError

EXIT_OK = 0
EXIT_THRESHOLD = 1  # a check ran and some value is over its limit
EXIT_INVALID = 2  # invalid input, nothing (or nothing new) written

def _click_style(params: list) -> None:
    """Typer 0.29 labels every option with its Python type (``--force <bool>``,
    ``--include <list[str]>``) and arguments as ``{src}``; show them as Click tools do:
    flags bare, repeatable options by their element type, arguments in capitals."""
    for param in params:
        if param.metavar is not None:
            continue
        if isinstance(param, TyperArgument):
            param.metavar = (param.name or "").upper()
        elif isinstance(param, TyperOption):
            if param.is_flag or param.count:
                param.metavar = ""
            elif param.type_descriptor.is_list:
                param.metavar = param.display_type(None).replace("list[", "").replace("]", "")  # <list[str]> -> <str>


def _usage_pieces(command: Any, ctx: Any) -> list[str]:
    pieces = [command.options_metavar] if command.options_metavar else []
    for param in command.get_params(ctx):
        if isinstance(param, TyperArgument):
            name = param.metavar if param.required else f"[{param.metavar}]"
            pieces.append(name + ("..." if param.nargs != 1 else ""))
        else:
            pieces.extend(param.get_usage_pieces(ctx))
    return pieces


class _ClickStyleHelp:
    """Mixed into Typer's command and group classes: their options, the help option
    included, are shown as :func:`_click_style` says."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _click_style(self.params)  # type: ignore[attr-defined]

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            _click_style([option])
        return option


class UMQCommand(_ClickStyleHelp, TyperCommand):
    """A command whose help screen reads like any Click tool's."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return _usage_pieces(self, ctx)


class UMQGroup(_ClickStyleHelp, TyperGroup):
    """The ``umq`` group, with the same help-screen conventions as its commands."""


class _UMQApp(typer.Typer):
    """Every command registered on ``app`` gets :class:`UMQCommand` unless it names a class."""

    def command(self, *args: Any, cls: Any = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or UMQCommand, **kwargs)


app = _UMQApp(
    name="umq",
    cls=UMQGroup,
    help="Unstructured mixture quantization for safetensors checkpoints: in every group "
    "of 8 weights, k stay 16-bit and the rest go 8-bit with a shared scale.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can be multi-GB tensors
    add_completion=False,
    rich_markup_mode="markdown",  # reflow docstring paragraphs to the terminal width
)

def _make_console(*, stderr: bool = False) -> Console:
    made = Console(stderr=stderr)
    if not made.is_terminal and "COLUMNS" not in os.environ:
        # Piped or redirected: rich would cut tables at 80 columns ("encoder.lay…"), and a
        # cut tensor name cannot be recovered from a log; a file or a pager can wrap.
        made.width = PIPED_WIDTH
    return made


PIPED_WIDTH = 240
console = _make_console()
err_console = _make_console(stderr=True)


def progress_bar(*columns: Any) -> Progress:
    """The progress bar every command uses: on stderr, gone when done, and off when
    stderr is not a terminal, so piped output and logs hold no bar remnants (no blank
    line before an error)."""
    return Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = EXIT_INVALID) -> typer.Exit:
    """Print ``message`` to stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code)


# The core's hints name library parameters; on the command line they read as flags.
FLAG_HINTS = {
    "use hi bfloat16 or auto": "use --hi bfloat16 or auto",
    "use backend torch or auto": "use --backend torch or auto",
    "give act_sq from umq calibrate": "pass --stats from umq calibrate",
    "give the statistics file": "pass --stats",
    "unpack with dtype float32 or source": "unpack with --dtype float32 or source",
    "pass force=True to replace it": "pass --force to replace it",
    "compare it without activations, or leave it out of the tensor patterns":
        "compare it without --activations, or leave it out of --tensor",
}


def error_boundary(fn: F) -> F:
    """Turn user-facing failures into one stderr line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UMQError as exc:
            exc.hint = FLAG_HINTS.get(exc.hint, exc.hint)
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


def version_line() -> str:
    from .. import __version__
    from ..format import FORMAT_VERSION

    return f"umq {__version__} (FORMAT v{FORMAT_VERSION})"


def _print_version(value: bool) -> None:
    if value:
        console.print(version_line(), highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print the umq version and the FORMAT version, then exit.")] = False,
) -> None:
    """Unstructured mixture quantization for safetensors checkpoints: in every group of 8
    weights, k stay 16-bit and the rest go 8-bit with a shared scale."""
