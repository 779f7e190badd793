"""`preflens compare`: the same data and model under several losses, side by side.

Yuan et al. 2024 (arXiv 2410.13828), Fig. 1 is this comparison: DPO, IPO, SimPO, CPO, SLiC,
RRHF, DPOP, R-DPO and SPPO trained on the same data, with the chosen and rejected log-probs of each
drawn over training. Margin-based losses move the two together (gradient entanglement); losses that
give chosen and rejected separate targets (SPPO) or normalize their gradients do not. Running the
losses one after another with everything else fixed is what makes the curves comparable, so
`run_compare` trains one run directory per loss through the ordinary trainer (`preflens.train`), and
`compare_runs` draws their trajectories in one figure and writes `compare.html` with a table of the
end-of-run numbers and a link to each run's own report.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib import colormaps

from preflens.errors import PreflensError
from preflens.losses import LOSSES, loss_hparams
from preflens.report import (
    Finding,
    frac_chosen_fell_by_step,
    generate_report,
    load_run,
    render_html,
    run_verdict,
)
from preflens.report.figures import CHOSEN, REJECTED, Figure, new_fig, save_fig, style_axes
from preflens.report.papers import YUAN
from preflens.report.runs import ches_result
from preflens.train import TrainConfig, train

__all__ = ["RunSummary", "summarize_run", "compare_runs", "run_compare"]


@dataclass
class RunSummary:
    """End-of-run numbers of one loss's run (NaN where the run dir lacks the data)."""

    name: str
    run_dir: Path
    split: str
    steps: Any  # steps of the trajectory
    chosen: Any  # mean change of chosen log-prob since the first measurement, per step
    rejected: Any
    chosen_change: float
    rejected_change: float
    frac_chosen_fell: float
    margin: float
    accuracy: float
    cond1_violated: float
    verdict: str = ""  # the run's verdict headline (report.verdict)
    verdict_severity: str = "info"


def _last(m: Any, key: str) -> float:
    if m is None or len(m) == 0 or key not in m.columns:
        return math.nan
    v = m[key].dropna()
    return float(v.iloc[-1]) if len(v) else math.nan


def summarize_run(name: str, run_dir: str | Path) -> RunSummary:
    """Trajectories and end-of-run numbers of one run, from pairs.parquet when it has more than one
    step (per-pair means), else from the mean log-probs in metrics.jsonl."""
    run = load_run(run_dir)
    steps = chosen = rejected = None
    split = ""
    frac = math.nan
    if run.pairs is not None:
        for s in ("eval", "train"):
            df = run.pairs[run.pairs["split"] == s].sort_values(["pair_id", "step"], kind="stable")
            if df["step"].nunique() > 1:
                d = df.assign(
                    dc=df["chosen"] - df.groupby("pair_id")["chosen"].transform("first"),
                    dr=df["rejected"] - df.groupby("pair_id")["rejected"].transform("first"),
                )
                g = d.groupby("step")
                steps, chosen, rejected = list(g.groups), g["dc"].mean().to_numpy(), g["dr"].mean().to_numpy()
                frac = float(frac_chosen_fell_by_step(run.pairs, s, run.fell_tol())["frac"].iloc[-1])
                split = f"{s} pairs"
                break
    if steps is None:
        for s in ("eval", "train"):
            m = run.metric_rows(s)
            if "logps/chosen" in m.columns and m["logps/chosen"].notna().sum() > 1:
                m = m[m["logps/chosen"].notna() & m["logps/rejected"].notna()]
                steps = m["step"].tolist()
                chosen = (m["logps/chosen"] - m["logps/chosen"].iloc[0]).to_numpy()
                rejected = (m["logps/rejected"] - m["logps/rejected"].iloc[0]).to_numpy()
                split = f"{s} batches"
                break
    ev = run.metric_rows("eval")
    tr = run.metric_rows("train")
    margin = _last(ev, "rewards/margins")
    acc = _last(ev, "rewards/accuracies")
    if math.isnan(margin):
        margin, acc = _last(tr, "rewards/margins"), _last(tr, "rewards/accuracies")
    c1 = math.nan
    if run.probes is not None and "cond1_violated" in run.probes.columns:
        c1 = float(run.probes["cond1_violated"].astype(float).mean())
    elif "probe/frac_cond1_violated" in run.metric_rows("probe").columns:
        c1 = float(run.metric_rows("probe")["probe/frac_cond1_violated"].mean())
    v = run_verdict(run, ches_result(run))
    return RunSummary(
        verdict=v.headline,
        verdict_severity=v.severity,
        name=name,
        run_dir=Path(run_dir),
        split=split,
        steps=steps or [],
        chosen=chosen if chosen is not None else [],
        rejected=rejected if rejected is not None else [],
        chosen_change=float(chosen[-1]) if chosen is not None and len(chosen) else math.nan,
        rejected_change=float(rejected[-1]) if rejected is not None and len(rejected) else math.nan,
        frac_chosen_fell=frac,
        margin=margin,
        accuracy=acc,
        cond1_violated=c1,
    )


