"""The options of `preflens probe` that can be refused from their values alone.

A leaf without torch: the command calls it before the heavy imports (a wrong flag is reported in about
a second), and `probe_table.run_probe` calls it for library users; one set of checks and messages.
"""

from __future__ import annotations

from pathlib import Path

from preflens.errors import PreflensError

__all__ = ["check_probe_options"]


def check_probe_options(output: str | Path, batch_size: int, lr: float) -> None:
    """Raise a one-line `PreflensError` for an output that is not parquet, a batch size < 1, or lr <= 0."""
    if Path(output).suffix.lower() != ".parquet":
        raise PreflensError(f"--output {output}: the per-pair table is parquet; name it *.parquet")
    if batch_size < 1:
        raise PreflensError(f"--batch-size must be >= 1, got {batch_size}")
    if not lr > 0:
        raise PreflensError(f"--lr must be > 0, got {lr}")
