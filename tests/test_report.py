"""`preflens report` on synthetic run directories (no training): figures, diagnosis numbers, HTML."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from _chromium import screenshot
from preflens.errors import PreflensError
from preflens.report import diagnose, frac_chosen_fell_by_step, load_run, write_report

STEPS = [0, 10, 20, 30, 40, 50]


def _make_run(root: Path, *, pairs: bool = True, probes: bool = True, ches: bool = False) -> Path:
    """A run dir shaped like ARCHITECTURE.md's: 10 eval pairs whose chosen log-prob falls for pairs
    0..5 (6 of 10) by the end, and probe rows with known condition-violation shares."""
    run = root / "run"
    run.mkdir()
    rows = []
    for s in STEPS:
        t = s / 50
        rows.append(
            {
                "step": s,
                "split": "train",
                "loss": 0.69 - 0.3 * t,
                "logps/chosen": -40 - 5 * t,
                "logps/rejected": -42 - 15 * t,
                "rewards/margins": 1.0 * t,
                "rewards/accuracies": 0.5 + 0.4 * t,
                "margin_weights/dw": 0.05,
                "margin_weights/dl": 0.05,
                "imbalance/ratio": 0.1,
            }
        )
        rows.append(
            {
                "step": s,
                "split": "eval",
                "loss": 0.7 - 0.2 * t,
                "logps/chosen": -41 - 4 * t,
                "logps/rejected": -43 - 12 * t,
                "rewards/margins": 0.8 * t,
                "rewards/accuracies": 0.5 + 0.3 * t,
            }
        )
        if probes:
            rows.append(
                {
                    "step": s,
                    "split": "probe",
                    "probe/cosine": 0.8,
                    "probe/frac_cond1_violated": 0.5,
                    "probe/frac_cond2_violated": 0.1,
                }
            )
    with (run / "metrics.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    if pairs:
        recs = []
        for pid in range(10):
            for s in STEPS:
                # pairs 0..5 fall by 0.1/step once s >= 20; the rest rise
                delta = (-0.1 if pid < 6 else 0.1) * max(0, s - 10)
                recs.append(
                    {
                        "step": s,
                        "split": "eval",
                        "pair_id": pid,
                        "chosen": -30.0 - pid + delta,
                        "rejected": -32.0 - pid - 0.2 * s,
                        "ref_chosen": -30.0 - pid,
                        "ref_rejected": -32.0 - pid,
                    }
                )
        pd.DataFrame(recs).to_parquet(run / "pairs.parquet")
    if probes:
        pr = pd.DataFrame(
            {
                "step": [0] * 4,
                "pair_id": range(4),
                "cosine": [0.9, 0.8, 0.7, 0.6],
                "cond1_violated": [True, True, False, False],
                "cond2_violated": [False] * 4,
                "pred_at_prev_chosen": [-1.0, -0.5, 0.2, 0.4],
                "obs_delta_chosen": [-0.8, -0.6, 0.1, 0.5],
            }
        )
        pr.to_parquet(run / "probes.parquet")
    if ches:
        # higher CHES -> larger fall (pairs 0..5 have the top scores)
        pd.DataFrame({"pair_index": range(10), "score": [10.0 - i for i in range(10)]}).to_parquet(
            run / "ches_scores.parquet"
        )
    return run


def test_frac_chosen_fell_matches_hand_count(tmp_path):
    run = load_run(_make_run(tmp_path))
    f = frac_chosen_fell_by_step(run.pairs, "eval").set_index("step")["frac"]
    # written out: at s=0 and s=10 nobody has moved; from s=20 on, pairs 0..5 are below their start
    assert f[0] == 0 and f[10] == 0
    for s in (20, 30, 40, 50):
        assert f[s] == pytest.approx(0.6)


def test_diagnosis_names_displacement_entanglement_and_mitigations(tmp_path):
    run = load_run(_make_run(tmp_path))
    text = "\n".join(f.text for f in diagnose(run))
    lines = text.splitlines()
    # 6 of 10 pairs fell from step 20 on: a failure, with its size and onset
    assert lines[0].startswith("verdict: likelihood displacement")
    assert "in 60% of eval pairs (n=10) by step 50" in lines[0] and "since step 20" in lines[0]
    # mean chosen change at the end: (6 * -4 + 4 * 4) / 10 = -0.8; rejected -0.2 * 50 = -10
    assert "mean -0.80 nats; rejected -10.00" in lines[0]
    # probes.parquet takes precedence: 2 of 4 violate condition 1, mean cosine 0.75
    assert "condition 1 (chosen rises) violated in 50% of probed pairs" in text
    assert "mean gradient cosine 0.75" in text
    # the mitigations follow the verdict; with condition 1 violated in 50% (> 25%): rpo, then normalized
    assert lines[1].startswith("try: rpo") and "; normalized" in lines[1]
    assert "gradient imbalance |dL/dpi_w| : |dL/dpi_l|, median 0.1" in text


def test_report_writes_pngs_and_self_contained_html(tmp_path):
    from PIL import Image

    out = write_report(_make_run(tmp_path, ches=True))
    assert out == tmp_path / "run" / "report.html"
    pngs = sorted(p.name for p in (tmp_path / "run" / "plots").glob("*.png"))
    for name in (
        "logps.png",
        "pair_trajectories.png",
        "frac_chosen_fell.png",
        "margin_accuracy.png",
        "entanglement.png",
        "pred_vs_obs.png",
        "margin_weights.png",
        "ches.png",
        "loss.png",
    ):
        assert name in pngs
    page = out.read_text()
    srcs = re.findall(r"<img[^>]*src='([^']*)'", page)
    assert len(srcs) == len(pngs)
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        img = Image.open(io.BytesIO(raw))
        img.load()
        assert img.size[0] > 300 and img.size[1] > 200
        # not a blank canvas: a plot has many distinct colours
        assert len(np.unique(np.asarray(img.convert("L")))) > 10
    assert "Skipped" not in page
    assert "Spearman(CHES, chosen change) = -" in page  # more CHES, larger fall
    # nothing is fetched from outside the file
    assert "http://" not in page and "https://" not in page


def test_report_skips_absent_sections_with_a_note(tmp_path):
    out = write_report(_make_run(tmp_path, pairs=False, probes=False))
    page = out.read_text()
    assert "Skipped: no probe rows in metrics.jsonl and no probes.parquet" in page
    assert "Skipped: no CHES scores" in page
    assert page.count("<img") == len(list((tmp_path / "run" / "plots").glob("*.png"))) == 4


def test_report_rejects_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(PreflensError, match="none of metrics.jsonl"):
        load_run(tmp_path)
    with pytest.raises(PreflensError, match="no such run directory"):
        load_run(tmp_path / "nope")


def test_report_of_a_compare_directory_points_at_its_runs(tmp_path):
    """`preflens compare`/`demo` output holds one run per sub-directory: say so instead of
    "none of metrics.jsonl ... found"."""
    run = _make_run(tmp_path, pairs=False, probes=False)
    run.rename(tmp_path / "dpo")
    (tmp_path / "compare.html").write_text("<html></html>")
    with pytest.raises(
        PreflensError, match=r"holds one run per sub-directory \(dpo\) \(its summary is compare.html\)"
    ):
        load_run(tmp_path)


def test_report_cli(tmp_path):
    from typer.testing import CliRunner

    from preflens.cli import app

    run = _make_run(tmp_path, probes=False)  # fewer figures: this test is about the command
    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    assert "report.html" in res.output and "likelihood displacement" in res.output


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    out = write_report(_make_run(tmp_path, ches=True))
    shot = tmp_path / "shot.png"
    screenshot(out, shot, height=3000)
    img = np.asarray(Image.open(shot).convert("RGB"))
    # the figures' chosen blue (#1f77b4) is on screen: the images were decoded and drawn
    blue = (np.abs(img.astype(int) - [0x1F, 0x77, 0xB4]).sum(axis=2) < 30).sum()
    assert blue > 500


def test_train_logps_curve_follows_the_fixed_train_subset_not_the_batches(tmp_path):
    """The train panel of logps.png: each train metrics row is the mean over *that step's batch*, so its
    curve moves with which pairs were drawn. When pairs.parquet tracks a fixed train subset, the curve
    is that subset's mean per evaluation (the same pairs each time); the batch means stay as dots."""
    from preflens.report import logps_series

    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"step": s, "split": "train", "logps/chosen": c, "logps/rejected": c - 1}
        for s, c in ((1, -50.0), (2, -70.0), (3, -40.0), (4, -65.0))
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = pd.DataFrame(
        [
            {"step": s, "split": "train", "pair_id": i, "chosen": -60.0 + i - 0.5 * s, "rejected": -61.0 + i - s,
             "ref_chosen": -60.0 + i, "ref_rejected": -61.0 + i}
            for s in (0, 2, 4) for i in range(3)
        ]
    )  # fmt: skip
    pairs.to_parquet(run / "pairs.parquet")
    series = logps_series(load_run(run), "train")
    assert series["source"] == "fixed subset of 3 train pairs"
    assert list(series["step"]) == [0, 2, 4]
    # mean over pairs i=0..2 of -60 + i - 0.5 s = -59 - 0.5 s
    np.testing.assert_allclose(series["chosen"], [-59.0, -60.0, -61.0])
    np.testing.assert_allclose(series["rejected"], [-60.0, -62.0, -64.0])
    # without a tracked subset, the batch means are all there is
    (run / "pairs.parquet").unlink()
    series = logps_series(load_run(run), "train")
    assert series["source"] == "batch means" and list(series["chosen"]) == [-50.0, -70.0, -40.0, -65.0]


