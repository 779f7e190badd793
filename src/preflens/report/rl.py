"""`preflens report` for reinforcement-finetuning runs: reading them and the written verdict.

Why (Razin et al. 2023/2024, "Vanishing Gradients in Reinforcement Finetuning of Language Models", ICLR
2024, arXiv 2310.20703): the expected gradient of a prompt is bounded by its reward std under the model,
||grad V_x|| = O(STD[r]^(2/3)) (Theorem 1), so a prompt whose completions all get about the same reward
learns almost nothing, whatever that reward. The ones that matter are *stuck*: small std AND low reward
(RFT cannot lift them; the paper's remedy, Sec. 4, is a short initial SFT phase on a few labelled
examples); *solved* prompts (small std, high reward) need nothing; the rest are *learning*.

Three kinds of run directory hold per-prompt reward stds (`load_rl_run` tells them apart):
- `preflens reward-std` output: `reward_std.parquet` (+ `samples.parquet`, `summary.json`), one snapshot;
- `preflens rft` runs: `prompts.parquet` (train and eval rows), `evals.json` (init, after_sft, rft-N,
  final), `config.yaml` (std_threshold, initial_sft);
- TRL GRPO runs with `preflens.integrations.trl_grpo.PreflensGRPOCallback`: `prompts.parquet`,
  `samples.parquet`, `grpo.json`.
`RLRun.current` is the per-prompt state the verdict is about: the last evaluation of an rft run, the
latest row of each prompt of a GRPO run, every prompt of a reward-std directory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from preflens.errors import PreflensError
from preflens.report.findings import Finding
from preflens.tracking import METRICS_FILE

__all__ = [
    "RAZIN_VG",
    "RLRun",
    "is_rl_run",
    "load_rl_run",
    "classify",
    "rl_findings",
    "STUCK_BAD",
    "STUCK_RISK",
    "phase_rows",
]

RAZIN_VG = "Razin et al. 2024, arXiv 2310.20703"
STUCK_BAD = 0.25  # at least this share of prompts stuck: the run is mostly not learning them
STUCK_RISK = 0.05  # above this share: worth a warning


@dataclass
class RLRun:
    """What the RL report reads from a run directory."""

    run_dir: Path
    kind: str  # "reward_std" | "rft" | "grpo"
    prompts: pd.DataFrame  # every per-prompt row (step, phase, prompt_id, reward_mean, reward_std, grad_norm)
    current: pd.DataFrame  # the per-prompt state the verdict is about
    samples: pd.DataFrame | None
    std_threshold: float
    low_reward: float | None
    low_reward_from: str
    config: dict[str, Any] = field(default_factory=dict)
    evals: dict[str, Any] = field(default_factory=dict)
    metrics: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


def is_rl_run(run_dir: str | Path) -> bool:
    d = Path(run_dir)
    return (
        (d / "reward_std.parquet").exists()
        or (d / "grpo.json").exists()
        or ((d / "prompts.parquet").exists() and (d / "evals.json").exists())
    )


def classify(df: pd.DataFrame, std_threshold: float, low_reward: float | None) -> pd.Series:
    """stuck / solved / learning per row (`small_std` when no low-reward bar is defined)."""
    small = df["reward_std"] < std_threshold
    if low_reward is None:
        return small.map({True: "small_std", False: "learning"})
    low = df["reward_mean"] < low_reward
    out = pd.Series("learning", index=df.index)
    out[small & low] = "stuck"
    out[small & ~low] = "solved"
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PreflensError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _read_parquet(path: Path, need: tuple[str, ...]) -> pd.DataFrame:
    df = pd.read_parquet(path)
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise PreflensError(f"{path}: missing column(s) {missing}; expected {list(need)}")
    df["prompt_id"] = df["prompt_id"].astype(str)
    return df


def _metrics(d: Path) -> pd.DataFrame | None:
    path = d / METRICS_FILE
    if not path.exists():
        return None
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return pd.DataFrame(rows) if rows else None


NEED = ("prompt_id", "reward_mean", "reward_std", "grad_norm")


def load_rl_run(run_dir: str | Path) -> RLRun:
    """Read a reward-std directory, an rft run or a GRPO-callback run (see the module docstring)."""
    d = Path(run_dir)
    if not is_rl_run(d):
        raise PreflensError(
            f"{d}: not an RL run directory (expected reward_std.parquet, grpo.json, or prompts.parquet "
            "with evals.json)"
        )
    samples = pd.read_parquet(d / "samples.parquet") if (d / "samples.parquet").exists() else None
    if samples is not None:
        samples["prompt_id"] = samples["prompt_id"].astype(str)
    if (d / "reward_std.parquet").exists():
        return _load_reward_std(d, samples)
    if (d / "grpo.json").exists():
        return _load_grpo(d, samples)
    return _load_rft(d, samples)


def _load_reward_std(d: Path, samples: pd.DataFrame | None) -> RLRun:
    df = _read_parquet(d / "reward_std.parquet", NEED)
    df["step"], df["phase"] = 0, "reward_std"
    s = _read_json(d / "summary.json")
    thr = float(s.get("std_threshold", 0.1))
    low = s.get("low_reward_threshold")
    notes = ["partial run: not every prompt was measured"] if s.get("partial") else []
    return RLRun(
        d, "reward_std", df, df.copy(), samples, thr, low, s.get("low_reward_threshold_from", ""),
        config={k: s[k] for k in ("reward", "k", "temperature", "top_p", "max_new_tokens") if k in s},
        notes=notes,
    )  # fmt: skip


def _load_grpo(d: Path, samples: pd.DataFrame | None) -> RLRun:
    g = _read_json(d / "grpo.json")
    if not (d / "prompts.parquet").exists():
        raise PreflensError(f"{d}: grpo.json without prompts.parquet (no generation batch was recorded)")
    df = _read_parquet(d / "prompts.parquet", (*NEED, "step"))
    current = df.sort_values("step").groupby("prompt_id", sort=False).tail(1).reset_index(drop=True)
    config = {k: v for k, v in g.items() if k not in ("kind", "grad_norm")}
    return RLRun(
        d, "grpo", df, current, samples, float(g.get("std_threshold", 0.05)), g.get("low_reward_threshold"),
        g.get("low_reward_threshold_from", ""), config=config, metrics=_metrics(d),
    )  # fmt: skip


def _load_rft(d: Path, samples: pd.DataFrame | None) -> RLRun:
    import yaml

    df = _read_parquet(d / "prompts.parquet", (*NEED, "step", "split", "phase"))
    evals = _read_json(d / "evals.json")
    cfg_path = d / "config.yaml"
    config = (yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.exists() else {}
    ev = df[df["split"] == "eval"]
    if ev.empty:
        raise PreflensError(
            f"{d}/prompts.parquet: no evaluation rows (split 'eval'); the run never evaluated"
        )
    last_step = int(ev["step"].max())
    current = ev[ev["step"] == last_step].drop_duplicates("prompt_id", keep="last").reset_index(drop=True)
    last = max(evals.values(), key=lambda e: e.get("step", -1)) if evals else {}
    thr = float(last.get("std_threshold", config.get("std_threshold", 0.1)))
    return RLRun(
        d, "rft", df, current, samples, thr, last.get("low_reward_threshold", config.get("low_reward")),
        last.get("low_reward_threshold_from", ""), config=config, evals=evals, metrics=_metrics(d),
    )  # fmt: skip


# -- the verdict ---------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _norm_ratio(small: pd.Series, rest: pd.Series) -> str:
    """'their gradient norm is 40x smaller than the rest' in words (zeros said as zeros)."""
    small, rest = small.dropna(), rest.dropna()
    if small.empty or rest.empty:
        return ""
    a, b = float(small.mean()), float(rest.mean())
    if b <= 0:
        return ""
    if a == 0:
        return f"; their gradient norm is exactly 0 (every completion got the same reward), the learning prompts' mean is {b:.3g}"
    return (
        f"; their mean gradient norm is {b / a:.0f}x smaller than the learning prompts' ({a:.3g} vs {b:.3g})"
    )


def _stuck_finding(run: RLRun, cur: pd.DataFrame) -> Finding:
    status = classify(cur, run.std_threshold, run.low_reward)
    n = max(1, len(cur))
    stuck, solved = (status == "stuck").mean(), (status == "solved").mean()
    small = cur["reward_std"] < run.std_threshold
    ratio = _norm_ratio(cur.loc[small, "grad_norm"], cur.loc[~small, "grad_norm"])
    if run.low_reward is None:
        return Finding(
            "verdict",
            f"verdict: {_pct(small.mean())} of {n} prompts have reward std < {run.std_threshold:g}{ratio}; stuck "
            "vs solved needs a low-reward bar, which this run does not define (pass --low-reward)",
            "risk" if small.mean() > STUCK_RISK else "ok",
        )
    ratio = _norm_ratio(cur.loc[status == "stuck", "grad_norm"], cur.loc[status == "learning", "grad_norm"])
    head = (
        f"verdict: {_pct(stuck)} of {n} prompts are stuck: reward std < {run.std_threshold:g} and mean reward below "
        f"{run.low_reward:g}{ratio if stuck else ''}"
    )
    sft_steps = int(run.config.get("initial_sft") or 0) if run.kind == "rft" else 0
    if stuck > STUCK_RISK and sft_steps:
        sev = "bad" if stuck >= STUCK_BAD else "risk"
        tail = (
            f". They are stuck after this run's {sft_steps} initial SFT steps: more SFT steps or labelled "
            f"examples for them are the paper's remedy ({RAZIN_VG}, Sec. 4)"
        )
    elif stuck >= STUCK_BAD:
        sev, tail = (
            "bad",
            (
                f". RL will not move them (the expected gradient vanishes with the reward std, {RAZIN_VG}, "
                "Theorem 1); an initial SFT on a few labelled examples is the remedy the paper gives (Sec. 4)"
            ),
        )
    elif stuck > STUCK_RISK:
        sev, tail = "risk", f". A short initial SFT phase would lift them ({RAZIN_VG}, Sec. 4)"
    else:
        sev, tail = "ok", ". Few prompts are left behind by vanishing gradients"
    solved_text = f"; {_pct(solved)} are solved (small std, high reward)" if solved else ""
    return Finding("verdict", head + tail + solved_text + ".", sev)


def phase_rows(run: RLRun, phase: str) -> pd.DataFrame:
    """The evaluation rows of one rft phase (init, after_sft, final), the last one if repeated."""
    df = run.prompts
    if run.kind != "rft" or "phase" not in df.columns:
        return df.iloc[0:0]
    ev = df[(df["split"] == "eval") & (df["phase"] == phase)]
    if ev.empty:
        return ev
    return ev[ev["step"] == ev["step"].max()]


def _shares(run: RLRun, df: pd.DataFrame) -> tuple[float, float, float]:
    """(stuck share, small-std share, mean reward) of a set of per-prompt rows."""
    status = classify(df, run.std_threshold, run.low_reward)
    return (
        float((status == "stuck").mean()),
        float((df["reward_std"] < run.std_threshold).mean()),
        float(df["reward_mean"].mean()),
    )


def _sft_finding(run: RLRun) -> Finding | None:
    """Before/after the initial SFT phase, from the init and after_sft evaluations' per-prompt rows."""
    before, after = phase_rows(run, "init"), phase_rows(run, "after_sft")
    if before.empty or after.empty:
        return None
    (x, sx, rx), (y, sy, ry) = _shares(run, before), _shares(run, after)
    what, x, y = ("stuck", x, y) if run.low_reward is not None else ("small-std", sx, sy)
    final = phase_rows(run, "final")
    then = f", {_pct(_shares(run, final)[0 if what == 'stuck' else 1])} at the end" if not final.empty else ""
    sev = "ok" if y < x else "risk"
    return Finding(
        "context",
        f"initial SFT ({run.config.get('initial_sft', '?')} steps): {what} prompts {_pct(x)} -> {_pct(y)}{then}; "
        f"mean reward {rx:.3g} -> {ry:.3g}"
        + ("" if y < x else " (the SFT phase did not rescue them: more steps or more labelled examples)"),
        sev,
    )


