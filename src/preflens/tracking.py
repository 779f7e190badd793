"""The run directory of `preflens train`: layout, refusal to clobber, resume, and the metric writers.

Layout (ARCHITECTURE.md): `config.yaml`, `data_report.json`, `metrics.jsonl`, `pairs.parquet`,
`probes.parquet`, `reference_logps.pt`, `checkpoints/step-N/`, `final/`, `tb/`.

Why the rules here:
- a run directory that holds results is never overwritten by accident: an existing, non-empty
  directory is refused unless the user says `--overwrite` (delete it) or `--resume` (continue it);
- `metrics.jsonl` is appended line by line, so a killed run keeps everything up to its last step
  and a reader (`preflens report`) can follow a live run;
- on resume, rows logged *after* the checkpoint being resumed are dropped (the resumed run logs
  them again), so the file never holds two different values for one step;
- the parquet tables are rewritten atomically (temp file + rename) when the trainer flushes them
  (before each checkpoint), never left half-written;
- only the main process writes (`enabled=False` elsewhere): under `accelerate launch` every process
  runs the same code, and metrics are reduced across processes before they reach the writer.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from preflens.errors import RunDirError

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "PAIRS_FILE",
    "PROBES_FILE",
    "LOCK_FILE",
    "lock_run_dir",
    "prepare_run_dir",
    "unlock_run_dir",
    "latest_checkpoint",
    "checkpoint_dir",
    "prune_checkpoints",
    "save_checkpoint",
    "write_config",
    "read_config",
    "MetricsWriter",
    "TableWriter",
    "RunTracker",
]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
PAIRS_FILE = "pairs.parquet"
PROBES_FILE = "probes.parquet"
DATA_REPORT_FILE = "data_report.json"
CHECKPOINTS = "checkpoints"


def prepare_run_dir(path: str | Path, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Create the run directory, refusing to clobber results.

    - missing or empty directory: created (`resume` is then an error: nothing to resume);
    - non-empty: `resume` keeps it; `overwrite` deletes its contents first; neither is an error.
    Call on the main process only (the others wait for it).
    """
    path = Path(path)
    if overwrite and resume:
        raise RunDirError("--overwrite and --resume exclude each other: pick one")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path}: exists and is a file, not a run directory")
    if resume and not path.is_dir():
        raise RunDirError(f"{path}: nothing to resume (the directory is missing or empty)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"{path}: cannot create the run directory ({exc.strerror or exc})") from None
    lock_run_dir(path)  # before anything is read or deleted: a second run into it refuses here
    non_empty = any(child.name != LOCK_FILE for child in path.iterdir())
    if non_empty:
        if resume:
            if latest_checkpoint(path) is None:
                raise RunDirError(
                    f"{path}: nothing to resume (no {CHECKPOINTS}/step-N inside); "
                    "pass --overwrite to start it again"
                )
            return path
        if not overwrite:
            raise RunDirError(
                f"{path}: exists and is not empty (a previous run's results?); pass --overwrite to replace it, "
                "--resume to continue it, or another --output-dir"
            )
        refusal = _not_a_run_dir(path)
        if refusal:
            raise RunDirError(
                f"{path}: --overwrite deletes everything inside, and only replaces a previous run's directory; "
                f"{refusal}. Pick another --output-dir"
            )
        for child in path.iterdir():
            if child.name == LOCK_FILE:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    elif resume:
        raise RunDirError(f"{path}: nothing to resume (the directory is missing or empty)")
    return path


# One writer per run directory. `prepare_run_dir` takes an exclusive advisory lock (flock) on RUN/.lock and
# holds it while the process lives (the kernel drops it when the process ends, kill -9 included, so a stale
# lock never blocks a --resume); a second training into the same --output-dir refuses before it reads,
# deletes or writes anything. The same process may prepare the directory again (train, then resume).
LOCK_FILE = ".lock"
_LOCKS: dict[str, Any] = {}


def lock_run_dir(path: str | Path) -> None:
    """Take RUN/.lock for this process, or raise `RunDirError` naming the process that holds it."""
    path = Path(path)
    key = str(path.resolve())
    if key in _LOCKS:
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks
        return
    lock = path / LOCK_FILE
    try:
        f = open(lock, "a+")  # noqa: SIM115 (held open: the lock lives as long as the file descriptor)
    except OSError as exc:
        raise RunDirError(
            f"{path}: cannot write to the run directory ({exc.strerror or exc}); is it read-only? "
            "Pick a writable --output-dir"
        ) from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunDirError(
            f"{path}: another preflens run is writing to it ({holder}, lock {lock}); wait for it to finish, "
            "or pick another --output-dir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}")
    f.flush()
    _LOCKS[key] = f


def unlock_run_dir(path: str | Path) -> None:
    """Release RUN/.lock if this process holds it (the end of a run; a notebook may then resume it elsewhere)."""
    f = _LOCKS.pop(str(Path(path).resolve()), None)
    if f is not None:
        f.close()


def _not_a_run_dir(path: Path) -> str | None:
    """Why `path` must not be emptied by --overwrite, or None when it looks like a run directory.

    A typo such as `--output-dir .` or `--output-dir runs` (the parent of all runs) with --overwrite
    would otherwise delete a project or every run. Every preflens run writes config.yaml or
    metrics.jsonl first; a directory with neither is not one.
    """
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve():
        return "it is the working directory, one of its parents, or the home directory"
    if (path / ".git").exists():
        return "it holds a git repository"
    if not ((path / CONFIG_FILE).is_file() or (path / METRICS_FILE).is_file()):
        names = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE)
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        return f"it has no {CONFIG_FILE} or {METRICS_FILE}, so it is not a run directory (it holds {shown})"
    return None


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step}"


