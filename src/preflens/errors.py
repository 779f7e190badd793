"""User-facing errors.

Every error a user can cause (a bad file, a missing field, an impossible option) is raised as a
`PreflensError` with a message that names the file/row/field and what was expected. The CLI prints
these without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PreflensError(Exception):
    """An error caused by the user's input or options, with a message that says how to fix it."""


class DataError(PreflensError):
    """A dataset row or file is not what preflens expects."""


class RunDirError(PreflensError):
    """The run directory exists and would be overwritten, or cannot be resumed."""


class TrainingDivergedError(PreflensError):
    """The loss became NaN/inf; the last good checkpoint is kept."""
