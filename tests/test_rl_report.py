"""`preflens report` on RL runs: the verdict on constructed reward-std, rft and GRPO-callback directories
whose stuck/solved/learning shares and gradient norms are known by construction, and the page itself."""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest
import yaml

from preflens.report.rl import load_rl_run, rl_findings
from preflens.report.rl_page import generate_rl_report

# (status, reward mean, reward std, gradient norm) of the constructed prompts
STUCK = ("stuck", 0.0, 0.02, 0.001)
SOLVED = ("solved", 1.0, 0.0, 0.0)
LEARNING = ("learning", 0.5, 0.4, 0.04)


def _rows(spec: list[tuple[str, float, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "prompt_id": str(i),
                "prompt": f"prompt {i} ({s})",
                "reward_mean": m,
                "reward_std": sd,
                "grad_norm": g,
            }
            for i, (s, m, sd, g) in enumerate(spec)
        ]
    )


def _samples(df: pd.DataFrame, **extra) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {**extra, "prompt_id": r.prompt_id, "sample": j, "completion": f"answer {j} to {r.prompt_id}",
             "reward": r.reward_mean}
            for r in df.itertuples()
            for j in range(2)
        ]
    )  # fmt: skip


def reward_std_dir(tmp_path, spec, *, low=0.5):
    d = tmp_path / "rs"
    d.mkdir()
    df = _rows(spec)
    df["small_std"] = df["reward_std"] < 0.1
    df.to_parquet(d / "reward_std.parquet")
    _samples(df).to_parquet(d / "samples.parquet")
    summary = {
        "std_threshold": 0.1,
        "low_reward_threshold": low,
        "low_reward_threshold_from": "given",
        "k": 8,
    }
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def test_verdict_reward_std_stuck_share_and_norm_ratio(tmp_path):
    spec = [STUCK] * 4 + [SOLVED] * 2 + [LEARNING] * 4
    fs = rl_findings(load_rl_run(reward_std_dir(tmp_path, spec)))
    v = fs[0]
    assert v.kind == "verdict" and v.severity == "bad"
    # 4 of 10 stuck; mean norms 0.001 vs 0.04: 40x; 2 of 10 solved
    assert "40% of 10 prompts are stuck: reward std < 0.1 and mean reward below 0.5" in v.text
    assert "40x smaller than the learning prompts' (0.001 vs 0.04)" in v.text
    assert "initial SFT" in v.text and "arXiv 2310.20703" in v.text
    assert "20% are solved" in v.text
    # every sentence carries a number of this run
    for f in fs:
        assert re.search(r"\d", f.text), f.text


def test_verdict_healthy_and_undefined_bar(tmp_path):
    v = rl_findings(load_rl_run(reward_std_dir(tmp_path, [SOLVED] + [LEARNING] * 9)))[0]
    assert v.severity == "ok" and v.text.startswith("verdict: 0% of 10 prompts are stuck")
    shutil.rmtree(tmp_path / "rs")
    v = rl_findings(load_rl_run(reward_std_dir(tmp_path, [STUCK] * 3 + [LEARNING], low=None)))[0]
    assert "75% of 4 prompts have reward std < 0.1" in v.text and "--low-reward" in v.text
    assert v.severity == "risk"


