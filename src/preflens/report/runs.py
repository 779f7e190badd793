"""Reading a run directory into one `RunData`, and the per-step numbers the diagnosis and figures share.

The layout is ARCHITECTURE.md's (file names from `preflens.tracking`): metrics.jsonl, pairs.parquet,
probes.parquet, config.yaml, and CHES scores written by `preflens ches` into or beside the run. A file
that is absent is not an error (its report section is skipped); a directory with none of the three
tables is, and a `preflens compare`/`demo` directory (one run per sub-directory) says which to report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from preflens.diagnostics.displacement import ChesVsChange, ches_vs_change, fell_tolerance
from preflens.errors import PreflensError
from preflens.tracking import CONFIG_FILE, METRICS_FILE, PAIRS_FILE, PROBES_FILE

__all__ = [
    "CHES_SCORES_FILE",
    "RunData",
    "load_run",
    "find_column",
    "frac_chosen_fell_by_step",
    "mean_trajectory",
    "logps_series",
    "ches_result",
]

# Where `preflens demo` (and the report's "Skipped" note) put a run's CHES scores.
CHES_SCORES_FILE = "ches_scores.parquet"


@dataclass
class RunData:
    """What a run directory holds; each field None when its file is absent."""

    run_dir: Path
    metrics: Any = None  # DataFrame from metrics.jsonl
    pairs: Any = None  # DataFrame from pairs.parquet
    probes: Any = None  # DataFrame from probes.parquet
    ches_path: Path | None = None
    config: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def fell_tol(self) -> float:
        """The trainer's threshold for "chosen fell" (`preflens.diagnostics.displacement.fell_tolerance`)
        for this run's precision; float32's when the run directory has no config.yaml (e.g. a TRL run)."""
        cfg = self.config or {}
        return fell_tolerance(cfg.get("dtype"), cfg.get("mixed_precision"))

    def metric_rows(self, split: str) -> Any:
        """Rows of metrics.jsonl for one split, sorted by step (empty DataFrame when none)."""
        if self.metrics is None or "split" not in self.metrics.columns:
            return pd.DataFrame()
        return self.metrics[self.metrics["split"] == split].sort_values("step", kind="stable")


def find_column(df: Any, *names: str) -> str | None:
    """The first of `names` that `df` has with at least one value, or None (also for `df` None)."""
    for n in names:
        if df is not None and n in df.columns and df[n].notna().any():
            return n
    return None


def _read_metrics(path: Path, notes: list[str]) -> Any:
    rows = []
    with path.open() as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                # a run that is still writing may end with a half line; anything else is worth saying
                notes.append(f"{path.name} line {i}: not valid JSON, skipped")
                continue
            if not isinstance(row, dict) or "step" not in row:
                notes.append(f"{path.name} line {i}: expected an object with a 'step' key, skipped")
                continue
            rows.append(row)
    if not rows:
        return None
    df = pd.DataFrame(rows)
    if "split" not in df.columns:
        df["split"] = "train"
    df["split"] = df["split"].fillna("train")
    return df


def _read_table(path: Path) -> Any:
    """A parquet table of the run, None when it has no rows."""
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # a truncated file from a killed run
        raise PreflensError(f"{path}: cannot be read as parquet ({exc})") from None
    return df if len(df) else None


def _find_ches(run_dir: Path) -> Path | None:
    """CHES scores written by `preflens ches` (columns pair_index, score) into or beside the run."""
    candidates = [
        run_dir / CHES_SCORES_FILE,
        run_dir / "ches.parquet",
        run_dir / "ches" / "scores.parquet",
    ]
    candidates += sorted(run_dir.glob("*ches*.parquet")) + sorted(run_dir.glob("ches*/*.parquet"))
    for c in candidates:
        if c.is_file():
            return c
    return None


def _check_pairs(run: RunData) -> None:
    """pairs.parquet needs step, pair_id, chosen, rejected; a missing split column means eval rows."""
    missing = [c for c in ("step", "pair_id", "chosen", "rejected") if c not in run.pairs.columns]
    if missing:
        raise PreflensError(
            f"{run.run_dir / PAIRS_FILE}: missing column(s) {missing}; expected step, split, pair_id, "
            "chosen, rejected, ref_chosen, ref_rejected"
        )
    if "split" not in run.pairs.columns:
        run.pairs["split"] = "eval"


def _read_config(run: RunData) -> None:
    cfg = run.run_dir / CONFIG_FILE
    if not cfg.is_file():
        return
    try:
        loaded = yaml.safe_load(cfg.read_text())
        run.config = loaded if isinstance(loaded, dict) else None
    except Exception:
        run.notes.append(f"{CONFIG_FILE} could not be parsed; not shown")


def _no_tables_error(run_dir: Path) -> PreflensError:
    """Why a directory without any of the three tables cannot be reported, and what to report instead."""
    # `preflens compare` and `preflens demo` write one run per sub-directory: point at them
    runs = sorted(d.name for d in run_dir.iterdir() if d.is_dir() and (d / METRICS_FILE).is_file())
    if runs:
        made = " (its summary is compare.html)" if (run_dir / "compare.html").is_file() else ""
        return PreflensError(
            f"{run_dir}: holds one run per sub-directory ({', '.join(runs)}){made}; report one of "
            f"them, e.g. preflens report {run_dir / runs[0]}"
        )
    return PreflensError(
        f"{run_dir}: none of {METRICS_FILE}, {PAIRS_FILE}, {PROBES_FILE} found; "
        "is this the --output-dir of `preflens train` (or of a TRL run with the preflens callback)?"
    )


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory. Missing files are not errors (their sections are skipped); a directory
    with none of metrics.jsonl, pairs.parquet, probes.parquet is."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PreflensError(f"{run_dir}: no such run directory (expected the --output-dir of a preflens run)")
    run = RunData(run_dir=run_dir)
    if (run_dir / METRICS_FILE).is_file():
        run.metrics = _read_metrics(run_dir / METRICS_FILE, run.notes)
    if (run_dir / PAIRS_FILE).is_file():
        run.pairs = _read_table(run_dir / PAIRS_FILE)
    if (run_dir / PROBES_FILE).is_file():
        run.probes = _read_table(run_dir / PROBES_FILE)
    if run.pairs is not None:
        _check_pairs(run)
    run.ches_path = _find_ches(run_dir)
    _read_config(run)
    if run.metrics is None and run.pairs is None and run.probes is None:
        raise _no_tables_error(run_dir)
    return run


def frac_chosen_fell_by_step(pairs: Any, split: str, tol: float = 0.0) -> Any:
    """Per step: share of pairs whose chosen log-prob is more than `tol` nats below its value at that
    pair's first measurement (likelihood displacement, Razin et al. 2024, arXiv 2410.08847, Sec. 1;
    `RunData.fell_tol` gives the trainer's threshold). Returns a DataFrame step, frac, n.
    The first step itself counts 0 by definition and is kept so the curve starts at zero."""
    df = pairs[pairs["split"] == split].sort_values(["pair_id", "step"], kind="stable")
    if df.empty:
        return pd.DataFrame(columns=["step", "frac", "n"])
    start = df.groupby("pair_id")["chosen"].transform("first")
    fell = df["chosen"] < start - tol
    out = (
        df.assign(fell=fell)
        .groupby("step")
        .agg(frac=("fell", "mean"), n=("fell", "size"))
        .reset_index()
        .sort_values("step")
    )
    return out


def mean_trajectory(pairs: Any, split: str, col: str) -> Any:
    """Mean over pairs of `col` minus its value at the pair's first measurement, per step."""
    df = pairs[pairs["split"] == split].sort_values(["pair_id", "step"], kind="stable")
    start = df.groupby("pair_id")[col].transform("first")
    return df.assign(d=df[col] - start).groupby("step")["d"].mean()


