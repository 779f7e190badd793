"""`preflens demo`: the quick budget on a tiny saved model (fast) and on the embedded model (slow)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import pytest

from _chromium import screenshot


@pytest.fixture
def tiny_dir(tmp_path):
    from preflens.models import tiny_model

    model, tok = tiny_model(hidden_size=32)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def _check_html_images(page: str) -> int:
    """Every <img> is a non-empty base64 PNG that PIL decodes; returns how many."""
    from PIL import Image

    srcs = re.findall(r"<img[^>]*src='([^']*)'", page)
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True))).load()
    return len(srcs)


def test_demo_quick_on_a_tiny_model(tmp_path, tiny_dir, one_thread, capsys):
    from preflens.demo import run_demo

    out = tmp_path / "demo"
    page = run_demo(out, quick=True, model=str(tiny_dir), progress=False)
    assert page == out / "report.html"
    printed = capsys.readouterr().out
    assert f"report: {page.resolve()}" in printed.replace("\n", "")
    assert printed.count("report.html") >= 3  # both runs' reports and the comparison page
    for f in (
        "data/train.jsonl",
        "data/eval.jsonl",
        "data/train_ches_filtered.jsonl",
        "ches_scores.parquet",
        "dpo/metrics.jsonl",
        "dpo/probes.parquet",
        "dpo/report.html",
        "dpo/ches_scores.parquet",
    ):
        assert (out / f).is_file(), f
    # the mitigation is the DPO verdict's first remedy (rpo when it has none): one more run directory
    runs = sorted(p.parent.name for p in out.glob("*/metrics.jsonl"))
    assert len(runs) == 2 and "dpo" in runs, runs
    other = next(r for r in runs if r != "dpo")
    assert (out / other / "report.html").is_file()
    # the data: bundled HH-RLHF pairs, each chosen reply against the same reply said twice
    rows = [json.loads(x) for x in (out / "data/train.jsonl").read_text().splitlines()]
    assert all(r["rejected"] == r["chosen"] * 2 for r in rows) and rows[0]["prompt"].startswith("\n\nHuman:")

    # CHES filtering dropped the top quarter (rounded) of the 6 train pairs
    n_train = len((out / "data/train.jsonl").read_text().splitlines())
    n_kept = len((out / "data/train_ches_filtered.jsonl").read_text().splitlines())
    assert n_train == 6 and n_kept < n_train
    assert _check_html_images(page.read_text()) == 2
    dpo_page = (out / "dpo" / "report.html").read_text()
    assert _check_html_images(dpo_page) >= 6
    assert "Skipped: no probe rows" not in dpo_page and "Skipped: no CHES scores" not in dpo_page


def test_demo_refuses_an_existing_directory(tmp_path):
    from preflens.demo import run_demo
    from preflens.errors import PreflensError

    (tmp_path / "x").write_text("keep me")
    with pytest.raises(PreflensError, match="exists and is not empty"):
        run_demo(tmp_path, quick=True)
    with pytest.raises(PreflensError, match="--mitigation"):
        run_demo(tmp_path / "new", mitigation="magic")
    assert (tmp_path / "x").read_text() == "keep me" and not (tmp_path / "new").exists()


@pytest.mark.slow
def test_demo_quick_on_the_embedded_model_through_the_cli(tmp_path):
    """`preflens demo --quick` as a user runs it: offline, the embedded model, the report path printed,
    and the report rendered by headless Chromium where it is installed."""
    import os
    import sys

    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    exe = shutil.which("preflens", path=os.path.dirname(sys.executable)) or "preflens"
    res = subprocess.run(
        [exe, "demo", "--quick", "--output-dir", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"report: {(out / 'report.html').resolve()}" in res.stdout.replace("\n", "")
    assert _check_html_images((out / "dpo" / "report.html").read_text()) >= 6
    if shutil.which("chromium"):
        shot = tmp_path / "shot.png"
        screenshot(out / "report.html", shot, height=2000)
        assert shot.stat().st_size > 20000


@pytest.mark.slow
def test_make_demo_displaces_likelihood_and_the_mitigation_keeps_it(tmp_path):
    """`preflens demo` at its full budget (what `make demo` runs): read back from the run directories, DPO's
    chosen log-prob fell by more than the noise tolerance in most eval pairs, the mitigation's run has at
    least 25 percentage points fewer such pairs, and each printed verdict names what its numbers show."""
    import os
    import sys

    import pandas as pd

    from preflens.diagnostics.displacement import fell_tolerance

    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    exe = shutil.which("preflens", path=os.path.dirname(sys.executable)) or "preflens"
    res = subprocess.run(
        [exe, "demo", "--output-dir", str(out)], env=env, capture_output=True, text=True, timeout=3600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    tol = fell_tolerance("float32", "no")

    def fell(run: str) -> tuple[float, int]:
        p = pd.read_parquet(out / run / "pairs.parquet")
        p = p[p["split"] == "eval"].sort_values(["pair_id", "step"])
        g = p.groupby("pair_id")["chosen"]
        dc = g.last() - g.first()  # written out: last measurement minus first, per pair
        return float((dc < -tol).mean()), len(dc)

    runs = sorted(p.parent.name for p in out.glob("*/pairs.parquet"))
    other = next(r for r in runs if r != "dpo")
    f_dpo, n = fell("dpo")
    f_mit, _ = fell(other)
    assert n >= 8 and f_dpo > 0.5, (f_dpo, n)
    assert f_dpo - f_mit >= 0.25, (f_dpo, f_mit)
    text = " ".join(res.stdout.split())  # rich wraps long lines
    assert "likelihood displacement: the chosen log-prob fell by more than" in text
    assert f"in {f_dpo:.0%} of eval pairs (n={n})" in text
    assert f"in {f_mit:.0%} of eval pairs (n={n})" in text
    page = (out / "report.html").read_text()
    assert "dpo: verdict: likelihood displacement" in page and f"{other}: verdict:" in page
    assert "seed 0" not in page.lower()
