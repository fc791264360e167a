"""The one error type users see.

Every failure caused by the input (a bad file, a tensor that breaks a FORMAT rule, a
value that cannot be encoded) is raised as :class:`UMQError`. It names the file, the
tensor and the rule, so the CLI can print one clear line and exit with code 2. Internal
invariants use ``assert``: those are bugs, not bad input.
"""

from __future__ import annotations

from pathlib import Path


class UMQError(Exception):
    """A user-facing failure: what went wrong, and where.

    ``rule`` is a short, stable identifier (``"crc32"``, ``"popcount"``, ``"finite"``, ...)
    that tests and scripts can match on; ``file`` and ``tensor`` locate the problem;
    ``hint`` says what to do instead in the library's own terms (parameter names, never
    command-line flags: the CLI swaps in its flag wording per rule).
    """

    def __init__(
        self,
        message: str,
        *,
        rule: str,
        file: str | Path | None = None,
        tensor: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.rule = rule
        self.hint = hint
        self.file = None if file is None else str(file)
        self.tensor = tensor

    def located(self, *, file: str | Path | None = None, tensor: str | None = None) -> "UMQError":
        """Fill in a location the raiser did not know (keeps what it did know)."""
        if self.file is None and file is not None:
            self.file = str(file)
        if self.tensor is None and tensor is not None:
            self.tensor = tensor
        return self

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(self.file)
        if self.tensor:
            where.append(f"tensor '{self.tensor}'")
        prefix = ": ".join(where)
        text = f"{prefix}: {self.message}" if prefix else self.message
        if self.hint:
            text += f" ({self.hint})"
        return f"{text} [rule: {self.rule}]"
