"""The RL report's figures and page: the paper's gradient-norm-vs-reward-std figure, the reward-std
histogram and its change over steps, before/after an initial SFT, and the stuck/solved/learning table.

Figures follow Razin et al. 2024 (arXiv 2310.20703, Fig. 1-2): per prompt, the policy-gradient norm
against the reward std under the model, log-log, where Theorem 1's bound ||grad V_x|| = O(STD^(2/3)) is a
line of slope 2/3 (drawn through the largest point, as an upper envelope, not a fit). Zeros (all K rewards
equal: the estimate is exactly 0) have no place on a log axis; they are drawn as crosses on the axis floor.
The page uses `preflens.report.html.render_html` (same CSS, sections and notes as the DPO report).
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import NullFormatter

from preflens.report.figures import GREY, Figure, new_fig, save_fig, style_axes
from preflens.report.findings import Finding
from preflens.report.html import render_html
from preflens.report.rl import RAZIN_VG, RLRun, classify, load_rl_run, phase_rows, rl_findings

__all__ = ["RL_SECTIONS", "rl_figures", "prompt_table", "generate_rl_report"]

STATUS_COLOURS = {"stuck": "#d62728", "solved": "#2ca02c", "learning": "#1f77b4", "small_std": "#ff7f0e"}

RL_SECTIONS: list[tuple[str, str, str]] = [
    ("grad_vs_std", "Gradient norm vs reward std (per prompt)", "no finite per-prompt gradient norms"),
    ("std_hist", "Reward std per prompt", "no per-prompt reward std"),
    ("over_steps", "Small-std, stuck and solved prompts over steps", "a single step or evaluation"),
    ("sft", "Before and after the initial SFT", "no initial SFT phase in this run (rft --initial-sft N)"),
]


def _floor(values: pd.Series) -> float:
    pos = values[values > 0]
    return float(pos.min()) / 10 if not pos.empty else 1e-6


def _fig_grad_vs_std(run: RLRun, out: Path) -> Figure | None:
    cur = run.current.dropna(subset=["grad_norm", "reward_std"])
    if cur.empty:
        return None
    status = classify(cur, run.std_threshold, run.low_reward)
    xf, yf = _floor(run.prompts["reward_std"]), _floor(run.prompts["grad_norm"].dropna())
    fig, (ax,) = new_fig(width=6.4, height=4.2)
    past = run.prompts.dropna(subset=["grad_norm"])
    if len(past) > len(cur):
        ax.scatter(past["reward_std"].clip(lower=xf), past["grad_norm"].clip(lower=yf), s=8, c=GREY, alpha=0.25,
                   label="earlier steps")  # fmt: skip
    for j, (st, colour) in enumerate(STATUS_COLOURS.items()):
        d = cur[status == st]
        if d.empty:
            continue
        zero = (d["grad_norm"] <= 0) | (d["reward_std"] <= 0)
        ax.scatter(
            d.loc[~zero, "reward_std"], d.loc[~zero, "grad_norm"], s=22, c=colour, label=f"{st} ({len(d)})"
        )
        if zero.any():
            ax.scatter(d.loc[zero, "reward_std"].clip(lower=xf) * 1.35**j, d.loc[zero, "grad_norm"].clip(lower=yf), s=40,
                       marker="x", c=colour)  # fmt: skip
    pos = cur[(cur["grad_norm"] > 0) & (cur["reward_std"] > 0)]
    if not pos.empty:
        i = (pos["grad_norm"] / pos["reward_std"] ** (2 / 3)).idxmax()
        c = float(pos.loc[i, "grad_norm"] / pos.loc[i, "reward_std"] ** (2 / 3))
        xs = np.geomspace(xf, max(float(cur["reward_std"].max()), xf * 10), 50)
        ax.plot(xs, c * xs ** (2 / 3), ls="--", c="k", lw=1, label="slope 2/3 (Theorem 1's bound)")
    ax.axvline(run.std_threshold, c=GREY, ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # decades only: minor labels pile up on narrow ranges
        axis.set_minor_formatter(NullFormatter())
    style_axes(ax, "policy-gradient norm vs reward std", "gradient norm", "reward std under the model")
    ax.legend(fontsize=8)
    path = out / "rl_grad_vs_std.png"
    save_fig(fig, path)
    return Figure(
        "grad_vs_std",
        "gradient norm vs reward std",
        path,
        f"Each point a prompt ({_when(run)}); crosses on the axes' floor are exact zeros (all completions got "
        f"the same reward; offset sideways per status). The dashed line has slope 2/3: {RAZIN_VG}, Theorem 1 bounds the expected gradient by "
        f"O(std^(2/3)), so prompts left of the dotted threshold ({run.std_threshold:g}) cannot learn fast.",
    )


def _when(run: RLRun) -> str:
    return {
        "rft": f"the last evaluation, step {int(run.current['step'].max())}",
        "grpo": "each prompt's latest generation batch; grey: earlier ones",
        "reward_std": "K samples per prompt",
    }[run.kind]


def _fig_std_hist(run: RLRun, out: Path) -> Figure | None:
    cur = run.current["reward_std"].dropna()
    if cur.empty:
        return None
    fig, (ax,) = new_fig(width=6.0, height=3.4)
    bins = np.linspace(0, max(float(run.prompts["reward_std"].max()), run.std_threshold * 2, 1e-3), 21)
    first = run.prompts[run.prompts["step"] == run.prompts["step"].min()]["reward_std"].dropna()
    grey = run.kind != "reward_std" and len(run.prompts["step"].unique()) > 1
    if grey:
        ax.hist(first, bins=bins, color=GREY, alpha=0.5, label=f"step {int(run.prompts['step'].min())}")
    ax.hist(cur, bins=bins, color="#1f77b4", alpha=0.7, label="now" if grey else "prompts")
    ax.axvline(run.std_threshold, c="k", ls=":", lw=1, label=f"threshold {run.std_threshold:g}")
    style_axes(ax, "reward std per prompt", "prompts", "reward std")
    ax.legend(fontsize=8)
    path = out / "rl_std_hist.png"
    save_fig(fig, path)
    than = ", against the first step's in grey" if grey else ""
    return Figure("std_hist", "reward std histogram", path, f"Per-prompt reward std ({_when(run)}){than}; "
                  f"the dotted line is the small-std threshold {run.std_threshold:g}.")  # fmt: skip


def _per_step(run: RLRun) -> pd.DataFrame:
    df = run.prompts
    if run.kind == "rft":
        df = df[df["split"] == "eval"]
    df = df.assign(status=classify(df, run.std_threshold, run.low_reward))
    return df.groupby("step").agg(
        small=("reward_std", lambda s: float((s < run.std_threshold).mean())),
        stuck=("status", lambda s: float((s == "stuck").mean())),
        solved=("status", lambda s: float((s == "solved").mean())),
        median_std=("reward_std", "median"),
    )


def _fig_over_steps(run: RLRun, out: Path) -> Figure | None:
    g = _per_step(run)
    if len(g) < 2:
        return None
    fig, (a1, a2) = new_fig(ncols=2, width=4.6, height=3.3)
    a1.plot(g.index, g["small"], marker="o", ms=3, c="#ff7f0e", label="small std")
    a1.plot(g.index, g["stuck"], marker="s", ms=6, lw=3, alpha=0.6, c=STATUS_COLOURS["stuck"], label="stuck")
    a1.plot(g.index, g["solved"], marker="o", ms=3, ls="--", c=STATUS_COLOURS["solved"], label="solved")
    a1.set_ylim(-0.03, 1.03)
    style_axes(a1, "share of prompts", "share")
    a1.legend(fontsize=8)
    a2.plot(g.index, g["median_std"], marker="o", ms=3, c="#1f77b4")
    style_axes(a2, "median reward std", "reward std")
    path = out / "rl_over_steps.png"
    save_fig(fig, path)
    src = "evaluations" if run.kind == "rft" else "generation batches (the prompts of each batch)"
    return Figure("over_steps", "small-std share over steps", path, f"Per step, over the {src}.")


def _fig_sft(run: RLRun, out: Path) -> Figure | None:
    rows = {p: phase_rows(run, p) for p in ("init", "after_sft", "final")}
    if rows["init"].empty or rows["after_sft"].empty:
        return None
    phases = [p for p, d in rows.items() if not d.empty]
    fig, (a1, a2) = new_fig(ncols=2, width=4.6, height=3.3)
    x = np.arange(len(phases))
    status = {p: classify(rows[p], run.std_threshold, run.low_reward) for p in phases}
    shares = {
        "small std": [float((rows[p]["reward_std"] < run.std_threshold).mean()) for p in phases],
        "stuck": [float((status[p] == "stuck").mean()) for p in phases],
    }
    for j, (label, vals) in enumerate(shares.items()):
        a1.bar(x + (j - 0.5) * 0.38, vals, 0.38, label=label, color=["#ff7f0e", STATUS_COLOURS["stuck"]][j])
    a1.set_xticks(x, [f"{p}\n(step {int(rows[p]['step'].iloc[0])})" for p in phases])
    a1.set_ylim(0, 1.05)
    style_axes(a1, "share of evaluation prompts", "share", "")
    a1.legend(fontsize=8)
    a2.bar(x, [float(rows[p]["reward_mean"].mean()) for p in phases], 0.5, color="#1f77b4")
    a2.set_xticks(x, phases)
    style_axes(a2, "mean reward", "reward", "")
    path = out / "rl_sft.png"
    save_fig(fig, path)
    return Figure("sft", "before/after initial SFT", path, f"The paper's remedy ({RAZIN_VG}, Sec. 4): a few SFT "
                  "steps on labelled examples before RL raise the reward std of stuck prompts, so RL can move "
                  "them. Bars: the evaluation prompts at the start, after SFT and at the end.")  # fmt: skip


def rl_figures(run: RLRun, plots_dir: Path) -> dict[str, Figure]:
    figs = {}
    for fn in (_fig_grad_vs_std, _fig_std_hist, _fig_over_steps, _fig_sft):
        f = fn(run, plots_dir)
        if f is not None:
            figs[f.name] = f
    return figs


def _examples(run: RLRun, pid: str, step: int | None, n: int = 2) -> str:
    s = run.samples
    if s is None:
        return "<span class='note'>no completions recorded</span>"
    d = s[s["prompt_id"] == pid]
    if step is not None and "step" in d.columns and (d["step"] == step).any():
        d = d[d["step"] == step]
    parts = [
        f"<code>{html.escape(str(r.completion)[:80])}</code> ({r.reward:.3g})" for r in d.head(n).itertuples()
    ]
    return "<br>".join(parts) or "<span class='note'>none</span>"


def _history(run: RLRun, pid: str) -> str:
    """A GRPO prompt's visits: 'steps 1, 3: reward 0 -> 0.5, std 0 -> 0.3'."""
    h = run.prompts[run.prompts["prompt_id"] == pid].sort_values("step")
    if len(h) < 2:
        return str(len(h))
    steps = ", ".join(str(int(x)) for x in h["step"])
    mean = " -> ".join(f"{x:.2g}" for x in h["reward_mean"])
    std = " -> ".join(f"{x:.2g}" for x in h["reward_std"])
    return f"{len(h)} (steps {steps}; reward {mean}; std {std})"


