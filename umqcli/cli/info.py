"""``umq version``: versions of umq, the format and the backends present."""

from __future__ import annotations

from ._common import app, console, version_line


@app.command("version")
def version() -> None:
    """Print the umq version and the FORMAT version it reads and writes."""
    console.print(version_line(), highlight=False)
