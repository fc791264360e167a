"""The ``umq`` command line. Each command lives in its own module and registers itself
on the shared Typer ``app``; this package only wires them together."""

from __future__ import annotations

from ._common import app

# Importing a command module registers its command on ``app``.
from . import info  # noqa: F401,E402
from . import compare  # noqa: F401,E402
from . import pack  # noqa: F401,E402
from . import inspect  # noqa: F401,E402
from . import unpack  # noqa: F401,E402
from . import verify  # noqa: F401,E402
from . import calibrate  # noqa: F401,E402


def main() -> None:
    app()


__all__ = ["app", "main"]
