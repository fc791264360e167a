"""``umq version``: versions of umq, the format and the backends present."""

from __future__ import annotations

from .. import __version__
from ..format import FORMAT_VERSION
from ._common import app, console


@app.command("version")
def version() -> None:
    """Print the umq version and the FORMAT version it reads and writes."""
    console.print(f"umq {__version__} (FORMAT v{FORMAT_VERSION})")