def _checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """`checkpoints/step-N` with the largest N, or None."""
    found = _checkpoints(Path(run_dir))
    return found[-1] if found else None


def save_checkpoint(
    accelerator: Any, path: str | Path, write_extra: Callable[[Path], None] | None = None
) -> Path:
    """`accelerator.save_state` into `path`, all or nothing.

    Written as `step-N.partial` and renamed once complete: a save cut short (disk full, kill -9, a lost
    node) leaves a `.partial` directory, which `latest_checkpoint` does not take for a checkpoint, so
    `--resume` uses the previous complete one instead of failing deep inside safetensors.
    `write_extra(dir)` adds files of the caller's own (rank 0) before the rename. All processes call this.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for stale in (partial, path):  # e.g. an earlier attempt at this step
            if stale.exists():
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if write_extra is not None:
                write_extra(partial)
            partial.rename(path)
    except (
        Exception
    ) as exc:  # disk full, quota, file size limit, I/O error: safetensors/torch wrap the OSError
        raise _save_failed(path, partial, exc) from None
    accelerator.wait_for_everyone()
    return path


def _save_failed(path: Path, partial: Path, exc: Exception) -> RunDirError:
    """One line for a checkpoint that could not be written; its partial directory is removed (the space
    it took is given back) and the previous complete checkpoint is named: it is intact and resumable."""
    shutil.rmtree(partial, ignore_errors=True)
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    try:
        free = shutil.disk_usage(path.parent).free
        space = f"; {free / 2**20:.1f} MiB free there"
    except OSError:
        space = ""
    prev = latest_checkpoint(path.parent.parent)
    kept = (
        f"the previous checkpoint {prev} is intact: free space, then --resume"
        if prev
        else "no earlier checkpoint"
    )
    return RunDirError(
        f"{path}: writing the checkpoint failed ({type(exc).__name__}: {reason}{space}); {kept}"
    )


def prune_checkpoints(run_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete all but the `keep` newest checkpoints (None or 0 keeps all); returns what was deleted."""
    if not keep:
        return []
    found = _checkpoints(Path(run_dir))
    gone = found[:-keep]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def _yaml_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _yaml_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yaml_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_config(run_dir: str | Path, config: Mapping[str, Any]) -> Path:
    """config.yaml: the resolved configuration (what `--config` of a rerun or `--resume` reads back)."""
    import yaml

    path = Path(run_dir) / CONFIG_FILE
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(_yaml_safe(dict(config)), sort_keys=False))
    os.replace(tmp, path)
    return path


def read_config(run_dir: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunDirError(f"{path}: missing; is {run_dir} a preflens train run directory?")
    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict):
        raise RunDirError(f"{path}: expected a mapping of option: value")
    return loaded


