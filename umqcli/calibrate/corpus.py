"""Calibration text: the documents a calibration run reads (files or a directory of them),
and installed packages' READMEs as real prose that is always available offline."""

from __future__ import annotations

from pathlib import Path

from ..errors import UMQError

TEXT_SUFFIXES = (".txt", ".md", ".rst")


def read_documents(data: str | Path) -> list[tuple[str, str]]:
    """Calibration text: ``[(file name, text)]`` from one file or, for a directory, every
    ``*.txt`` / ``*.md`` / ``*.rst`` below it in sorted path order (so runs are repeatable).

    Raises :class:`UMQError` (rule ``calibration-data``) for a missing path, a directory
    without text files, text that is not UTF-8, or no text at all.
    """
    data = Path(data)
    if data.is_dir():
        files = sorted(p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise UMQError(
                f"no {'/'.join(TEXT_SUFFIXES)} files in the directory", rule="calibration-data", file=data
            )
    elif data.is_file():
        files = [data]
    else:
        raise UMQError("calibration data not found", rule="calibration-data", file=data)
    documents = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UMQError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", rule="calibration-data",
                           file=path) from None
        if text.strip():
            documents.append((str(path), text))
    if not documents:
        raise UMQError("the calibration text is empty", rule="calibration-data", file=data)
    return documents


def package_readme(distribution: str) -> str:
    """The long description (README) that an installed Python distribution ships in its
    ``METADATA`` file, without the header fields: real prose available offline, used by
    the tests and benchmarks as calibration and held-out text."""
    from importlib import metadata

    try:
        raw = metadata.distribution(distribution).read_text("METADATA") or ""
    except metadata.PackageNotFoundError:
        raise UMQError(f"distribution {distribution!r} is not installed", rule="calibration-data") from None
    _, _, body = raw.partition("\n\n")  # RFC 822 style: headers, one blank line, body
    return body.strip()