def _fig_grid(summaries: list[RunSummary], out: Path) -> Figure:
    """One small panel per loss (chosen blue, rejected red), shared y axis: the layout of Yuan et al.
    2024 (arXiv 2410.13828), Fig. 1."""
    n = len(summaries)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = new_fig(ncols=ncols, nrows=nrows, width=3.4, height=2.8)
    lo = min([min(min(s.chosen), min(s.rejected)) for s in summaries if len(s.steps)] + [0.0])
    hi = max([max(max(s.chosen), max(s.rejected)) for s in summaries if len(s.steps)] + [0.0])
    pad = 0.05 * (hi - lo or 1.0)
    for ax, s in zip(axes, summaries):
        if len(s.steps):
            ax.plot(s.steps, s.chosen, color=CHOSEN, label="chosen", linewidth=2)
            ax.plot(s.steps, s.rejected, color=REJECTED, label="rejected", linewidth=2)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_ylim(lo - pad, hi + pad)
        style_axes(ax, s.name, "Δ log-prob (nats)")
    for ax in axes[n:]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    save_fig(fig, out / "compare_trajectories.png")
    return Figure(
        "trajectories",
        "Chosen and rejected log-prob change per loss",
        out / "compare_trajectories.png",
        "Mean change of the summed chosen (blue) and rejected (red) log-prob since the first measurement, "
        f"one panel per loss, same axes ({YUAN}, Fig. 1). Both curves going the same way is the "
        "synchronized movement of gradient entanglement.",
    )


def _fig_overlay(summaries: list[RunSummary], out: Path) -> Figure:
    fig, axes = new_fig(ncols=2)
    cmap = colormaps["tab10"]
    for i, s in enumerate(summaries):
        if len(s.steps):
            axes[0].plot(s.steps, s.chosen, color=cmap(i % 10), label=s.name, linewidth=1.8)
            axes[1].plot(s.steps, s.rejected, color=cmap(i % 10), label=s.name, linewidth=1.8)
    for ax, what in zip(axes, ("chosen", "rejected")):
        ax.axhline(0, color="black", linewidth=0.6)
        style_axes(ax, f"{what}: change per loss", "Δ log-prob (nats)")
        ax.legend(fontsize=8)
    save_fig(fig, out / "compare_overlay.png")
    return Figure(
        "overlay",
        "All losses on one axis",
        out / "compare_overlay.png",
        "The same trajectories overlaid: which loss keeps the chosen response's likelihood.",
    )


def _fmt(x: float, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.0f}%" if pct else f"{x:+.2f}"


def _table_html(summaries: list[RunSummary], out: Path) -> str:
    esc = html.escape
    rows = [
        "<h2>End of run</h2><table><tr><th>loss</th><th>Δ chosen</th><th>Δ rejected</th>"
        "<th>chosen fell</th><th>margin</th><th>accuracy</th><th>cond. 1 violated</th><th>verdict</th><th>report</th></tr>"
    ]
    for s in summaries:
        rep = s.run_dir / "report.html"
        try:
            link = rep.resolve().relative_to(out.resolve()).as_posix()
        except ValueError:
            link = rep.resolve().as_uri()
        rows.append(
            f"<tr><td>{esc(s.name)}</td><td>{_fmt(s.chosen_change)}</td><td>{_fmt(s.rejected_change)}</td>"
            f"<td>{_fmt(s.frac_chosen_fell, True)}</td><td>{_fmt(s.margin)}</td>"
            f"<td>{_fmt(s.accuracy, True)}</td><td>{_fmt(s.cond1_violated, True)}</td>"
            f"<td class='{esc(s.verdict_severity)}'>{esc(s.verdict)}</td>"
            f"<td><a href='{esc(link)}'>{esc(s.name)}</a></td></tr>"
        )
    rows.append(
        "</table><p class='cap'>Δ: mean change of summed log-prob (nats) from the first to the last "
        "measurement; chosen fell: share of pairs whose chosen log-prob ended more than the noise tolerance "
        "below its start; verdict: the run's own report's first line.</p>"
    )
    return "".join(rows)


