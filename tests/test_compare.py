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
    page = compare_runs(runs, tmp_path).read_text()
    assert (tmp_path / "plots" / "compare_trajectories.png").stat().st_size > 5000
    assert len(re.findall(r"src='data:image/png;base64,[A-Za-z0-9+/=]{100,}'", page)) == 2
    assert "dpo: chosen -1.00, rejected -6.00 nats: both fell (synchronized decrease)" in page
    assert "sppo: chosen +0.50, rejected -3.00 nats: chosen rose, rejected fell" in page
    assert "href='dpo/report.html'" in page and (runs["dpo"] / "report.html").exists()


def test_compare_rejects_bad_losses(tmp_path):
    from preflens.compare import run_compare

    pytest.importorskip("preflens.train")
    with pytest.raises(PreflensError, match="unknown loss"):
        run_compare(["dpo", "nope"], "x.jsonl", tmp_path / "o")
