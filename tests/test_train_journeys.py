"""User journeys through `preflens train` that span several invocations or the CLI path: extending a
finished run with `--resume --steps N`, resuming it again, and what the run directory records.

Each test drives `commands.train.run_train` (what `preflens train` calls) on a tiny random Llama saved
to a directory, so the flags, `config.yaml` and the checkpoint are exercised exactly as a user meets them.
"""

from __future__ import annotations

import json

import pytest
import yaml

from preflens.commands.train import run_train
from preflens.data.synthetic import sentiment_pairs
from preflens.errors import RunDirError
from preflens.train import TrainerCallback

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def setup(tmp_path):
    """A saved tiny model directory and a small sentiment data file, as a user would have them."""
    from preflens.models import tiny_model

    model, tok = tiny_model(hidden_size=32, seed=0)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = sentiment_pairs(16, seed=0, response_length=4)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _flags(tmp_path, **kw):
    base = dict(
        model=str(tmp_path / "model"),
        data=str(tmp_path / "pairs.jsonl"),
        output_dir=str(tmp_path / "run"),
        batch_size=4,
        lr=1e-3,
        eval_every=0,
        save_every=0,
        report_to="none",
        progress=False,
        eval_fraction=0.0,
    )
    base.update(kw)
    return base


def _train_rows(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


class _LrSeen(TrainerCallback):
    """The learning rate the optimizer holds while a step's gradients are computed (what it applies)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def micro_batch_context(self, trainer, batch):
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])
        return None


def test_extending_a_finished_run_follows_the_new_schedule_and_can_be_resumed_again(setup, monkeypatch):
    """`--resume --steps 5` after a 3-step linear run: steps 4 and 5 use the 5-step schedule's
    lr (1e-3 * (5 - k + 1) / 5 for step k), not the exhausted 3-step one (lr 0 at step 4); config.yaml
    records the new length, so a later plain `--resume` knows the run is complete."""
    import preflens.train as train_mod

    seen = _LrSeen()
    real = train_mod.train
    monkeypatch.setattr(
        train_mod, "train", lambda config, **kw: real(config, callbacks=[seen], **kw), raising=True
    )
    run = run_train(None, _flags(setup, steps=3))
    run_train(None, {"resume": True, "output_dir": str(run), "steps": 5, "progress": False})

    lrs = [r["lr"] for r in _train_rows(run)]
    expected = [1e-3, 1e-3 * 2 / 3, 1e-3 * 1 / 3, 1e-3 * 2 / 5, 1e-3 * 1 / 5]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert seen.lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)  # what AdamW applied
    assert yaml.safe_load((run / "config.yaml").read_text())["steps"] == 5

    # a later `preflens train --resume --output-dir run` (no --steps): complete, not "beyond --steps 3"
    run_train(None, {"resume": True, "output_dir": str(run), "progress": False})
    assert [r["step"] for r in _train_rows(run)] == [1, 2, 3, 4, 5]


def test_normalized_loss_logs_and_plots_the_dpo_loss_for_train_and_eval(setup):
    """`--loss normalized` optimizes a surrogate whose value (about 0) is not a loss level; its eval rows
    hold DPO's loss. Both splits must carry `loss/dpo` (eval: mean -log sigma(beta * margin) over the
    eval pairs, checked against pairs.parquet) and the report's loss figure must draw that, not the
    surrogate against DPO."""
    import math

    import pandas as pd

    from preflens.report import generate_report

    run = run_train(None, _flags(setup, loss="normalized", steps=2, eval_fraction=0.25))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if r["split"] == "eval"]
    pairs = pd.read_parquet(run / "pairs.parquet").query("split == 'eval'")
    for r in ev:
        p = pairs[pairs["step"] == r["step"]]
        margin = (p["chosen"] - p["ref_chosen"]) - (p["rejected"] - p["ref_rejected"])
        dpo = sum(math.log1p(math.exp(-0.1 * m)) for m in margin) / len(margin)
        assert r["loss/dpo"] == pytest.approx(dpo, rel=1e-6)
    assert all("loss/dpo" in r for r in rows if r["split"] == "train")
    html, _ = generate_report(run)
    assert "DPO loss" in html.read_text()


def test_an_adapter_saved_from_a_relative_model_path_loads_from_another_directory(setup, monkeypatch):
    """`--model m --lora-rank R` run from one directory writes final/adapter_config.json; its base model
    must be findable from anywhere (it was recorded as the relative 'm', so loading the adapter from
    another working directory looked 'm' up on the hub)."""
    from preflens.models import load_model

    monkeypatch.chdir(setup)
    run = run_train(None, _flags(setup, model="model", lora_rank=4, steps=1, output_dir="run"))
    base = json.loads((run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((setup / "model").resolve())
    elsewhere = setup / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model, _ = load_model(str(setup / "run" / "final"))
    assert any("lora_" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("layout", ["save_to_disk", "files", "json_object"])
def test_a_dataset_with_a_test_split_is_evaluated_on_it(setup, layout):
    """`--data` with train and test splits (a DatasetDict saved to disk, or train.jsonl + test.jsonl in a
    folder, as TRL's datasets come): all 12 train rows train and the 4 test rows evaluate, instead of
    holding out 10% of train and ignoring the test split."""
    from datasets import Dataset, DatasetDict

    rows = sentiment_pairs(16, seed=3, response_length=4)
    data = setup / "dd"
    if layout == "save_to_disk":
        DatasetDict(
            {"train": Dataset.from_list(rows[:12]), "test": Dataset.from_list(rows[12:])}
        ).save_to_disk(str(data))
    elif layout == "json_object":
        data = setup / "dd.json"
        data.write_text(json.dumps({"train": rows[:12], "test": rows[12:]}))
    else:
        data.mkdir()
        (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:12]))
        (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[12:]))
    run = run_train(None, _flags(setup, data=str(data), steps=1, eval_fraction=0.1))
    report = json.loads((run / "data_report.json").read_text())
    assert report["train/load"]["rows_kept"] == 12 and report["eval/load"]["rows_kept"] == 4
    assert "eval/split" not in report  # nothing held out of train
    ev = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["n_pairs"] for r in ev if r["split"] == "eval"] == [4, 4]
    # --eval-fraction 0 still means no evaluation at all
    run0 = run_train(
        None, _flags(setup, data=str(data), steps=1, eval_fraction=0.0, output_dir=str(setup / "r0"))
    )
    assert not [x for x in (run0 / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]


def test_lora_prints_no_deprecation_warning_of_peft_internals():
    """Every LoRA run printed transformers' FutureWarning about peft calling `is_gradient_checkpointing`
    (nothing the user can act on); other warnings still pass."""
    import warnings

    from preflens.models import apply_lora, tiny_model

    model, _ = tiny_model(hidden_size=32)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        apply_lora(model, rank=2, alpha=4)
    assert not [w for w in seen if "gradient_checkpointing" in str(w.message)]


def test_resume_of_a_directory_that_is_not_a_run_names_the_directory(tmp_path):
    """`preflens train --resume --output-dir typo` said "--data is required" (its config.yaml is what
    --resume reads the data from): the error must be about the directory."""
    from preflens.errors import RunDirError

    with pytest.raises(RunDirError, match=r"typo: nothing to resume \(no config.yaml"):
        run_train(None, {"resume": True, "output_dir": str(tmp_path / "typo")})


def test_limits_that_leave_no_pairs_say_why(setup):
    """Lengths that drop every pair: the error names the reason and an example pair, not only "no pairs
    left" (every pair too long here: a 6-token prompt limit and 12 tokens in all)."""
    from preflens.errors import DataError

    with pytest.raises(
        DataError, match=r"no pairs left for training; dropped: 16 too long .*e\.g\. pair 0: prompt"
    ):
        run_train(None, _flags(setup, steps=1, max_length=12, max_prompt_length=6, on_too_long="drop"))


def test_make_data_says_when_pairs_repeat(tmp_path):
    """`make-data persona --n 500` draws from a fixed list of statements: the summary line must not
    present 500 pairs as 500 different ones."""
    from typer.testing import CliRunner

    from preflens.cli import app
    from preflens.data.synthetic import PERSONA_STATEMENTS

    out = tmp_path / "p.jsonl"
    res = CliRunner().invoke(app, ["make-data", "persona", "--n", "500", "--output", str(out)])
    assert res.exit_code == 0, res.output
    distinct = len({json.loads(x)["prompt"] for x in out.read_text().splitlines()})
    assert distinct == len(PERSONA_STATEMENTS) < 500
    assert f"{distinct} distinct prompts, so {500 - distinct} pairs repeat one" in res.output
    res = CliRunner().invoke(app, ["make-data", "persona", "--n", "20", "--output", str(out)])
    assert "repeat" not in res.output


@pytest.mark.slow  # a subprocess that imports torch and trains until signalled: about 10 s
def test_sigterm_checkpoints_the_last_finished_step_like_ctrl_c(setup):
    """A cluster scheduler's preemption, `timeout` or `kill` sends SIGTERM: the run must keep its last
    finished step (as Ctrl-C does) so --resume continues it, not lose everything since the last
    --save-every checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = setup / "run"
    cmd = [sys.executable, "-m", "preflens.cli", "train", "--model", str(setup / "model"), "--data",
           str(setup / "pairs.jsonl"), "--output-dir", str(run), "--steps", "100000", "--batch-size", "4",
           "--save-every", "0", "--eval-every", "0", "--report-to", "none", "--no-progress", "--eval-fraction", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            metrics = run / "metrics.jsonl"
            if metrics.is_file() and metrics.read_text().count('"split": "train"') >= 3:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, out
    steps = [r["step"] for r in _train_rows(run)]
    assert steps and (run / "checkpoints" / f"step-{steps[-1]}").is_dir(), (steps, out)
    assert "continue with --resume" in out


def test_trl_option_names_carry_over(setup, monkeypatch, capsys):
    """A TRL user's YAML (`learning_rate`, `max_steps`, `gradient_accumulation_steps`, ...) and flags
    (`--learning-rate`) mean what preflens's own names mean; names whose meaning differs (TRL's
    per-device batch size) are refused with what to write instead."""
    from preflens.cli import main
    from preflens.config import build_config
    from preflens.errors import PreflensError
    from preflens.train import TrainConfig

    cfg = setup / "trl.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(setup / "model"),
                "dataset_name": str(setup / "pairs.jsonl"),
                "learning_rate": "1e-4",
                "max_steps": 2,
                "gradient_accumulation_steps": 2,
                "lr_scheduler_type": "cosine",
                "batch_size": 4,
                "report_to": "none",
                "progress": False,
            }
        )
    )
    run = setup / "run"
    monkeypatch.setattr(
        "sys.argv",
        ["preflens", "train", "--config", str(cfg), "--learning-rate", "3e-4", "--output-dir", str(run)],
    )
    main()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lr"] == 3e-4 and saved["steps"] == 2 and saved["grad_accum"] == 2
    assert saved["scheduler"] == "cosine" and saved["model"] == str(setup / "model")
    assert [r["step"] for r in _train_rows(run)] == [1, 2]

    with pytest.raises(
        PreflensError,
        match=r"unknown option 'per_device_train_batch_size' \(TRL's name; here: batch_size is global",
    ):
        build_config(TrainConfig, {"per_device_train_batch_size": 4}, {}, source="--config x.yaml")
    with pytest.raises(PreflensError, match="'learning_rate' and 'lr' are the same option"):
        build_config(TrainConfig, {"lr": 1e-3, "learning_rate": 1e-4}, {}, source="--config x.yaml")


def test_resume_refuses_data_that_changed_under_the_cached_reference(setup):
    """The cached reference log-probs are looked up by pair id: an edited data file with the same rows
    (or another --max-length / chat template) would silently get the old pairs' reference. Resume must
    refuse, naming the split whose token ids changed."""
    from preflens.errors import RunDirError

    run = run_train(None, _flags(setup, steps=2, save_every=1))
    rows = [json.loads(x) for x in (setup / "pairs.jsonl").read_text().splitlines()]
    rows[5]["chosen"] = rows[5]["chosen"] + " great"
    (setup / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RunDirError, match=r"reference_logps.pt: the train pairs' token ids differ"):
        run_train(None, {"resume": True, "output_dir": str(run), "steps": 4, "progress": False})


def test_each_evaluation_prints_a_summary_line(setup):
    """A run in a log file (nohup, a scheduler) showed nothing between set-up and the end: each
    evaluation prints one line with the numbers of its metrics row (as TRL prints its eval logs)."""
    from preflens.models import load_model
    from preflens.train import TrainConfig, Trainer

    lines: list[str] = []
    flags = _flags(setup, steps=4, eval_every=2, eval_fraction=0.25)
    flags.pop("model")

    model, tok = load_model(str(setup / "model"))
    Trainer(TrainConfig(**flags), model=model, tokenizer=tok, log_fn=lines.append).train()
    rows = [json.loads(x) for x in (setup / "run" / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if r["split"] == "eval"]
    shown = [x for x in lines if x.startswith("eval step ")]
    assert [x.split()[2] for x in shown] == [f"{r['step']}:" for r in ev] == ["0:", "2:", "4:"]
    last, row = shown[-1], ev[-1]
    assert f"loss {row['loss']:.4f}" in last and f"accuracy {row['rewards/accuracies']:.0%}" in last
    assert f"chosen fell {row['frac_chosen_fell']:.0%}" in last


def test_a_checkpoint_cut_short_is_not_resumed_from(setup, monkeypatch):
    """A save that dies half-way (disk full, kill -9, a node failure) must not become the checkpoint
    --resume picks: the run resumes from the last complete one and finishes."""
    import accelerate

    real = accelerate.Accelerator.save_state

    def dies_at_step_4(self, output_dir=None, **kw):
        if "step-4" in str(output_dir):
            from pathlib import Path

            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
            raise RuntimeError("No space left on device")
        return real(self, output_dir, **kw)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", dies_at_step_4)
    with pytest.raises(RunDirError, match="No space left"):
        run_train(None, _flags(setup, steps=6, save_every=2))
    monkeypatch.setattr(accelerate.Accelerator, "save_state", real)
    run = setup / "run"
    run_train(None, {"resume": True, "output_dir": str(run), "progress": False})
    assert [r["step"] for r in _train_rows(run)] == [1, 2, 3, 4, 5, 6]
    # the newest two (--save-total-limit 2), complete, and no half-written leftovers
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4", "step-6"]


def test_a_checkpoint_directory_as_model_says_what_it_is(setup):
    """`--model run/checkpoints/step-N` (a training checkpoint, not a model directory): the error says
    so and names --resume and final/, instead of only "has no config.json"."""
    from preflens.errors import PreflensError
    from preflens.models import load_model

    run = run_train(None, _flags(setup, steps=1))
    with pytest.raises(PreflensError, match=r"is a training checkpoint .*--resume.*final/"):
        load_model(str(run / "checkpoints" / "step-1"))
    load_model(str(run / "final"))  # the run's model loads


def test_resume_keeps_the_eval_split_the_run_started_with(setup):
    """A run that held out a share of --data (its dataset had no test split then, or the run predates
    evaluating on the data's own test split) resumes with that same held-out split, not the test split
    the dataset offers now (its cached reference would not match)."""
    from datasets import Dataset, DatasetDict

    rows = sentiment_pairs(16, seed=3, response_length=4)
    data = setup / "dd"
    DatasetDict({"train": Dataset.from_list(rows[:12])}).save_to_disk(str(data))
    run = run_train(None, _flags(setup, data=str(data), steps=2, save_every=1, eval_fraction=0.25))
    import shutil

    shutil.rmtree(data)
    DatasetDict({"train": Dataset.from_list(rows[:12]), "test": Dataset.from_list(rows[12:])}).save_to_disk(
        str(data)
    )
    run_train(None, {"resume": True, "output_dir": str(run), "steps": 3, "progress": False})
    ev = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["n_pairs"] for r in ev if r["split"] == "eval"] == [3, 3, 3]  # 25% of 12, throughout
