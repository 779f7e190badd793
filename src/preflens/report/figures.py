"""The report's figures: matplotlib PNGs of the run's dynamics, drawn as the papers draw them.

- Yuan et al. 2024 (arXiv 2410.13828), Fig. 1: chosen and rejected log-probs over training steps
  (their synchronized rise or fall is gradient entanglement); Sec. 3's conditions, checked per probed
  pair: condition 1 (chosen rises) d_w |g_w|^2 - d_l <g_w, g_l> > 0 and condition 2 (rejected falls)
  d_w <g_w, g_l> - d_l |g_l|^2 < 0, with the gradient cosine <g_w, g_l> / (|g_w| |g_l|);
- Razin et al. 2024 (arXiv 2410.08847): likelihood displacement, the share of pairs whose chosen
  log-prob fell below its starting value (Sec. 1), and CHES score vs the observed chosen change (Sec. 5);
- Ma et al. 2025 (arXiv 2502.20847), Eq. 2: the gradient-imbalance ratio |dL/dpi_w| : |dL/dpi_l|.

Each `_fig_*` returns None when the run lacks its data (the page then shows a note instead). Colours are
the papers' convention: chosen blue, rejected red.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd
from matplotlib.figure import Figure as MplFigure

from preflens.report.papers import MA, RAZIN, YUAN
from preflens.report.runs import RunData, find_column, frac_chosen_fell_by_step, logps_series

__all__ = [
    "CHOSEN",
    "REJECTED",
    "GREY",
    "Figure",
    "make_figures",
    "new_fig",
    "save_fig",
    "style_axes",
    "plot_metric",
]

# Colours used in every figure: chosen blue, rejected red (the papers' convention).
CHOSEN = "#1f77b4"
REJECTED = "#d62728"
GREY = "#7f7f7f"


@dataclass
class Figure:
    """One figure of the report: where its PNG is and what it shows."""

    name: str
    title: str
    path: Path
    caption: str


def new_fig(ncols: int = 1, nrows: int = 1, width: float = 5.2, height: float = 3.4):
    # The object-oriented API (no pyplot): no global state, safe in threads and with any backend.
    fig = MplFigure(figsize=(width * ncols, height * nrows), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save_fig(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def style_axes(ax: Any, title: str, ylabel: str, xlabel: str = "step") -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def plot_metric(ax: Any, m: Any, key: str, **kw: Any) -> bool:
    if find_column(m, key) is None:
        return False
    d = m[m[key].notna()]
    ax.plot(d["step"], d[key], marker="o" if len(d) < 30 else None, markersize=3, **kw)
    return True


def _fig_logps(run: RunData, out: Path) -> Figure | None:
    """Yuan et al. 2024 (arXiv 2410.13828), Fig. 1: mean chosen and rejected log-probs over steps, train
    and eval."""
    panels = [(split, logps_series(run, split)) for split in ("train", "eval")]
    panels = [(split, ser) for split, ser in panels if ser["step"]]
    if not panels:
        return None
    fig, axes = new_fig(ncols=len(panels))
    for ax, (split, ser) in zip(axes, panels):
        marker = "o" if len(ser["step"]) < 30 else None
        for key, colour in (("chosen", CHOSEN), ("rejected", REJECTED)):
            ax.plot(ser["step"], ser[key], color=colour, marker=marker, markersize=3, label=key)
        m = run.metric_rows(split)
        if ser["source"] != "batch means" and split == "train" and find_column(m, "logps/chosen"):
            for key, colour in (("logps/chosen", CHOSEN), ("logps/rejected", REJECTED)):
                d = m[m[key].notna()]
                ax.scatter(d["step"], d[key], color=colour, s=6, alpha=0.25, label=f"{key[6:]} (batch)")
        style_axes(ax, f"{split}: mean summed log-prob ({ser['source']})", "log-prob (nats)")
        ax.legend(fontsize=8)
    save_fig(fig, out / "logps.png")
    return Figure(
        "logps",
        "Chosen and rejected log-probs",
        out / "logps.png",
        f"Mean summed response log-probs per step ({YUAN}, Fig. 1), over the same pairs at every "
        "evaluation where the run tracked them (pale dots: the mean over each step's own batch, which "
        "also moves with which pairs were drawn). Both curves falling together is the synchronized "
        "decrease of gradient entanglement; a falling chosen curve is likelihood displacement.",
    )


def _fig_pair_trajectories(run: RunData, out: Path) -> Figure | None:
    """Per-pair change of chosen/rejected log-prob from its start (pairs.parquet)."""
    if run.pairs is None:
        return None
    splits = [s for s in ("eval", "train") if run.pairs[run.pairs["split"] == s]["step"].nunique() > 1]
    if not splits:
        return None
    fig, axes = new_fig(ncols=len(splits))
    for ax, split in zip(axes, splits):
        df = run.pairs[run.pairs["split"] == split].sort_values(["pair_id", "step"], kind="stable")
        ids = df["pair_id"].unique()
        shown = ids[:40]  # thin lines for a readable subset, means over all pairs
        for col, colour in (("chosen", CHOSEN), ("rejected", REJECTED)):
            start = df.groupby("pair_id")[col].transform("first")
            d = df.assign(d=df[col] - start)
            for pid in shown:
                one = d[d["pair_id"] == pid]
                ax.plot(one["step"], one["d"], color=colour, alpha=0.12, linewidth=0.8)
            mean = d.groupby("step")["d"].mean()
            ax.plot(mean.index, mean.values, color=colour, linewidth=2.4, label=f"{col} (mean)")
        ax.axhline(0, color="black", linewidth=0.8)
        style_axes(ax, f"{split}: change from start, {len(ids)} pairs", "Δ log-prob (nats)")
        ax.legend(fontsize=9)
    save_fig(fig, out / "pair_trajectories.png")
    return Figure(
        "pair_trajectories",
        "Per-pair log-prob change",
        out / "pair_trajectories.png",
        "Each thin line is one pair's change of summed log-prob since its first measurement (up to 40 "
        "pairs drawn); thick lines are the means over all pairs.",
    )


def _fig_margin_accuracy(run: RunData, out: Path) -> Figure | None:
    have = [
        s
        for s in ("train", "eval")
        if find_column(run.metric_rows(s), "rewards/margins")
        or find_column(run.metric_rows(s), "rewards/accuracies")
    ]
    if not have:
        return None
    fig, axes = new_fig(ncols=2)
    styles = {"train": dict(color=GREY, alpha=0.8), "eval": dict(color="black")}
    for s in have:
        m = run.metric_rows(s)
        plot_metric(axes[0], m, "rewards/margins", label=s, **styles[s])
        plot_metric(axes[1], m, "rewards/accuracies", label=s, **styles[s])
    style_axes(axes[0], "reward margin", "beta (r_w - r_l)")
    style_axes(axes[1], "reward accuracy", "share of pairs with r_w > r_l")
    axes[1].set_ylim(-0.02, 1.02)
    for ax in axes:
        ax.legend(fontsize=9)
    save_fig(fig, out / "margin_accuracy.png")
    return Figure(
        "margin_accuracy",
        "Margin and accuracy",
        out / "margin_accuracy.png",
        "The implicit-reward margin and the share of pairs ranked correctly. A rising margin with "
        "falling chosen log-probs is the signature of displacement: the loss is satisfied by pushing "
        "rejected down faster.",
    )


def _fig_frac_fell(run: RunData, out: Path) -> Figure | None:
    series = []
    if run.pairs is not None:
        for s in ("eval", "train"):
            f = frac_chosen_fell_by_step(run.pairs, s, run.fell_tol())
            if len(f) > 1:
                series.append((f"{s} (pairs.parquet)", f["step"], f["frac"]))
    if not series:
        for s in ("eval", "probe"):
            m = run.metric_rows(s)
            k = find_column(m, "frac_chosen_fell", "probe/frac_chosen_fell")
            if k:
                d = m[m[k].notna()]
                series.append((s, d["step"], d[k]))
    if not series:
        return None
    fig, axes = new_fig()
    ax = axes[0]
    for i, (label, x, y) in enumerate(series):
        ax.plot(
            x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label, color=["black", GREY][i % 2]
        )
    ax.axhline(0.5, color=REJECTED, linestyle="--", linewidth=0.8, label="half of pairs")
    ax.set_ylim(-0.02, 1.02)
    style_axes(ax, "pairs whose chosen log-prob fell", "share of pairs")
    ax.legend(fontsize=9)
    save_fig(fig, out / "frac_chosen_fell.png")
    return Figure(
        "frac_chosen_fell",
        "Likelihood displacement",
        out / "frac_chosen_fell.png",
        "Share of pairs whose chosen log-prob is below its value at the first measurement "
        f"(likelihood displacement, {RAZIN}, Sec. 1).",
    )


def _fig_entanglement(run: RunData, out: Path) -> Figure | None:
    m = run.metric_rows("probe")
    has_cos = find_column(m, "probe/cosine") is not None
    has_cond = find_column(m, "probe/frac_cond1_violated") or find_column(m, "probe/frac_cond2_violated")
    by_step = None
    if not (has_cos or has_cond) and run.probes is not None and "step" in run.probes.columns:
        p = run.probes
        agg = {}
        for src, dst in (
            ("cosine", "probe/cosine"),
            ("cond1_violated", "probe/frac_cond1_violated"),
            ("cond2_violated", "probe/frac_cond2_violated"),
        ):
            if src in p.columns:
                agg[dst] = p.assign(**{src: p[src].astype(float)}).groupby("step")[src].mean()
        if agg:
            by_step = pd.DataFrame(agg).reset_index()
            m = by_step
            has_cos = "probe/cosine" in m.columns
            has_cond = "probe/frac_cond1_violated" in m.columns or "probe/frac_cond2_violated" in m.columns
    # --step-entanglement: the same statistics of each step's training batch (train rows)
    st = run.metric_rows("train")
    st_cos = find_column(st, "entanglement/cosine") is not None
    st_cond = bool(
        find_column(st, "entanglement/frac_cond1_violated")
        or find_column(st, "entanglement/frac_cond2_violated")
    )
    if not (has_cos or has_cond or st_cos or st_cond):
        return None
    probe_tag = " (probe set)" if (st_cos or st_cond) else ""
    step_kw = {"alpha": 0.5, "linewidth": 1.0, "linestyle": "--"} if (has_cos or has_cond) else {}
    fig, axes = new_fig(ncols=2)
    if has_cos:
        plot_metric(axes[0], m, "probe/cosine", color="black", label="mean cosine" + probe_tag)
    if st_cos:
        plot_metric(
            axes[0], st, "entanglement/cosine", color=GREY, label="mean cosine (training batch)", **step_kw
        )
    if has_cos or st_cos:
        axes[0].axhline(0, color=GREY, linewidth=0.8)
        axes[0].set_ylim(-1.05, 1.05)
        axes[0].legend(fontsize=8)
    style_axes(axes[0], "gradient cosine cos(g_w, g_l)", "cosine")
    for frame, prefix, tag, kw in (
        (m, "probe/", probe_tag, {}),
        (st, "entanglement/", " (training batch)", step_kw),
    ):
        plot_metric(
            axes[1],
            frame,
            f"{prefix}frac_cond1_violated",
            color=CHOSEN,
            label="cond. 1 violated (chosen falls)" + tag,
            **kw,
        )
        plot_metric(
            axes[1],
            frame,
            f"{prefix}frac_cond2_violated",
            color=REJECTED,
            label="cond. 2 violated (rejected rises)" + tag,
            **kw,
        )
    if has_cond or st_cond:
        axes[1].set_ylim(-0.02, 1.02)
        axes[1].legend(fontsize=8)
    style_axes(axes[1], "entanglement conditions", "share of pairs")
    save_fig(fig, out / "entanglement.png")
    return Figure(
        "entanglement",
        "Gradient entanglement",
        out / "entanglement.png",
        f"{YUAN}, Sec. 3: one step moves chosen by eta (d_w |g_w|^2 - d_l <g_w,g_l>) and rejected by "
        "eta (d_w <g_w,g_l> - d_l |g_l|^2). Condition 1 fails when the first is negative (chosen predicted "
        "to fall), condition 2 when the second is positive. A cosine near 1 entangles the two. "
        "Probe set: the same pairs at every probe (--probe-every); training batch: each step's own batch, "
        "measured in its backward (--step-entanglement).",
    )


def _fig_pred_vs_obs(run: RunData, out: Path) -> Figure | None:
    p = run.probes
    if p is None:
        return None
    # a probe row at step s holds the change observed since the previous probe (obs_delta_*) and what
    # that previous probe predicted for it (pred_at_prev_*: its batch first-order change per step,
    # times the steps between the probes), ARCHITECTURE.md's probes.parquet
    # preferred: the optimizer's own last step before the probe, <g_i, delta theta> against the observed change
    # (diagnostics.update_prediction: like with like, whatever the optimizer)
    upd = find_column(p, "update_pred_chosen") is not None and p["update_pred_chosen"].notna().any()
    if upd:
        pc, oc, pr, orr = (
            "update_pred_chosen",
            "update_obs_chosen",
            "update_pred_rejected",
            "update_obs_rejected",
        )
        ylabel = "predicted Δ = <g, Δθ> (optimizer's step)"
    else:
        pc = find_column(p, "pred_at_prev_chosen")
        oc = find_column(p, "obs_delta_chosen")
        pr = find_column(p, "pred_at_prev_rejected")
        orr = find_column(p, "obs_delta_rejected")
        ylabel = "predicted Δ (paper's SGD form)"
    if not ((pc and oc) or (pr and orr)):
        return None
    fig, axes = new_fig(ncols=2, width=4.4, height=3.8)
    for ax, (a, b, colour, name) in zip(axes, ((pc, oc, CHOSEN, "chosen"), (pr, orr, REJECTED, "rejected"))):
        if a and b:
            d = p[p[a].notna() & p[b].notna()]
            ax.scatter(d[a], d[b], s=10, alpha=0.6, color=colour)
            if len(d):
                lo = float(min(d[a].min(), d[b].min()))
                hi = float(max(d[a].max(), d[b].max()))
                ax.plot([lo, hi], [lo, hi], color=GREY, linewidth=0.8, linestyle="--")
            ax.axhline(0, color="black", linewidth=0.5)
            ax.axvline(0, color="black", linewidth=0.5)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color=GREY)
        style_axes(ax, f"{name}: predicted vs observed change", "observed Δ", ylabel)
    save_fig(fig, out / "pred_vs_obs.png")
    return Figure(
        "pred_vs_obs",
        "First-order prediction vs observed change",
        out / "pred_vs_obs.png",
        _pred_caption(upd),
    )


def _pred_caption(upd: bool) -> str:
    if upd:
        return (
            "Per probed pair and probe: the change of its chosen/rejected log-prob predicted to first order from "
            "the optimizer's actual last update before the probe (<grad log pi, delta theta>, whatever the "
            "optimizer did to the gradients) against the change observed by scoring before and after that "
            "step. On the diagonal, the first-order picture held."
        )
    return (
        f"Per probed pair: the paper's SGD-form first-order change ({YUAN}, Sec. 3: one SGD step of the "
        "current learning rate from the gradient Gram and the margin weights, times the steps to the next "
        "probe) against the change observed at the next probe. Under Adam the magnitudes are not comparable; "
        "this run has no optimizer-aware columns (update_pred_*), recorded by newer versions."
    )


def _fig_weights(run: RunData, out: Path) -> Figure | None:
    m = run.metric_rows("train")
    has_w = find_column(m, "margin_weights/dw") or find_column(m, "margin_weights/dl")
    has_r = find_column(m, "imbalance/ratio")
    if not (has_w or has_r):
        return None
    fig, axes = new_fig(ncols=2)
    if has_w:
        plot_metric(axes[0], m, "margin_weights/dw", color=CHOSEN, label="d_w = -dl/d chosen")
        plot_metric(axes[0], m, "margin_weights/dl", color=REJECTED, label="d_l = dl/d rejected")
        axes[0].legend(fontsize=9)
    style_axes(axes[0], "margin weights", "mean weight")
    if has_r:
        d = m[m["imbalance/ratio"].notna()]
        axes[1].plot(
            d["step"], d["imbalance/ratio"], color="black", marker="o" if len(d) < 30 else None, markersize=3
        )
        axes[1].axhline(1.0, color=GREY, linestyle="--", linewidth=0.8)
        if (d["imbalance/ratio"] > 0).all() and len(d):
            axes[1].set_yscale("log")
    style_axes(axes[1], "gradient imbalance |dL/dπ_w| : |dL/dπ_l|", "ratio (1 = balanced)")
    save_fig(fig, out / "margin_weights.png")
    return Figure(
        "margin_weights",
        "Margin weights and gradient imbalance",
        out / "margin_weights.png",
        f"d_w and d_l scale the chosen and rejected gradients in every step ({YUAN}, Sec. 3). The "
        f"imbalance ratio is pi(y_l)/pi(y_w) for DPO ({MA}, Eq. 2): far below 1, the update is driven by the "
        "rejected response.",
    )


def _fig_loss(run: RunData, out: Path) -> Figure | None:
    tr, ev = run.metric_rows("train"), run.metric_rows("eval")
    if not (find_column(tr, "loss") or find_column(ev, "loss")):
        return None
    # `--loss normalized` trains on a surrogate whose value (about 0) is not a loss level and logs DPO's
    # loss beside it as loss/dpo (its eval loss is DPO's): drawing "loss" would set one against the other
    key = "loss/dpo" if (find_column(tr, "loss/dpo") or find_column(ev, "loss/dpo")) else "loss"
    fig, axes = new_fig()
    plot_metric(axes[0], tr, key, color=GREY, label="train")
    plot_metric(axes[0], ev, key, color="black", label="eval")
    style_axes(axes[0], "DPO loss" if key == "loss/dpo" else "loss", key)
    axes[0].legend(fontsize=9)
    save_fig(fig, out / "loss.png")
    caption = "Training and evaluation loss."
    if key == "loss/dpo":
        caption = (
            "Training and evaluation DPO loss (same beta): the run optimizes a surrogate whose value is "
            "not a loss level, so DPO's loss of the same log-probs is drawn."
        )
    return Figure("loss", "Loss", out / "loss.png", caption)


def _fig_ches(ches: Any, out: Path) -> Figure | None:
    if ches is None:
        return None
    t = ches.table
    fig, axes = new_fig(ncols=2, width=4.6)
    axes[0].scatter(t["score"], t["chosen_change"], s=12, alpha=0.6, color=CHOSEN)
    axes[0].axhline(0, color="black", linewidth=0.6)
    style_axes(
        axes[0], f"CHES vs chosen change (ρ = {ches.spearman_ches:+.2f})", "chosen Δ log-prob", "CHES score"
    )
    q = ches.by_quartile
    axes[1].bar(q["quartile"].astype(str), q["mean_chosen_change"], color=CHOSEN)
    axes[1].axhline(0, color="black", linewidth=0.6)
    style_axes(
        axes[1], "mean chosen change by CHES quartile", "chosen Δ log-prob", "CHES quartile (4 = highest)"
    )
    save_fig(fig, out / "ches.png")
    return Figure(
        "ches",
        "CHES score vs observed change",
        out / "ches.png",
        f"{RAZIN}, Sec. 5: pairs with a higher CHES score (similar hidden embeddings of chosen and "
        "rejected) are predicted to lose chosen likelihood under DPO.",
    )


def make_figures(run: RunData, plots_dir: Path, ches: Any = None) -> dict[str, Figure]:
    """Draw every figure the data allow into `plots_dir`; returns name -> Figure."""
    matplotlib.use("Agg", force=False)
    makers = [
        lambda: _fig_logps(run, plots_dir),
        lambda: _fig_pair_trajectories(run, plots_dir),
        lambda: _fig_frac_fell(run, plots_dir),
        lambda: _fig_margin_accuracy(run, plots_dir),
        lambda: _fig_entanglement(run, plots_dir),
        lambda: _fig_pred_vs_obs(run, plots_dir),
        lambda: _fig_weights(run, plots_dir),
        lambda: _fig_ches(ches, plots_dir),
        lambda: _fig_loss(run, plots_dir),
    ]
    figs: dict[str, Figure] = {}
    for make in makers:
        f = make()
        if f is not None:
            figs[f.name] = f
    return figs
