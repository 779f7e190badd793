"""The report's verdict on constructed runs: every line must agree with the numbers written into the run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from preflens.report import diagnose, generate_report, load_run, run_verdict


def _run(tmp_path, dchosen, drejected, *, steps=(0, 5, 10), loss=(0.69, 0.6, 0.5), imbalance=None,
         probes=None, ches=None, lr=1e-5, name="run"):  # fmt: skip
    """A run directory: eval pairs whose chosen/rejected move linearly to `dchosen[i]`/`drejected[i]`."""
    run = tmp_path / name
    run.mkdir()
    (run / "config.yaml").write_text(f"loss: dpo\nlr: {lr}\ndtype: float32\nmixed_precision: 'no'\n")
    last = steps[-1]
    rows = [
        {"step": s, "split": "eval", "pair_id": i, "chosen": -30.0 + dc * s / last,
         "rejected": -35.0 + dr * s / last, "ref_chosen": -30.0, "ref_rejected": -35.0}
        for s in steps for i, (dc, dr) in enumerate(zip(dchosen, drejected))
    ]  # fmt: skip
    pd.DataFrame(rows).to_parquet(run / "pairs.parquet")
    m = [{"step": s, "split": "train", "loss": v, "grad_norm": 1.0} for s, v in zip(steps[1:] or steps, loss)]
    if imbalance is not None:
        for r in m:
            r["imbalance/ratio"] = imbalance
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in m))
    if probes is not None:
        pd.DataFrame(probes).to_parquet(run / "probes.parquet")
    if ches is not None:
        pd.DataFrame({"pair_index": range(len(ches)), "score": ches}).to_parquet(run / "ches_scores.parquet")
    return run


def _ches(run_dir):
    from preflens.report.runs import ches_result

    return ches_result(load_run(run_dir))


def _texts(run_dir):
    return diagnose(load_run(run_dir), ches=_ches(run_dir))


def test_healthy_run_is_green_with_no_red_line(tmp_path):
    rd = _run(tmp_path, [2.0, 1.5, 3.0, 0.5], [-5.0, -4.0, -6.0, -3.0])
    v = run_verdict(load_run(rd))
    assert v.status == "healthy" and v.severity == "ok" and not v.tries
    assert (
        "fell by more than 0.0001 nats in 0% of eval pairs (n=4)" in v.headline
        and "chosen +1.75, rejected -4.50" in v.headline
    )
    assert not [f for f in diagnose(load_run(rd)) if f.severity in ("bad", "risk")]


def test_displaced_run_names_share_size_onset_and_backed_mitigations(tmp_path):
    # 3 of 4 pairs fall (-1, -2, -3); pair 3 rises; the fall is linear, so > half have fallen from step 5
    probes = {"step": [5] * 4, "pair_id": range(4), "cosine": [0.8] * 4,
              "cond1_violated": [True, True, True, False], "cond2_violated": [False] * 4}  # fmt: skip
    rd = _run(tmp_path, [-1.0, -2.0, -3.0, 2.0], [-6.0] * 4, probes=probes, ches=[4.0, 3.0, 2.0, 1.0])
    fs = _texts(rd)
    v = fs[0]
    assert v.kind == "verdict" and v.severity == "bad"
    assert "likelihood displacement" in v.text and "in 75% of eval pairs (n=4) by step 10" in v.text
    assert "mean -1.00 nats; rejected -6.00" in v.text and "since step 5" in v.text
    tries = next(f for f in fs if f.kind == "try").text
    assert "rpo" in tries and "fell in 75% of eval pairs (n=4), by -1.00 nats" in tries
    # CHES 4,3,2,1 against changes -1,-2,-3,+2: Spearman = -0.2? written out: ranks (4,3,2,1) vs (3,2,1,4)
    rho = pd.Series([4.0, 3, 2, 1]).rank().corr(pd.Series([-1.0, -2, -3, 2]).rank())  # Spearman
    ches_line = next(f for f in fs if "CHES" in f.text and f.kind == "ches").text
    assert f"{rho:+.2f}" in ches_line
    assert "violated in 75% of probed pairs" in " ".join(f.text for f in fs)


def test_displaced_with_ches_ranking_recommends_ches_filtering(tmp_path):
    rd = _run(tmp_path, [-3.0, -2.0, -1.0, -0.5], [-6.0] * 4, ches=[4.0, 3.0, 2.0, 1.0])
    tries = next(f for f in _texts(rd) if f.kind == "try").text
    assert "CHES filtering" in tries and "Spearman(CHES, chosen change) = -1.00" in tries
    assert run_verdict(load_run(rd), ches=_ches(rd)).remedies == ["rpo", "ches"]


def test_entangled_run_rejected_rose_with_chosen(tmp_path):
    probes = {"step": [5] * 3, "pair_id": range(3), "cosine": [0.9, 0.8, 0.7],
              "cond1_violated": [False] * 3, "cond2_violated": [True, True, False]}  # fmt: skip
    rd = _run(tmp_path, [3.0, 2.0, 4.0], [1.0, 1.5, 0.5], probes=probes)
    v = run_verdict(load_run(rd))
    assert v.status == "entangled" and v.severity == "bad"
    assert "chosen +3.00, rejected +1.00 nats" in v.headline and "since step 5" in v.headline
    assert v.tries and "rose +1.00 nats" in v.tries[0] and "cosine of 0.80" in v.tries[0]


def test_stuck_run(tmp_path):
    rd = _run(tmp_path, [0.01, -0.02, 0.0], [0.0, 0.01, -0.01], loss=(0.6931, 0.6931, 0.6930), lr=1e-9)
    v = run_verdict(load_run(rd))
    assert v.status == "stuck" and v.severity == "bad"
    # mean chosen change (0.01 - 0.02 + 0) / 3 = -0.0033, rejected 0: margin -0.003; one pair of 3 fell
    assert (
        "margin moved -0.003 nats" in v.headline
        and "nats in 33% of them" in v.headline
        and "lr 1e-09" in v.tries[0]
    )


def test_a_third_fallen_is_a_risk_not_a_failure(tmp_path):
    rd = _run(tmp_path, [-1.0, 2.0, 3.0], [-5.0] * 3)
    v = run_verdict(load_run(rd))
    assert v.status == "healthy" and v.severity == "risk" and "nats in 33% of eval pairs (n=3)" in v.headline


def test_old_healthy_demo_run_is_healthy_and_nothing_is_red(tmp_path):
    """The numbers of the demo before this verdict (the issue's account): DPO raised the chosen log-prob
    (+8.7 nats), no pair's chosen fell, the DPO imbalance ratio was 5.3e-9, Spearman(CHES, chosen change) was
    -0.52, and the SGD-form prediction was ~0 where AdamW moved +10. It used to get three red lines and
    "try: bdpo, CHES filtering, rpo"."""
    rng = np.random.default_rng(0)
    dc = 8.7 + rng.normal(0, 2.0, 8)
    dc = dc - dc.mean() + 8.7
    probes = {"step": [6] * 4 + [12] * 4, "pair_id": list(range(4)) * 2, "cosine": [0.3] * 8,
              "cond1_violated": [False] * 8, "cond2_violated": [False] * 8,
              "pred_at_prev_chosen": [1e-4] * 8, "obs_delta_chosen": [10.0] * 8}  # fmt: skip
    scores = -np.argsort(np.argsort(dc)) + rng.normal(0, 3, 8)  # anti-correlated with the change
    rd = _run(tmp_path, list(dc), list(-19.0 + rng.normal(0, 1, 8)), steps=(0, 6, 12), imbalance=5.3e-9,
              probes=probes, ches=list(scores))  # fmt: skip
    page, fs = generate_report(rd)
    v = fs[0]
    assert v.kind == "verdict" and v.severity == "ok" and v.text.startswith("verdict: healthy")
    assert "chosen +8.70" in v.text
    assert not [f for f in fs if f.severity in ("bad", "risk")], [f.text for f in fs]
    assert not [f for f in fs if f.kind == "try"]
    imb = next(f for f in fs if "imbalance" in f.text)
    assert imb.severity == "info" and "5.3e-09" in imb.text and "context, not a failure" in imb.text
    ches = next(f for f in fs if "CHES" in f.text)
    assert ches.severity == "info" and "predicts displacement" not in ches.text
    html = page.read_text()
    assert "class='bad'" not in html and "class='risk'" not in html and "seed 0" not in html


def test_verdict_is_the_first_line_of_the_page(tmp_path):
    rd = _run(tmp_path, [-1.0, -2.0, -3.0], [-6.0] * 3)
    page, _ = generate_report(rd)
    html = page.read_text()
    i = html.index("<div class='diag'>")
    assert html.index("verdict: likelihood displacement", i) < html.index("try: rpo", i)
    assert "<li class='bad'>verdict:" in html


@pytest.mark.parametrize("n_bad", [0, 3])
def test_lines_agree_with_each_other(tmp_path, n_bad):
    """No line predicts displacement where none happened: the CHES line speaks of gains in a healthy run."""
    dc = [-1.0] * n_bad + [1.0] * (4 - n_bad)
    rd = _run(tmp_path, dc, [-5.0] * 4, ches=[4.0, 3.0, 2.0, 1.0])
    fs = _texts(rd)
    ches = next(f for f in fs if "CHES" in f.text and f.kind == "ches").text
    if n_bad == 0:
        assert "lost" not in ches and fs[0].severity == "ok"
    else:
        assert fs[0].severity == "bad" and "gained" not in ches