@pytest.mark.parametrize("dtype,expected", [("float32", 2 / 6), ("bfloat16", 0.0)])
def test_chosen_fell_share_uses_the_trainers_noise_tolerance(tmp_path, dtype, expected):
    """The trainer counts a pair as fallen when chosen < start - tol (1e-4 nats in float32, 1e-2 under
    bf16: re-scoring noise is not displacement); the report counted any decrease, so a bf16 run whose
    metrics said 0% was diagnosed with 33%. Here two of six pairs move down by 1e-3 nats."""
    from preflens.report import generate_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"dtype: {dtype}\nmixed_precision: 'no'\n")
    deltas = [-1e-3, -1e-3, 2e-3, 5e-4, 0.0, 1e-3]
    pairs = [
        {"step": s, "split": "eval", "pair_id": i, "chosen": -40.0 + (d if s else 0.0), "rejected": -42.0,
         "ref_chosen": -40.0, "ref_rejected": -42.0}
        for s in (0, 5) for i, d in enumerate(deltas)
    ]  # fmt: skip
    pd.DataFrame(pairs).to_parquet(run / "pairs.parquet")
    _, findings = generate_report(run)
    text = next(f.text for f in findings if f.kind == "verdict")
    tol = {"float32": 1e-4, "bfloat16": 1e-2}[dtype]
    assert f"fell by more than {tol:g} nats in {expected:.0%} of" in text and "eval pairs (n=6)" in text
