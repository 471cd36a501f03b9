"""The one error type the stack raises for bad input, and how it names what was wrong."""

from __future__ import annotations

from pathlib import Path


class PerceptionError(Exception):
    """Bad input or configuration. The message names the file, key or token and what was wrong.

    The CLI prints it as one line on stderr and exits non-zero (``--debug`` shows the traceback).
    """


class DataError(PerceptionError):
    """A data file or table is missing, unreadable or inconsistent."""

    def __init__(self, what: str, *, path: str | Path | None = None, token: str | None = None):
        parts = []
        if path is not None:
            parts.append(str(path))
        if token:
            parts.append(f"sample {token}")
        prefix = ": ".join([", ".join(parts)]) if parts else ""
        super().__init__(f"{prefix}: {what}" if prefix else what)
        self.path = None if path is None else Path(path)
        self.token = token
        self.what = what


class ConfigError(PerceptionError):
    """A configuration key is unknown, missing or has the wrong type; the message gives its path."""