def prompt_table(run: RLRun, per_status: int = 5) -> str:
    """The stuck / solved / learning table, lowest reward first, with example completions."""
    cur = run.current.assign(status=classify(run.current, run.std_threshold, run.low_reward))
    esc = html.escape
    seen_col = "times_seen" in cur.columns
    rows = ["<h2>Stuck, solved and learning prompts</h2>",
            f"<p class='cap'>reward std threshold {run.std_threshold:g}; low-reward bar "
            f"{'undefined' if run.low_reward is None else f'{run.low_reward:g}'} ({esc(run.low_reward_from or 'n/a')}); "
            f"up to {per_status} prompts per status, lowest mean reward first, of {len(cur)}.</p>",
            "<table><tr><th>status</th><th>prompt</th><th>reward mean</th><th>reward std</th><th>grad norm</th>"
            f"{'<th>times seen</th>' if seen_col else ''}<th>example completions (reward)</th></tr>"]  # fmt: skip
    for st in ("stuck", "small_std", "solved", "learning"):
        d = cur[cur["status"] == st].sort_values("reward_mean").head(per_status)
        for r in d.itertuples():
            text = getattr(r, "prompt", None) or r.prompt_id
            step = int(r.step) if "step" in cur.columns else None
            rows.append(
                f"<tr><td class='{'bad' if st == 'stuck' else 'ok' if st == 'solved' else 'info'}'>{st}</td>"
                f"<td>{esc(str(text)[:80])}</td><td>{r.reward_mean:.3g}</td><td>{r.reward_std:.3g}</td>"
                f"<td>{r.grad_norm:.3g}</td>{f'<td>{esc(_history(run, r.prompt_id))}</td>' if seen_col else ''}"
                f"<td>{_examples(run, r.prompt_id, step)}</td></tr>"
            )
    rows.append("</table>")
    return "".join(rows)