def comparison_findings(summaries: list[RunSummary]) -> list[Finding]:
    """One line per run: its verdict (coloured as in its own report), then how chosen and rejected moved."""
    out = []
    for s in summaries:
        if s.verdict:
            out.append(Finding("verdict", f"{s.name}: verdict: {s.verdict}", s.verdict_severity))
        if math.isnan(s.chosen_change):
            out.append(Finding("info", f"{s.name}: no log-prob trajectory in the run dir", "info"))
            continue
        if s.chosen_change < 0 and s.rejected_change < 0:
            what = "both fell (synchronized decrease)"
        elif s.chosen_change > 0 and s.rejected_change > 0:
            what = "both rose (synchronized increase)"
        elif s.chosen_change >= 0:
            what = "chosen rose, rejected fell"
        else:
            what = "chosen fell, rejected rose"
        sev = "info"  # the movement is context; the verdict above says whether it is a failure
        fell = (
            ""
            if math.isnan(s.frac_chosen_fell)
            else f"; chosen fell in {100 * s.frac_chosen_fell:.0f}% of pairs"
        )
        out.append(
            Finding(
                "compare",
                f"{s.name}: chosen {s.chosen_change:+.2f}, rejected {s.rejected_change:+.2f} nats: {what}{fell}",
                sev,
            )
        )
    return out


def compare_runs(
    runs: dict[str, str | Path],
    output_dir: str | Path,
    *,
    title: str = "preflens compare",
    filename: str = "compare.html",
    extra_findings: Sequence[Finding] = (),
) -> Path:
    """Draw the runs' trajectories side by side into OUTPUT/plots and write OUTPUT/<filename>.
    Each run also gets its own report.html (written if missing). `extra_findings` are listed after
    the per-loss lines (the demo adds each run's diagnosis)."""
    if not runs:
        raise PreflensError("compare: no runs to compare")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for rd in runs.values():
        if not (Path(rd) / "report.html").exists():
            generate_report(rd)
    summaries = [summarize_run(name, rd) for name, rd in runs.items()]
    plots = out / "plots"
    figs = {f.name: f for f in (_fig_grid(summaries, plots), _fig_overlay(summaries, plots))}
    sections = [
        ("trajectories", "Chosen and rejected log-probs per loss", "no trajectories"),
        ("overlay", "All losses on one axis", "no trajectories"),
    ]
    page = render_html(
        title,
        comparison_findings(summaries) + list(extra_findings),
        figs,
        None,
        sections=sections,
        extra_html=_table_html(summaries, out),
    )
    path = out / filename
    path.write_text(page)
    return path


def run_compare(
    losses: Sequence[str],
    data: str,
    output_dir: str | Path,
    *,
    model: str | None = None,
    eval_data: str | None = None,
    model_factory: Callable[[], tuple[Any, Any]] | None = None,
    loss_kwargs: dict[str, dict[str, Any]] | None = None,
    callbacks_factory: Callable[[str], Sequence[Any]] | None = None,
    **train_kwargs: Any,
) -> Path:
    """Train one run per loss on the same data, model and seed (OUTPUT/<loss>/) and compare them.

    `train_kwargs` are `TrainConfig` fields shared by all runs (steps, lr, lora_rank, eval_every,
    probe_every, ...); each loss keeps its own default hyper-parameters unless `loss_kwargs[name]`
    sets some. `model_factory` returns a fresh (model, tokenizer) per run (Python callers with an
    in-memory model; every run must start from the same weights). Returns OUTPUT/compare.html.
    """
    losses = list(losses)
    if not losses:
        raise PreflensError("--losses: give at least one loss, e.g. dpo,ipo,simpo")
    unknown = [name for name in losses if name not in LOSSES]
    if unknown:
        raise PreflensError(f"--losses: unknown loss(es) {unknown}; available: {', '.join(sorted(LOSSES))}")
    if len(set(losses)) != len(losses):
        raise PreflensError(f"--losses: a loss is listed twice in {losses}")
    loss_kwargs = dict(loss_kwargs or {})
    for name, kw in loss_kwargs.items():
        if name not in losses:
            raise PreflensError(f"loss_kwargs for '{name}', which is not in --losses {losses}")
        accepted = loss_hparams(name, options=True)  # TRL's objective options too (ld_alpha, ...)
        bad = sorted(set(kw) - set(accepted))
        if bad:
            raise PreflensError(f"loss '{name}' has no hyper-parameter(s) {bad}; it has {accepted}")
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise PreflensError(f"{out}: exists and is not empty; pass a new --output-dir")
    configs = {
        name: TrainConfig(
            model=model,
            data=data,
            eval_data=eval_data,
            loss=name,
            output_dir=str(out / name),
            loss_kwargs=dict(loss_kwargs.get(name, {})),
            **train_kwargs,
        )
        for name in losses
    }
    for cfg in configs.values():  # every option checked before the first run starts
        cfg.validate()
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Path] = {}
    for name, cfg in configs.items():
        m, tok = model_factory() if model_factory is not None else (None, None)
        cbs = list(callbacks_factory(name)) if callbacks_factory is not None else []
        rd = train(cfg, model=m, tokenizer=tok, callbacks=cbs)
        generate_report(rd)
        runs[name] = Path(rd)
    return compare_runs(runs, out, title=f"preflens compare: {', '.join(losses)}")
