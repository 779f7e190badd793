"""`preflens train` through the console entry point: --config with flag overrides, --help, resume,
and user errors printed without a traceback."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from preflens.cli import main
from preflens.data.synthetic import sentiment_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from preflens.models import tiny_model

    d = tmp_path_factory.mktemp("tiny")
    model, tok = tiny_model(hidden_size=32, seed=0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["preflens", "train", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def data_file(tmp_path, n=16):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in sentiment_pairs(n, seed=1, response_length=4)))
    return p


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_config_file_flags_override_and_resume(tmp_path, monkeypatch, capsys, model_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "data": str(data_file(tmp_path)),
                "steps": 5,
                "lr": "1e-3",
                "batch_size": 4,
                "loss": "ipo",
                "beta": 0.5,
            }
        )
        + "report_to: none\nprogress: false\neval_every: 0\n"
    )
    run = tmp_path / "run"
    code, out, err = run_cli(
        monkeypatch, capsys, "--config", cfg, "--model", model_dir, "--steps", 2, "--output-dir", run
    )
    assert code == 0, err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["steps"] == 2 and saved["lr"] == 1e-3 and saved["loss"] == "ipo" and saved["beta"] == 0.5
    assert saved["loss_kwargs_resolved"] == {"beta": 0.5, "length_normalize": True}
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [1, 2]
    assert f"run directory: {run}" in out

    # --resume reads the run's config.yaml; --steps extends it
    code, out, err = run_cli(monkeypatch, capsys, "--resume", "--output-dir", run, "--steps", 4)
    assert code == 0, err
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [1, 2, 3, 4]
    # config.yaml records the run as it now is: a later plain --resume must not stop at "beyond --steps 2"
    assert yaml.safe_load((run / "config.yaml").read_text())["steps"] == 4


def test_user_errors_have_no_traceback(tmp_path, monkeypatch, capsys, model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "p", "chosen": "good", "rejected": "bad"})
        + "\n"
        + '{"prompt": "p", "chosen": 3, "rejected": "x"}\n'
    )
    # the data is read and checked before torch is imported (fail fast); the checks that need the loss
    # table (torch) come after it, so they are shown on a good file
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "p", "chosen": "good", "rejected": "bad"}) + "\n")
    cases = [
        (
            ("--data", bad, "--model", model_dir, "--output-dir", tmp_path / "r1"),
            r"row 1 \(line 2\).*'chosen'",
        ),
        (
            ("--data", good, "--model", model_dir, "--output-dir", tmp_path / "r2", "--gamma", 1),
            "--gamma does not apply",
        ),
        (
            ("--data", bad, "--output-dir", tmp_path / "r3", "--steps", "x"),
            "--steps: steps must be an integer",
        ),
        (("--data", good, "--output-dir", tmp_path / "r4", "--loss", "dpoo"), "unknown loss 'dpoo'"),
        (("--output-dir", tmp_path / "r5"), "--data is required"),
        (("--data", bad, "--output-dir", tmp_path / "r6", "--loss-kwargs", "beta"), "key=value"),
        (
            ("--data", bad, "--output-dir", tmp_path / "r7", "--config", tmp_path / "none.yaml"),
            "no such file",
        ),
    ]
    import re

    for args, pattern in cases:
        code, _, err = run_cli(monkeypatch, capsys, *args)
        assert code == 2, (args, err)
        assert re.search(pattern, err, re.S), (pattern, err)
        assert "Traceback" not in err


def test_existing_results_are_refused(tmp_path, monkeypatch, capsys, model_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("precious\n")
    code, _, err = run_cli(
        monkeypatch, capsys, "--data", data_file(tmp_path), "--model", model_dir, "--output-dir", run
    )
    assert code == 2 and "not empty" in err and "Traceback" not in err
    assert (run / "metrics.jsonl").read_text() == "precious\n"


def test_help_documents_every_option():
    from dataclasses import fields

    from typer.testing import CliRunner

    from preflens.cli import app
    from preflens.train import TrainConfig

    res = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert res.exit_code == 0
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in res.output, f.name
    assert "--config" in res.output


@pytest.mark.slow
def test_embedded_model_lora_on_demo_pairs(tmp_path, monkeypatch, capsys):
    """The default model (embedded SmolLM2-135M-Instruct), LoRA, the bundled 16 pairs, offline, on CPU."""
    from preflens.data.synthetic import demo_pairs_path

    run = tmp_path / "run"
    code, _, err = run_cli(
        monkeypatch, capsys,
        "--data", demo_pairs_path(), "--lora-rank", 8, "--steps", 3, "--batch-size", 4, "--lr", "1e-4",
        "--eval-every", 2, "--output-dir", run, "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    rows = read_metrics(run)
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    keys = {
        "loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins",
        "rewards/accuracies", "margin_weights/dw", "margin_weights/dl", "lr", "grad_norm", "epoch", "tokens",
    }  # fmt: skip
    for r in train_rows:
        assert keys <= set(r), keys - set(r)
        assert all(r[k] is not None for k in keys)
    ev = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in ev] == [0, 2, 3] and "frac_chosen_fell" in ev[-1]
    assert (run / "final" / "adapter_config.json").is_file()
    assert (run / "pairs.parquet").is_file() and list((run / "tb").rglob("events.out.tfevents*"))


def test_continue_training_a_saved_adapter(tmp_path, monkeypatch, capsys, model_dir):
    """--model RUN/final (a LoRA adapter): it is trained further and is its own reference."""
    data = data_file(tmp_path)
    common = (
        "--data",
        data,
        "--steps",
        2,
        "--batch-size",
        4,
        "--lr",
        "1e-2",
        "--report-to",
        "none",
        "--no-progress",
    )
    first = tmp_path / "first"
    code, _, err = run_cli(
        monkeypatch, capsys, *common, "--model", model_dir, "--lora-rank", 4, "--output-dir", first
    )
    assert code == 0, err
    second = tmp_path / "second"
    code, _, err = run_cli(monkeypatch, capsys, *common, "--model", first / "final", "--output-dir", second)
    assert code == 0, err
    import pandas as pd

    start = pd.read_parquet(second / "pairs.parquet").query("step == 0")
    assert (start.chosen - start.ref_chosen).abs().max() < 1e-5  # the reference is the adapter model
    end1 = pd.read_parquet(first / "pairs.parquet").query("step == 2").set_index(["split", "pair_id"])
    start2 = start.set_index(["split", "pair_id"])
    common_idx = end1.index.intersection(start2.index)
    assert len(common_idx) > 0
    assert (end1.loc[common_idx, "chosen"] - start2.loc[common_idx, "chosen"]).abs().max() < 1e-4
    rows = read_metrics(second)
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
    assert rows[1]["grad_norm"] > 0