def logps_series(run: RunData, split: str) -> dict[str, Any]:
    """Mean chosen/rejected summed log-prob per step of one split, and what it averages over.

    A train metrics row is the mean over that step's batch, i.e. over different pairs at every step: its
    curve moves with which pairs were drawn, not only with training. When pairs.parquet tracks the same
    pairs at every evaluation (the fixed train subset, the eval split), their per-step mean is the
    trajectory; the batch means are the fallback (e.g. a TRL run).
    """
    if run.pairs is not None:
        df = run.pairs[run.pairs["split"] == split]
        if df["step"].nunique() > 1:
            g = df.groupby("step")
            return {
                "step": list(g.size().index),
                "chosen": list(g["chosen"].mean()),
                "rejected": list(g["rejected"].mean()),
                "source": (
                    f"fixed subset of {df['pair_id'].nunique()} train pairs"
                    if split == "train"
                    else f"{df['pair_id'].nunique()} {split} pairs"
                ),
            }
    m = run.metric_rows(split)
    if not (find_column(m, "logps/chosen") and find_column(m, "logps/rejected")):
        return {"step": [], "chosen": [], "rejected": [], "source": "none"}
    m = m[m["logps/chosen"].notna()]
    return {
        "step": list(m["step"]),
        "chosen": list(m["logps/chosen"]),
        "rejected": list(m["logps/rejected"]),
        "source": "batch means",
    }


def ches_result(run: RunData) -> ChesVsChange | None:
    """The run's CHES scores joined with its per-pair chosen change (train split), or None.

    None when the run has no CHES scores or no pairs.parquet; scores that match no pair of the run are
    a note on the page, not an error (the rest of the report still holds).
    """
    if run.ches_path is None or run.pairs is None:
        return None
    try:
        return ches_vs_change(run.ches_path, run.run_dir, split="train")
    except PreflensError as exc:
        run.notes.append(f"CHES scores not matched to the run: {exc}")
        return None
