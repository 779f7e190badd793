"""Byte sizes as users write them ('6GB', '500MiB', '2000000000'), for `--max-memory` and config files.

Why its own torch-free module: the commands validate `--max-memory` before the heavy imports (fail fast),
and `grad.memory` parses the same value from a config file; one parser keeps the two from drifting apart.
"""

from __future__ import annotations

import re

from preflens.errors import PreflensError

__all__ = ["parse_size"]

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(value: int | str | None, flag: str = "--max-memory") -> int | None:
    """'6GB' -> 6e9, '500MiB' -> 500 * 2^20, '123' or 123 -> 123 bytes, None / 'auto' -> None (the default
    budget); anything else: a one-line `PreflensError` naming `flag` (a config file's value lands here)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise PreflensError(
            f"{flag}: expected a positive size such as 6GB, 500MiB or 2000000000 (bytes), got {value!r}"
        )
    return int(float(m.group(1)) * _UNITS[unit])