def _zero_std_finding(run: RLRun) -> Finding | None:
    if run.kind != "grpo" or run.metrics is None or "groups/frac_zero_std" not in run.metrics:
        return None
    z = run.metrics["groups/frac_zero_std"].dropna()
    if z.empty:
        return None
    sev = "risk" if z.mean() > STUCK_RISK else "info"
    return Finding(
        "context",
        f"{_pct(z.mean())} of prompts per generation batch were in zero-std groups on average (last batch "
        f"{_pct(z.iloc[-1])}): their GRPO advantage is 0, they add nothing to the step",
        sev,
    )


def rl_findings(run: RLRun) -> list[Finding]:
    """The verdict first, then what supports it (SFT before/after, zero-std share, the reward)."""
    cur = run.current
    if cur.empty:
        return [Finding("verdict", "verdict: no prompts recorded yet", "info")]
    out = [_stuck_finding(run, cur)]
    for f in (_sft_finding(run), _zero_std_finding(run)):
        if f is not None:
            out.append(f)
    mean = float(cur["reward_mean"].mean())
    if not math.isnan(mean):
        out.append(
            Finding(
                "context",
                f"mean reward over prompts {mean:.3g}, mean reward std {cur['reward_std'].mean():.3g}",
            )
        )
    for note in run.notes:
        out.append(Finding("info", note, "info"))
    return out