def rft_dir(tmp_path):
    """init: 6 of 10 stuck; after SFT (2 steps): 2 of 10; final (step 6): 1 of 10."""
    d = tmp_path / "rft"
    d.mkdir()
    parts = []
    for phase, step, spec in (
        ("init", 0, [STUCK] * 6 + [LEARNING] * 4),
        ("after_sft", 2, [STUCK] * 2 + [LEARNING] * 8),
        ("final", 6, [STUCK] + [SOLVED] * 3 + [LEARNING] * 6),
    ):
        df = _rows(spec).assign(step=step, split="eval", phase=phase)
        parts.append(df)
    train = _rows([LEARNING] * 2).assign(step=4, split="train", phase="rft")
    prompts = pd.concat([*parts, train], ignore_index=True)
    prompts.to_parquet(d / "prompts.parquet")
    _samples(parts[-1], step=6, split="eval", phase="final").to_parquet(d / "samples.parquet")
    ev = {"std_threshold": 0.1, "low_reward_threshold": 0.5, "low_reward_threshold_from": "reward range"}
    evals = {p: {"step": s, "phase": p, **ev} for p, s in (("init", 0), ("after_sft", 2), ("final", 6))}
    (d / "evals.json").write_text(json.dumps(evals))
    (d / "config.yaml").write_text(yaml.safe_dump({"initial_sft": 2, "std_threshold": 0.1, "k": 8}))
    rows = [{"step": s, "split": "eval", "frac_small_std": 0.1} for s in (0, 2, 6)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_verdict_rft_last_evaluation_and_sft_before_after(tmp_path):
    fs = rl_findings(load_rl_run(rft_dir(tmp_path)))
    assert fs[0].text.startswith("verdict: 10% of 10 prompts are stuck") and fs[0].severity == "risk"
    sft = [f for f in fs if f.text.startswith("initial SFT")]
    assert len(sft) == 1 and sft[0].severity == "ok"
    assert "initial SFT (2 steps): stuck prompts 60% -> 20%, 10% at the end" in sft[0].text


def grpo_dir(tmp_path):
    """Two generation batches; prompt 0 stuck at both (exact zeros), prompt 1 learning then solved."""
    d = tmp_path / "grpo"
    d.mkdir()
    rows = [
        {"step": 1, "prompt_id": "0", "reward_mean": 0.0, "reward_std": 0.0, "grad_norm": 0.0, "times_seen": 1},
        {"step": 1, "prompt_id": "1", "reward_mean": 0.5, "reward_std": 0.5, "grad_norm": 0.3, "times_seen": 1},
        {"step": 2, "prompt_id": "0", "reward_mean": 0.0, "reward_std": 0.0, "grad_norm": 0.0, "times_seen": 2},
        {"step": 2, "prompt_id": "2", "reward_mean": 0.4, "reward_std": 0.3, "grad_norm": 0.2, "times_seen": 1},
        {"step": 2, "prompt_id": "1", "reward_mean": 1.0, "reward_std": 0.0, "grad_norm": 0.0, "times_seen": 2},
        {"step": 2, "prompt_id": "3", "reward_mean": 0.6, "reward_std": 0.4, "grad_norm": 0.4, "times_seen": 1},
    ]  # fmt: skip
    df = pd.DataFrame(rows).assign(split="train", phase="grpo", prompt=lambda x: "p" + x["prompt_id"])
    df.to_parquet(d / "prompts.parquet")
    _samples(df.drop_duplicates("prompt_id", keep="last"), step=2).to_parquet(d / "samples.parquet")
    g = {
        "kind": "grpo",
        "std_threshold": 0.05,
        "low_reward_threshold": 0.5,
        "low_reward_threshold_from": "given",
    }
    (d / "grpo.json").write_text(json.dumps({**g, "num_generations": 4, "loss_type": "dapo"}))
    metrics = [
        {"step": 1, "split": "groups", "groups/frac_zero_std": 0.5},
        {"step": 2, "split": "groups", "groups/frac_zero_std": 0.5},
        {"step": 1, "split": "train", "loss": 0.1},
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    return d


def test_verdict_grpo_latest_batch_per_prompt_and_zero_std_share(tmp_path):
    fs = rl_findings(load_rl_run(grpo_dir(tmp_path)))
    # latest rows: 0 stuck, 1 solved, 2 and 3 learning -> 25% stuck (bad), their norm exactly 0
    assert fs[0].severity == "bad"
    assert "25% of 4 prompts are stuck: reward std < 0.05 and mean reward below 0.5" in fs[0].text
    assert "gradient norm is exactly 0" in fs[0].text and "25% are solved" in fs[0].text
    zero = [f for f in fs if "zero-std groups" in f.text]
    assert len(zero) == 1 and zero[0].text.startswith("50% of prompts per generation batch")


@pytest.mark.parametrize("make", [reward_std_dir, rft_dir, grpo_dir])
def test_rl_report_page(tmp_path, make):
    from preflens.report.rl import is_rl_run

    d = make(tmp_path, [STUCK] * 2 + [SOLVED, LEARNING]) if make is reward_std_dir else make(tmp_path)
    assert is_rl_run(d)
    path, findings = generate_rl_report(d)
    page = path.read_text()
    assert page.index("verdict:") < page.index("<img")
    assert page.count("<img") >= 2  # the gradient-vs-std figure and the histogram at least
    assert (d / "plots" / "rl_grad_vs_std.png").exists()
    assert "Stuck, solved and learning prompts" in page and "answer 0 to" in page
    if make is rft_dir:
        assert "Before and after the initial SFT" in page
        assert (d / "plots" / "rl_sft.png").exists() and "Skipped: no initial SFT" not in page


def test_not_an_rl_run(tmp_path):
    from preflens.errors import PreflensError

    with pytest.raises(PreflensError, match="not an RL run directory"):
        load_rl_run(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_rl_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    from _chromium import screenshot

    path, _ = generate_rl_report(grpo_dir(tmp_path))
    shot = screenshot(path, tmp_path / "shot.png", height=1600)
    img = Image.open(shot).convert("L")
    assert img.size == (1200, 1600)
    assert len(set(img.getdata())) > 16  # text and figures drawn, not a blank page
