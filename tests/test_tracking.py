"""Run-directory rules, metric writers and --config merging (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from preflens.config import build_config, load_config_file
from preflens.errors import PreflensError, RunDirError
from preflens.tracking import (
    LOCK_FILE,
    MetricsWriter,
    RunTracker,
    TableWriter,
    checkpoint_dir,
    latest_checkpoint,
    prepare_run_dir,
    prune_checkpoints,
    read_config,
    write_config,
)
from preflens.train import TrainConfig


def test_prepare_run_dir_rules(tmp_path):
    new = prepare_run_dir(tmp_path / "a" / "b")
    assert new.is_dir()
    prepare_run_dir(new)  # empty: fine
    (new / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError, match="not empty.*--overwrite.*--resume"):
        prepare_run_dir(new)
    assert (new / "metrics.jsonl").exists()
    with pytest.raises(RunDirError, match="nothing to resume"):
        prepare_run_dir(new, resume=True)  # results but no checkpoint
    (new / "checkpoints" / "step-3").mkdir(parents=True)
    assert prepare_run_dir(new, resume=True) == new and (new / "metrics.jsonl").exists()
    with pytest.raises(RunDirError, match="exclude"):
        prepare_run_dir(new, overwrite=True, resume=True)
    prepare_run_dir(new, overwrite=True)
    assert new.is_dir() and [p.name for p in new.iterdir()] == [LOCK_FILE]  # emptied, the lock held
    with pytest.raises(RunDirError, match="nothing to resume"):
        prepare_run_dir(tmp_path / "missing", resume=True)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        prepare_run_dir(f, overwrite=True)
    assert f.read_text() == "x"


def test_overwrite_only_empties_run_directories(tmp_path, monkeypatch):
    """`--overwrite --output-dir .` in a project, or `--output-dir runs` (every run's parent), must not
    delete them: --overwrite replaces a run directory (config.yaml or metrics.jsonl inside) only."""
    project = tmp_path / "project"
    (project / "runs" / "dpo").mkdir(parents=True)
    (project / "runs" / "dpo" / "config.yaml").write_text("loss: dpo\n")
    (project / "prefs.jsonl").write_text("{}\n")
    monkeypatch.chdir(project)
    with pytest.raises(RunDirError, match="working directory"):
        prepare_run_dir(Path("."), overwrite=True)
    with pytest.raises(RunDirError, match=r"not a run directory \(it holds dpo\)"):
        prepare_run_dir(project / "runs", overwrite=True)
    (project / "repo" / ".git").mkdir(parents=True)
    (project / "repo" / "config.yaml").write_text("x: 1\n")
    with pytest.raises(RunDirError, match="git repository"):
        prepare_run_dir(project / "repo", overwrite=True)
    assert (project / "prefs.jsonl").is_file() and (project / "runs" / "dpo" / "config.yaml").is_file()
    prepare_run_dir(project / "runs" / "dpo", overwrite=True)  # a run: replaced
    assert [p.name for p in (project / "runs" / "dpo").iterdir()] == [LOCK_FILE]


def test_checkpoints_latest_and_prune(tmp_path):
    for s in (2, 10, 4):
        (tmp_path / "checkpoints" / f"step-{s}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-x").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-10"  # numeric, not lexicographic
    gone = prune_checkpoints(tmp_path, 2)
    assert [p.name for p in gone] == ["step-2"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-10", "step-4", "step-x"]
    assert prune_checkpoints(tmp_path, None) == []


def test_metrics_writer_appends_and_truncates_on_resume(tmp_path):
    w = MetricsWriter(tmp_path / "metrics.jsonl")
    for s in range(1, 6):
        w.write({"step": s, "split": "train", "loss": 1.0 / s, "nan": float("nan")})
    w.write({"step": 5, "split": "eval", "loss": 0.1})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "spl')  # killed mid-line
    assert w.truncate_after(3) == 4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["nan"] is None  # strict JSON: NaN becomes null
    off = MetricsWriter(tmp_path / "other.jsonl", enabled=False)
    off.write({"step": 1})
    assert not (tmp_path / "other.jsonl").exists()


def test_table_writer_atomic_and_resume(tmp_path):
    t = TableWriter(tmp_path / "pairs.parquet")
    t.append(
        [{"step": s, "split": "eval", "pair_id": i, "chosen": -1.0 * s} for s in (0, 5, 10) for i in range(3)]
    )
    t.flush()
    assert not list(tmp_path.glob("*.tmp"))
    again = TableWriter(tmp_path / "pairs.parquet")
    again.load(up_to_step=5)
    again.flush()
    df = pd.read_parquet(tmp_path / "pairs.parquet")
    assert sorted(df["step"].unique()) == [0, 5] and len(df) == 6


def test_run_tracker_resume_drops_later_rows_everywhere(tmp_path):
    tr = RunTracker(tmp_path)
    for s in range(0, 7):
        tr.log({"step": s, "split": "train", "loss": 1.0})
    tr.table("pairs").append([{"step": s, "pair_id": 0, "chosen": 0.0} for s in (0, 3, 6)])
    tr.flush()
    tr2 = RunTracker(tmp_path)
    tr2.resume_at(3)
    tr2.flush()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        0,
        1,
        2,
        3,
    ]
    assert sorted(pd.read_parquet(tmp_path / "pairs.parquet")["step"]) == [0, 3]


def test_config_roundtrip_and_merge(tmp_path):
    write_config(tmp_path, {"loss": "dpo", "lr": 1e-5, "path": tmp_path})
    assert read_config(tmp_path) == {"loss": "dpo", "lr": 1e-5, "path": str(tmp_path)}
    f = tmp_path / "c.yaml"
    # YAML 1.1 reads 1e-5 as a string; the option's type decides
    f.write_text(
        "data: d.jsonl\noutput_dir: out\nlr: 1e-5\nsteps: 10\nbeta: 0.2\nlora_target_modules: [q_proj]\n"
    )
    cfg = build_config(TrainConfig, load_config_file(f), {"steps": "3", "max_grad_norm": "none"})
    assert cfg.lr == 1e-5 and cfg.steps == 3 and cfg.beta == 0.2 and cfg.max_grad_norm is None
    assert cfg.lora_target_modules == ["q_proj"]
    f.write_text("data: d.jsonl\nlerning_rate: 1e-5\n")
    with pytest.raises(PreflensError, match=r"unknown option 'lerning_rate'"):
        build_config(TrainConfig, load_config_file(f), {}, source=str(f))
    with pytest.raises(PreflensError, match=r"--steps: steps must be an integer, got '2.5'"):
        build_config(TrainConfig, {}, {"steps": "2.5"})
    f.write_text("- a\n- b\n")
    with pytest.raises(PreflensError, match="expected a mapping"):
        load_config_file(f)
    with pytest.raises(PreflensError, match="no such file"):
        load_config_file(tmp_path / "nope.yaml")


def test_every_option_has_help():
    from dataclasses import fields

    for f in fields(TrainConfig):
        assert len(TrainConfig.help(f.name)) > 10, f.name


class _OneProcess:
    """The part of accelerate.Accelerator that save_checkpoint uses, for a single process."""

    is_main_process = True

    def __init__(self, fail_after_files: int | None = None) -> None:
        self.fail_after_files = fail_after_files

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, output_dir: str) -> None:
        out = Path(output_dir)
        out.mkdir(parents=True)
        for i, name in enumerate(["model.safetensors", "optimizer.bin", "random_states_0.pkl"]):
            if self.fail_after_files is not None and i == self.fail_after_files:
                raise OSError(28, "No space left on device")
            (out / name).write_bytes(b"x" * 8)


def test_a_checkpoint_save_cut_short_is_never_taken_for_the_latest(tmp_path):
    from preflens.tracking import save_checkpoint

    save_checkpoint(_OneProcess(), checkpoint_dir(tmp_path, 2), lambda d: (d / "extra.json").write_text("{}"))
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 2)
    assert sorted(p.name for p in checkpoint_dir(tmp_path, 2).iterdir()) == [
        "extra.json",
        "model.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
    ]
    # one line naming the failure and the intact checkpoint; the half-written files are removed
    with pytest.raises(
        RunDirError,
        match=r"step-4: writing the checkpoint failed \(OSError: .*No space left.*step-2 is intact",
    ):
        save_checkpoint(_OneProcess(fail_after_files=2), checkpoint_dir(tmp_path, 4))
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 2)  # not the half-written step 4
    assert not (tmp_path / "checkpoints" / "step-4.partial").exists()
    (tmp_path / "checkpoints" / "step-4.partial").mkdir()  # as a kill -9 mid-save leaves it
    save_checkpoint(_OneProcess(), checkpoint_dir(tmp_path, 4))  # a retry replaces the leftover
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 4)
    assert not (tmp_path / "checkpoints" / "step-4.partial").exists()


def test_a_second_process_cannot_take_a_run_directory(tmp_path):
    """The lock is per process: another process preparing the same directory refuses, naming the holder;
    once the holder ends (here: it exits), the directory can be taken."""
    import os
    import subprocess
    import sys

    run = prepare_run_dir(tmp_path / "run")
    code = (
        "import sys\nfrom preflens.tracking import prepare_run_dir\nfrom preflens.errors import RunDirError\n"
        "try:\n    prepare_run_dir(sys.argv[1])\nexcept RunDirError as e:\n    print(e); sys.exit(3)\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True)
    assert res.returncode == 3, res.stderr
    assert "another preflens run is writing to it" in res.stdout and f"pid {os.getpid()}" in res.stdout
    from preflens.tracking import unlock_run_dir

    unlock_run_dir(run)
    res = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
