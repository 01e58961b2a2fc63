"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

from pathlib import Path


class HQExportError(Exception):
    """A problem with the user's input: a file, a flag, a model we cannot handle.

    The message is kept on one line (runs of whitespace, newlines included, become one space): it often quotes a
    library's error about a damaged file, which may span lines or hold the file's own bytes.
    """

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.message = " ".join(message.split())
        text = f"{self.path}: {self.message}" if self.path is not None else self.message
        super().__init__(" ".join(text.split()))


class UnsupportedModelError(HQExportError):
    """The model is valid but uses something hqexport cannot export exactly."""
