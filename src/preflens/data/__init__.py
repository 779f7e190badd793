"""Preference data: read and validate rows (`formats`), tokenize and batch (`collate`), generate (`synthetic`).

The data path is `load_pairs` -> `tokenize_pairs` -> `collate_pairs` (ARCHITECTURE.md "One data path").
Only the light `formats` names are imported here; `collate` imports torch when used.
"""

from preflens.data.formats import DataReport, PreferencePair, load_pairs, merge_reports, write_pairs

__all__ = ["DataReport", "PreferencePair", "load_pairs", "merge_reports", "write_pairs"]