def _json_value(v: Any) -> Any:
    """Tensors/numpy scalars as plain numbers; NaN/inf as null (strict JSON has no NaN)."""
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsWriter:
    """`metrics.jsonl`: one JSON object per line, each with `step` and `split`."""

    def __init__(self, path: str | Path, *, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> int:
        """Drop rows with `step` > `step` (resume); returns how many were dropped.

        A trailing half line (the run was killed mid-write) is dropped too.
        """
        if not self.enabled or not self.path.exists():
            return 0
        keep, dropped = [], 0
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if int(row.get("step", 0)) <= step:
                keep.append(line)
            else:
                dropped += 1
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, self.path)
        return dropped

    def write(self, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _json_value(v) for k, v in row.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


class TableWriter:
    """A parquet table (`pairs.parquet`, `probes.parquet`) kept in memory and rewritten atomically.

    Rows carry a `step` column so that resume can drop the rows logged after the checkpoint.
    """

    def __init__(self, path: str | Path, *, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self._dirty = False

    def load(self, up_to_step: int | None = None) -> None:
        """Read the existing table (resume), keeping rows with step <= `up_to_step`."""
        if not self.enabled or not self.path.exists():
            return
        import pandas as pd

        df = pd.read_parquet(self.path)
        if up_to_step is not None and "step" in df.columns:
            df = df[df["step"] <= up_to_step]
        self.rows = df.to_dict("records")
        self._dirty = True

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        if not self.enabled:
            return
        new = [dict(r) for r in rows]
        if new:
            self.rows.extend(new)
            self._dirty = True

    def flush(self) -> None:
        if not self.enabled or not self._dirty:
            return
        import pandas as pd

        tmp = self.path.with_suffix(".parquet.tmp")
        pd.DataFrame(self.rows).to_parquet(tmp, index=False)
        os.replace(tmp, self.path)
        self._dirty = False


class RunTracker:
    """metrics.jsonl + parquet tables + accelerate's trackers (TensorBoard) behind one `log` call.

    `accelerator` is an `accelerate.Accelerator` created with `log_with="tensorboard"` and
    `project_dir=run_dir/"tb"` (or without trackers); `log` sends each numeric value to it as
    `split/key` at `step`. Only the main process writes files (`accelerator.is_main_process`).
    """

    def __init__(self, run_dir: str | Path, accelerator: Any = None, *, enabled: bool | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.accelerator = accelerator
        if enabled is None:
            enabled = accelerator is None or bool(accelerator.is_main_process)
        self.enabled = enabled
        self.metrics = MetricsWriter(self.run_dir / METRICS_FILE, enabled=enabled)
        self.tables: dict[str, TableWriter] = {}

    def table(self, name: str) -> TableWriter:
        """The table `<run_dir>/<name>.parquet` (created on first use)."""
        if name not in self.tables:
            self.tables[name] = TableWriter(self.run_dir / f"{name}.parquet", enabled=self.enabled)
        return self.tables[name]

    def resume_at(self, step: int, tables: Iterable[str] = ("pairs", "probes")) -> None:
        """Drop everything logged after `step` (the checkpoint being resumed)."""
        self.metrics.truncate_after(step)
        for name in tables:
            self.table(name).load(up_to_step=step)

    def log(self, row: Mapping[str, Any]) -> None:
        """One metrics row: {"step": int, "split": str, key: value, ...}."""
        self.metrics.write(row)
        if self.accelerator is not None and getattr(self.accelerator, "trackers", None):
            split = row.get("split", "train")
            values = {}
            for k, v in row.items():
                if k in ("step", "split"):
                    continue
                v = _json_value(v)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    values[f"{split}/{k}"] = v
            if values:
                self.accelerator.log(values, step=int(row["step"]))

    def flush(self) -> None:
        for t in self.tables.values():
            t.flush()
        if self.accelerator is not None and getattr(self.accelerator, "trackers", None):
            for tr in self.accelerator.trackers:
                writer = getattr(tr, "writer", None)
                if writer is not None and hasattr(writer, "flush"):
                    writer.flush()

    def close(self) -> None:
        self.flush()
        if self.accelerator is not None and getattr(self.accelerator, "trackers", None):
            self.accelerator.end_training()
        unlock_run_dir(self.run_dir)
