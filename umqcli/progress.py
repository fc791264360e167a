"""The progress callback every long core operation takes: ``progress(stage, done, total)``.

The core never prints; the CLI passes a callback that draws a bar, library users pass
their own or nothing (:func:`no_progress`)."""

from __future__ import annotations

from typing import Callable

ProgressFn = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:
    """The default callback: report nothing."""