TITLES = {"rft": "preflens report: RL finetuning (rft)", "grpo": "preflens report: TRL GRPO",
          "reward_std": "preflens report: reward std"}  # fmt: skip


def _insert(page: str, marker: str, extra: str) -> str:
    """`extra` right before `marker` in the page (before </body> if the marker is not there)."""
    if marker in page:
        return page.replace(marker, extra + marker, 1)
    return page.replace("</body>", extra + "</body>", 1)


def generate_rl_report(run_dir: str | Path, output: str | Path | None = None) -> tuple[Path, list[Finding]]:
    """RUN_DIR/plots/rl_*.png and RUN_DIR/report.html (or `output`) for an RL run; returns (path, findings)."""
    run = load_rl_run(run_dir)
    figs = rl_figures(run, run.run_dir / "plots")
    findings = rl_findings(run)
    sections = [x for x in RL_SECTIONS if x[0] != "sft" or run.kind == "rft"]
    page = render_html(TITLES[run.kind], findings, figs, None, sections, extra_html="")
    sub = f"<p class='sub'>run directory: <code>{html.escape(str(run.run_dir.resolve()))}</code></p>"
    page = _insert(page, "<div class='diag'>", sub)
    config = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in run.config.items()
    )
    tail = prompt_table(run) + (f"<h2>Configuration</h2><table>{config}</table>" if config else "")
    page = _insert(page, "<p class='sub'>generated by preflens report</p>", tail)
    out = Path(output) if output is not None else run.run_dir / "report.html"
    out.write_text(page)
    return out, findings
