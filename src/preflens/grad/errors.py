"""The one error of the per-sequence gradient package."""

from __future__ import annotations

from preflens.errors import PreflensError

__all__ = ["GramError"]


class GramError(PreflensError):
    """A parameter whose per-sequence gradient cannot be computed exactly by the hooks."""
