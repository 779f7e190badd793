"""`preflens compare`: the comparison figure/report on synthetic run dirs, and the trainer-driven path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from preflens.compare import compare_runs, summarize_run
from preflens.errors import PreflensError


def _run(root: Path, name: str, dc: float, dr: float) -> Path:
    """A run whose 4 eval pairs move chosen by dc*step/10 and rejected by dr*step/10 (pair 0 the other way)."""
    rd = root / name
    rd.mkdir(parents=True)
    recs = []
    for s in (0, 5, 10):
        for pid in range(4):
            sign = -1 if pid == 0 else 1
            recs.append(
                {
                    "step": s,
                    "split": "eval",
                    "pair_id": pid,
                    "chosen": -20.0 + sign * dc * s / 10,
                    "rejected": -22.0 + dr * s / 10,
                    "ref_chosen": -20.0,
                    "ref_rejected": -22.0,
                }
            )
    pd.DataFrame(recs).to_parquet(rd / "pairs.parquet")
    with (rd / "metrics.jsonl").open("w") as f:
        for s in (0, 5, 10):
            f.write(
                json.dumps(
                    {"step": s, "split": "eval", "rewards/margins": 0.1 * s, "rewards/accuracies": 0.9}
                )
                + "\n"
            )
    return rd


def test_summary_numbers_written_out(tmp_path):
    s = summarize_run("dpo", _run(tmp_path, "dpo", dc=-2.0, dr=-6.0))
    # chosen: pairs 1..3 move -2, pair 0 moves +2 -> mean (3 * -2 + 2) / 4 = -1
    assert s.chosen_change == pytest.approx(-1.0)
    assert s.rejected_change == pytest.approx(-6.0)
    assert s.frac_chosen_fell == pytest.approx(0.75)
    assert s.margin == pytest.approx(1.0) and s.accuracy == pytest.approx(0.9)
    assert list(s.steps) == [0, 5, 10]


def test_compare_runs_figure_and_html(tmp_path):
    runs = {"dpo": _run(tmp_path, "dpo", -2.0, -6.0), "sppo": _run(tmp_path, "sppo", 1.0, -3.0)}
    (runs["sppo"] / "report.html").write_text("<html></html>")  # present: not redrawn
    page = compare_runs(runs, tmp_path).read_text()
    assert (tmp_path / "plots" / "compare_trajectories.png").stat().st_size > 5000
    assert len(re.findall(r"src='data:image/png;base64,[A-Za-z0-9+/=]{100,}'", page)) == 2
    assert "dpo: chosen -1.00, rejected -6.00 nats: both fell (synchronized decrease)" in page
    assert "sppo: chosen +0.50, rejected -3.00 nats: chosen rose, rejected fell" in page
    assert "href='dpo/report.html'" in page and (runs["dpo"] / "report.html").exists()  # written when missing
    assert (runs["sppo"] / "report.html").read_text() == "<html></html>"


def _data(tmp_path: Path) -> Path:
    from preflens.data import synthetic

    rows = synthetic.sentiment_pairs(16, seed=0, shared_tokens=2, response_length=4)
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_run_compare_same_start_one_run_per_loss(tmp_path, one_thread):
    from preflens.compare import run_compare
    from preflens.models import tiny_model

    out = tmp_path / "cmp"
    page = run_compare(
        ["dpo", "sppo"],
        str(_data(tmp_path)),
        out,
        model_factory=lambda: tiny_model(hidden_size=32),
        loss_kwargs={"sppo": {"beta": 0.5}},
        steps=3,
        batch_size=4,
        lr=1e-2,
        eval_every=3,
        report_to="none",
        save_every=0,
        progress=False,
    )
    assert page == out / "compare.html"
    a = pd.read_parquet(out / "dpo" / "pairs.parquet")
    b = pd.read_parquet(out / "sppo" / "pairs.parquet")
    a0 = a[(a.step == 0) & (a.split == "eval")].sort_values("pair_id")["chosen"].to_numpy()
    b0 = b[(b.step == 0) & (b.split == "eval")].sort_values("pair_id")["chosen"].to_numpy()
    assert len(a0) > 0 and abs(a0 - b0).max() < 1e-5  # same weights, same eval pairs
    assert sorted(a.step.unique()) == [0, 3]
    assert "beta: 0.5" in (out / "sppo" / "config.yaml").read_text()
    text = page.read_text()
    assert "dpo: chosen" in text and "sppo: chosen" in text


@pytest.mark.slow
def test_compare_cli_trains_one_run_per_loss(tmp_path):
    """End to end through the CLI on a tiny saved model: one run dir per loss, same data and start."""
    from typer.testing import CliRunner

    from preflens.cli import app
    from preflens.models import tiny_model

    model, tok = tiny_model(hidden_size=32)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "cmp"
    res = CliRunner().invoke(
        app,
        [
            "compare",
            "--losses",
            "dpo,sppo",
            "--data",
            str(_data(tmp_path)),
            "--model",
            str(tmp_path / "tiny"),
            "--output-dir",
            str(out),
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--lr",
            "1e-2",
            "--eval-every",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "comparison:" in res.output
    for name in ("dpo", "sppo"):
        assert (out / name / "report.html").exists()
        cfg = (out / name / "config.yaml").read_text()
        assert f"loss: {name}" in cfg
    # both runs start from the same weights on the same eval pairs: identical step-0 log-probs
    a = pd.read_parquet(out / "dpo" / "pairs.parquet")
    b = pd.read_parquet(out / "sppo" / "pairs.parquet")
    a0 = a[(a.step == 0) & (a.split == "eval")].sort_values("pair_id")["chosen"].to_numpy()
    b0 = b[(b.step == 0) & (b.split == "eval")].sort_values("pair_id")["chosen"].to_numpy()
    assert len(a0) > 0 and abs(a0 - b0).max() < 1e-5
    page = (out / "compare.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "dpo: chosen" in page and "sppo: chosen" in page
    # the output dir is now taken
    res = CliRunner().invoke(app, ["compare", "--losses", "dpo", "--data", "x", "--output-dir", str(out)])
    assert res.exit_code != 0


def test_compare_rejects_bad_losses(tmp_path):
    from preflens.compare import run_compare

    with pytest.raises(PreflensError, match="unknown loss"):
        run_compare(["dpo", "nope"], "x.jsonl", tmp_path / "o")
    with pytest.raises(PreflensError, match="listed twice"):
        run_compare(["dpo", "dpo"], "x.jsonl", tmp_path / "o")
    with pytest.raises(PreflensError, match="no hyper-parameter"):
        run_compare(["dpo"], "x.jsonl", tmp_path / "o", loss_kwargs={"dpo": {"gamma": 1.0}})
    assert not (tmp_path / "o").exists()  # nothing created before the options are checked
