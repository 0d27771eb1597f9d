"""User-facing errors: one line naming the file, the record and the field.

The CLI catches :class:`PrefrecError` and prints ``str(err)`` with exit code 2, so every
error a user can cause by bad input must be one of these, never a bare traceback.
"""

from __future__ import annotations

from pathlib import Path


class PrefrecError(Exception):
    """An error caused by the user's input or environment, printed as one line."""


class DataError(PrefrecError):
    """Bad data in an input file.

    ``DataError("a.json", 17, "output", "expected a string or a list of two strings")``
    prints as ``a.json: record 17: field 'output': expected a string or a list of two strings``.
    """

    def __init__(
        self,
        path: str | Path | None,
        record: int | None,
        field: str | None,
        message: str,
    ) -> None:
        self.path = str(path) if path is not None else None
        self.record = record
        self.field = field
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = []
        if self.path is not None:
            parts.append(self.path)
        if self.record is not None:
            parts.append(f"record {self.record}")
        if self.field is not None:
            parts.append(f"field '{self.field}'")
        parts.append(self.message)
        return ": ".join(parts)
