"""A stored series' errors, apart so that the modules reading a series (`series`, `frames`)
share them without importing each other."""

from __future__ import annotations


class SeriesError(ValueError):
    """The series cannot be stored or read as one volume (message holds no PHI)."""


class SeriesIncomplete(SeriesError):
    """The series group has no commit marker: a commit never finished."""
