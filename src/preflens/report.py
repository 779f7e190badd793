"""`preflens report RUN_DIR`: the run's dynamics as PNGs and one self-contained report.html.

What a user sees first after a run, so it leads with a short written diagnosis ("chosen fell in 61%
of eval pairs from step 40; condition 1 violated in 55% of probed pairs; try: ...") and then draws
the figures the papers draw:

- seed 000 (Yuan et al., arXiv 2410.13828), Fig. 1: chosen and rejected log-probs over training steps
  (their synchronized rise or fall is gradient entanglement); Sec. 3's conditions, checked per probed
  pair: condition 1 (chosen rises) d_w |g_w|^2 - d_l <g_w, g_l> > 0 and condition 2 (rejected falls)
  d_w <g_w, g_l> - d_l |g_l|^2 < 0, with the gradient cosine <g_w, g_l> / (|g_w| |g_l|);
- seed 003 (Razin et al., arXiv 2410.08847): likelihood displacement, the share of pairs whose chosen
  log-prob fell below its starting value, and CHES score vs the observed chosen change (Sec. 5);
- seed 004 (arXiv 2502.20847), Eq. 2: the gradient-imbalance ratio |dL/dpi_w| : |dL/dpi_l|.

The report reads whatever the run directory holds (ARCHITECTURE.md's layout: metrics.jsonl,
pairs.parquet, probes.parquet, CHES scores) and replaces a section whose data are absent by a note,
so it works on a TRL run instrumented by `preflens.integrations.trl` as well as on `preflens train`.
Images are embedded as base64 PNG: the HTML is one file that can be mailed or attached to a ticket.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preflens.errors import PreflensError

__all__ = [
    "RunData",
    "Finding",
    "Figure",
    "load_run",
    "diagnose",
    "make_figures",
    "write_report",
    "generate_report",
    "diagnosis_text",
    "render_html",
    "frac_chosen_fell_by_step",
]

# Colours used in every figure: chosen blue, rejected red (the papers' convention).
CHOSEN = "#1f77b4"
REJECTED = "#d62728"
GREY = "#7f7f7f"


@dataclass
class RunData:
    """What a run directory holds; each field None when its file is absent."""

    run_dir: Path
    metrics: Any = None  # DataFrame from metrics.jsonl
    pairs: Any = None  # DataFrame from pairs.parquet
    probes: Any = None  # DataFrame from probes.parquet
    ches_path: Path | None = None
    config: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def fell_tol(self) -> float:
        """The trainer's threshold for "chosen fell" (`preflens.train.fell_tolerance`) for this run's
        precision; float32's when the run directory has no config.yaml (e.g. a TRL run)."""
        from preflens.diagnostics.displacement import fell_tolerance

        cfg = self.config or {}
        return fell_tolerance(cfg.get("dtype"), cfg.get("mixed_precision"))

    def metric_rows(self, split: str) -> Any:
        """Rows of metrics.jsonl for one split, sorted by step (empty DataFrame when none)."""
        import pandas as pd

        if self.metrics is None or "split" not in self.metrics.columns:
            return pd.DataFrame()
        return self.metrics[self.metrics["split"] == split].sort_values("step", kind="stable")


@dataclass
class Finding:
    """One line of the written diagnosis."""

    kind: str  # "displacement", "entanglement", "synchronized", "imbalance", "ches", "ok", "info"
    text: str
    severity: str = "warn"  # "warn" | "ok" | "info"


@dataclass
class Figure:
    """One figure of the report: where its PNG is and what it shows."""

    name: str
    title: str
    path: Path
    caption: str


# ----------------------------------------------------------------------------------------------
# reading


def _read_metrics(path: Path, notes: list[str]) -> Any:
    import pandas as pd

    rows = []
    with path.open() as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                # a run that is still writing may end with a half line; anything else is worth saying
                notes.append(f"{path.name} line {i}: not valid JSON, skipped")
                continue
            if not isinstance(row, dict) or "step" not in row:
                notes.append(f"{path.name} line {i}: expected an object with a 'step' key, skipped")
                continue
            rows.append(row)
    if not rows:
        return None
    df = pd.DataFrame(rows)
    if "split" not in df.columns:
        df["split"] = "train"
    df["split"] = df["split"].fillna("train")
    return df


def _find_ches(run_dir: Path) -> Path | None:
    """CHES scores written by `preflens ches` (columns pair_index, score) into or beside the run."""
    candidates = [
        run_dir / "ches_scores.parquet",
        run_dir / "ches.parquet",
        run_dir / "ches" / "scores.parquet",
    ]
    candidates += sorted(run_dir.glob("*ches*.parquet")) + sorted(run_dir.glob("ches*/*.parquet"))
    for c in candidates:
        if c.is_file():
            return c
    return None


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory. Missing files are not errors (their sections are skipped); a directory
    with none of metrics.jsonl, pairs.parquet, probes.parquet is."""
    import pandas as pd

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PreflensError(f"{run_dir}: no such run directory (expected the --output-dir of a preflens run)")
    run = RunData(run_dir=run_dir)
    if (run_dir / "metrics.jsonl").is_file():
        run.metrics = _read_metrics(run_dir / "metrics.jsonl", run.notes)
    for name in ("pairs", "probes"):
        p = run_dir / f"{name}.parquet"
        if p.is_file():
            try:
                df = pd.read_parquet(p)
            except Exception as exc:  # a truncated file from a killed run
                raise PreflensError(f"{p}: cannot be read as parquet ({exc})") from None
            setattr(run, name, df if len(df) else None)
    if run.pairs is not None:
        missing = [c for c in ("step", "pair_id", "chosen", "rejected") if c not in run.pairs.columns]
        if missing:
            raise PreflensError(
                f"{run_dir / 'pairs.parquet'}: missing column(s) {missing}; expected step, split, pair_id, "
                "chosen, rejected, ref_chosen, ref_rejected"
            )
        if "split" not in run.pairs.columns:
            run.pairs["split"] = "eval"
    run.ches_path = _find_ches(run_dir)
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        try:
            import yaml

            loaded = yaml.safe_load(cfg.read_text())
            run.config = loaded if isinstance(loaded, dict) else None
        except Exception:
            run.notes.append("config.yaml could not be parsed; not shown")
    if run.metrics is None and run.pairs is None and run.probes is None:
        # `preflens compare` and `preflens demo` write one run per sub-directory: point at them
        runs = sorted(d.name for d in run_dir.iterdir() if d.is_dir() and (d / "metrics.jsonl").is_file())
        if runs:
            made = " (its summary is compare.html)" if (run_dir / "compare.html").is_file() else ""
            raise PreflensError(
                f"{run_dir}: holds one run per sub-directory ({', '.join(runs)}){made}; report one of "
                f"them, e.g. preflens report {run_dir / runs[0]}"
            )
        raise PreflensError(
            f"{run_dir}: none of metrics.jsonl, pairs.parquet, probes.parquet found; "
            "is this the --output-dir of `preflens train` (or of a TRL run with the preflens callback)?"
        )
    return run


# ----------------------------------------------------------------------------------------------
# numbers behind the diagnosis


def frac_chosen_fell_by_step(pairs: Any, split: str, tol: float = 0.0) -> Any:
    """Per step: share of pairs whose chosen log-prob is more than `tol` nats below its value at that
    pair's first measurement (likelihood displacement, seed 003 Sec. 1; `RunData.fell_tol` gives the
    trainer's threshold). Returns a DataFrame step, frac, n.
    The first step itself counts 0 by definition and is kept so the curve starts at zero."""
    import pandas as pd

    df = pairs[pairs["split"] == split].sort_values(["pair_id", "step"], kind="stable")
    if df.empty:
        return pd.DataFrame(columns=["step", "frac", "n"])
    start = df.groupby("pair_id")["chosen"].transform("first")
    fell = df["chosen"] < start - tol
    out = (
        df.assign(fell=fell)
        .groupby("step")
        .agg(frac=("fell", "mean"), n=("fell", "size"))
        .reset_index()
        .sort_values("step")
    )
    return out


def _mean_trajectory(pairs: Any, split: str, col: str) -> Any:
    """Mean over pairs of `col` minus its value at the pair's first measurement, per step."""
    df = pairs[pairs["split"] == split].sort_values(["pair_id", "step"], kind="stable")
    start = df.groupby("pair_id")[col].transform("first")
    return df.assign(d=df[col] - start).groupby("step")["d"].mean()


def _first_step_above(steps: Any, values: Any, threshold: float) -> int | None:
    """The first step from which `values` stays above `threshold` to the end, or None."""
    steps, values = list(steps), list(values)
    first = None
    for s, v in zip(steps, values):
        if v > threshold:
            if first is None:
                first = s
        else:
            first = None
    return int(first) if first is not None else None


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _col(df: Any, *names: str) -> str | None:
    for n in names:
        if df is not None and n in df.columns and df[n].notna().any():
            return n
    return None


def _displacement_findings(run: RunData) -> list[Finding]:
    out: list[Finding] = []
    split, fr = None, None
    if run.pairs is not None:
        for s in ("eval", "train", "probe"):
            f = frac_chosen_fell_by_step(run.pairs, s, run.fell_tol())
            if len(f) > 1:
                split, fr = s, f
                break
    if fr is None:
        ev = run.metric_rows("eval")
        c = _col(ev, "frac_chosen_fell")
        if c is not None:
            ev = ev[ev[c].notna()]
            split, fr = "eval", ev.rename(columns={c: "frac"})[["step", "frac"]]
    if fr is None or len(fr) == 0:
        return out
    last = float(fr["frac"].iloc[-1])
    last_step = int(fr["step"].iloc[-1])
    n = int(fr["n"].iloc[-1]) if "n" in fr.columns else None
    from_step = _first_step_above(fr["step"], fr["frac"], 0.5)
    where = f"{split} pairs" + (f" (n={n})" if n else "")
    if last > 0.5:
        since = f", over half since step {from_step}" if from_step is not None else ""
        out.append(
            Finding(
                "displacement",
                f"likelihood displacement: chosen log-prob below its start in {_pct(last)} of {where}"
                f" at step {last_step}{since}",
            )
        )
    else:
        out.append(
            Finding(
                "displacement",
                f"chosen log-prob fell below its start in {_pct(last)} of {where} at step {last_step}",
                severity="ok",
            )
        )
    return out


def _synchronized_findings(run: RunData) -> list[Finding]:
    """Seed 000, Fig. 1: chosen and rejected moving in the same direction."""
    dc = dr = None
    where = ""
    if run.pairs is not None:
        for s in ("eval", "train"):
            sub = run.pairs[run.pairs["split"] == s]
            if sub["step"].nunique() > 1:
                dc = _mean_trajectory(run.pairs, s, "chosen").iloc[-1]
                dr = _mean_trajectory(run.pairs, s, "rejected").iloc[-1]
                where = f"{s} pairs"
                break
    if dc is None:
        for s in ("eval", "train"):
            m = run.metric_rows(s)
            if _col(m, "logps/chosen") and _col(m, "logps/rejected"):
                m = m[m["logps/chosen"].notna() & m["logps/rejected"].notna()]
                if len(m) > 1:
                    dc = float(m["logps/chosen"].iloc[-1] - m["logps/chosen"].iloc[0])
                    dr = float(m["logps/rejected"].iloc[-1] - m["logps/rejected"].iloc[0])
                    where = f"{s} batches"
                    break
    if dc is None:
        return []
    dc, dr = float(dc), float(dr)
    if dc < 0 and dr < 0:
        return [
            Finding(
                "synchronized",
                f"synchronized decrease: mean chosen log-prob {dc:+.2f}, rejected {dr:+.2f} nats ({where}); "
                "the margin grew by pushing both down (gradient entanglement, seed 000)",
            )
        ]
    if dc > 0 and dr > 0:
        return [
            Finding(
                "synchronized",
                f"synchronized increase: mean chosen log-prob {dc:+.2f}, rejected {dr:+.2f} nats ({where}); "
                "the rejected response became more likely too",
            )
        ]
    return [
        Finding(
            "synchronized",
            f"chosen {dc:+.2f}, rejected {dr:+.2f} nats on average ({where}): they moved apart",
            severity="ok",
        )
    ]


def _entanglement_findings(run: RunData) -> list[Finding]:
    out: list[Finding] = []
    c1 = c2 = cos = None
    if run.probes is not None:
        p = run.probes
        k1 = _col(p, "cond1_violated", "cond1_violation")
        k2 = _col(p, "cond2_violated", "cond2_violation")
        kc = _col(p, "cosine", "cos")
        if k1:
            c1 = float(p[k1].astype(float).mean())
        if k2:
            c2 = float(p[k2].astype(float).mean())
        if kc:
            cos = float(p[kc].mean())
    probe = run.metric_rows("probe")
    if c1 is None and _col(probe, "probe/frac_cond1_violated"):
        c1 = float(probe["probe/frac_cond1_violated"].mean())
    if c2 is None and _col(probe, "probe/frac_cond2_violated"):
        c2 = float(probe["probe/frac_cond2_violated"].mean())
    if cos is None and _col(probe, "probe/cosine"):
        cos = float(probe["probe/cosine"].mean())
    where = "of probed pairs"
    if c1 is None and c2 is None and cos is None:
        # --step-entanglement alone: the per-step statistics of the training batches (train rows)
        train = run.metric_rows("train")
        vals = {
            k: float(train[k].mean())
            for k in (
                "entanglement/frac_cond1_violated",
                "entanglement/frac_cond2_violated",
                "entanglement/cosine",
            )
            if _col(train, k) and train[k].notna().any()
        }
        c1 = vals.get("entanglement/frac_cond1_violated")
        c2 = vals.get("entanglement/frac_cond2_violated")
        cos = vals.get("entanglement/cosine")
        where = "of training batch pairs (per step, mean over steps)"
    if c1 is None and c2 is None and cos is None:
        return out
    parts = []
    if c1 is not None:
        parts.append(f"condition 1 (chosen rises) violated in {_pct(c1)} {where}")
    if c2 is not None:
        parts.append(f"condition 2 (rejected falls) in {_pct(c2)}")
    if cos is not None:
        parts.append(f"mean gradient cosine {cos:.2f}")
    bad = (c1 is not None and c1 > 0.25) or (c2 is not None and c2 > 0.25) or (cos is not None and cos > 0.5)
    out.append(Finding("entanglement", "entanglement: " + "; ".join(parts), "warn" if bad else "ok"))
    return out


def _imbalance_findings(run: RunData) -> list[Finding]:
    m = run.metric_rows("train")
    k = _col(m, "imbalance/ratio")
    if k is None:
        return []
    r = m[k].dropna()
    med = float(r.median())
    # the ratio |dL/dpi_w| : |dL/dpi_l| = pi_l / pi_w for DPO (seed 004, Eq. 2): below 1 means the
    # rejected response gets the larger push
    if med < 0.5 or med > 2.0:
        return [
            Finding(
                "imbalance",
                f"gradient imbalance: median |dL/dpi_w| : |dL/dpi_l| = {med:.2g} (balanced is 1; seed 004)",
            )
        ]
    return [Finding("imbalance", f"gradient imbalance ratio median {med:.2g} (balanced is 1)", "ok")]


def _ches_result(run: RunData) -> Any:
    if run.ches_path is None or run.pairs is None:
        return None
    from preflens.diagnostics.displacement import ches_vs_change

    try:
        return ches_vs_change(run.ches_path, run.run_dir, split="train")
    except PreflensError as exc:
        run.notes.append(f"CHES scores not matched to the run: {exc}")
        return None


def diagnose(run: RunData, ches: Any = None) -> list[Finding]:
    """The written diagnosis: one finding per failure mode the data can speak to, then what to try."""
    findings = (
        _displacement_findings(run)
        + _synchronized_findings(run)
        + _entanglement_findings(run)
        + _imbalance_findings(run)
    )
    if ches is not None and not math.isnan(ches.spearman_ches):
        rho = ches.spearman_ches
        findings.append(
            Finding(
                "ches",
                f"CHES predicts displacement: Spearman(CHES, chosen change) = {rho:+.2f} "
                "(negative: high-CHES pairs lose chosen likelihood, seed 003)",
                "warn" if rho < -0.2 else "info",
            )
        )
    kinds = {f.kind for f in findings if f.severity == "warn"}
    tries: list[str] = []
    if kinds & {"displacement", "synchronized", "entanglement"}:
        tries += ["normalized (seed 000)", "sparse (seed 000)"]
    if kinds & {"displacement", "imbalance"}:
        tries += ["bdpo (seed 004)"]
    if "displacement" in kinds or "ches" in kinds:
        tries += ["CHES filtering: `preflens ches --drop-top 0.1` (seed 003)", "rpo (DPO + SFT term)"]
    if tries:
        findings.append(Finding("try", "try: " + ", ".join(dict.fromkeys(tries)), "info"))
    if not findings:
        findings.append(
            Finding("info", "no per-pair or probe data to diagnose from; see the plots below", "info")
        )
    return findings


# ----------------------------------------------------------------------------------------------
# figures


def _new_fig(ncols: int = 1, nrows: int = 1, width: float = 5.2, height: float = 3.4):
    # The object-oriented API (no pyplot): no global state, safe in threads and with any backend.
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width * ncols, height * nrows), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def _style(ax: Any, title: str, ylabel: str, xlabel: str = "step") -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _plot_metric(ax: Any, m: Any, key: str, **kw: Any) -> bool:
    if _col(m, key) is None:
        return False
    d = m[m[key].notna()]
    ax.plot(d["step"], d[key], marker="o" if len(d) < 30 else None, markersize=3, **kw)
    return True


def logps_series(run: RunData, split: str) -> dict[str, Any]:
    """Mean chosen/rejected summed log-prob per step of one split, and what it averages over.

    A train metrics row is the mean over that step's batch, i.e. over different pairs at every step: its
    curve moves with which pairs were drawn, not only with training. When pairs.parquet tracks the same
    pairs at every evaluation (the fixed train subset, the eval split), their per-step mean is the
    trajectory; the batch means are the fallback (e.g. a TRL run).
    """
    if run.pairs is not None:
        df = run.pairs[run.pairs["split"] == split]
        if df["step"].nunique() > 1:
            g = df.groupby("step")
            return {
                "step": list(g.size().index),
                "chosen": list(g["chosen"].mean()),
                "rejected": list(g["rejected"].mean()),
                "source": (
                    f"fixed subset of {df['pair_id'].nunique()} train pairs"
                    if split == "train"
                    else f"{df['pair_id'].nunique()} {split} pairs"
                ),
            }
    m = run.metric_rows(split)
    if not (_col(m, "logps/chosen") and _col(m, "logps/rejected")):
        return {"step": [], "chosen": [], "rejected": [], "source": "none"}
    m = m[m["logps/chosen"].notna()]
    return {
        "step": list(m["step"]),
        "chosen": list(m["logps/chosen"]),
        "rejected": list(m["logps/rejected"]),
        "source": "batch means",
    }


def _fig_logps(run: RunData, out: Path) -> Figure | None:
    """Seed 000 Fig. 1: mean chosen and rejected log-probs over steps, train and eval."""
    panels = [(split, logps_series(run, split)) for split in ("train", "eval")]
    panels = [(split, ser) for split, ser in panels if ser["step"]]
    if not panels:
        return None
    fig, axes = _new_fig(ncols=len(panels))
    for ax, (split, ser) in zip(axes, panels):
        marker = "o" if len(ser["step"]) < 30 else None
        for key, colour in (("chosen", CHOSEN), ("rejected", REJECTED)):
            ax.plot(ser["step"], ser[key], color=colour, marker=marker, markersize=3, label=key)
        m = run.metric_rows(split)
        if ser["source"] != "batch means" and split == "train" and _col(m, "logps/chosen"):
            for key, colour in (("logps/chosen", CHOSEN), ("logps/rejected", REJECTED)):
                d = m[m[key].notna()]
                ax.scatter(d["step"], d[key], color=colour, s=6, alpha=0.25, label=f"{key[6:]} (batch)")
        _style(ax, f"{split}: mean summed log-prob ({ser['source']})", "log-prob (nats)")
        ax.legend(fontsize=8)
    _save(fig, out / "logps.png")
    return Figure(
        "logps",
        "Chosen and rejected log-probs",
        out / "logps.png",
        "Mean summed response log-probs per step (seed 000, Fig. 1), over the same pairs at every "
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
    fig, axes = _new_fig(ncols=len(splits))
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
        _style(ax, f"{split}: change from start, {len(ids)} pairs", "Δ log-prob (nats)")
        ax.legend(fontsize=9)
    _save(fig, out / "pair_trajectories.png")
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
        if _col(run.metric_rows(s), "rewards/margins") or _col(run.metric_rows(s), "rewards/accuracies")
    ]
    if not have:
        return None
    fig, axes = _new_fig(ncols=2)
    styles = {"train": dict(color=GREY, alpha=0.8), "eval": dict(color="black")}
    for s in have:
        m = run.metric_rows(s)
        _plot_metric(axes[0], m, "rewards/margins", label=s, **styles[s])
        _plot_metric(axes[1], m, "rewards/accuracies", label=s, **styles[s])
    _style(axes[0], "reward margin", "beta (r_w - r_l)")
    _style(axes[1], "reward accuracy", "share of pairs with r_w > r_l")
    axes[1].set_ylim(-0.02, 1.02)
    for ax in axes:
        ax.legend(fontsize=9)
    _save(fig, out / "margin_accuracy.png")
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
            k = _col(m, "frac_chosen_fell", "probe/frac_chosen_fell")
            if k:
                d = m[m[k].notna()]
                series.append((s, d["step"], d[k]))
    if not series:
        return None
    fig, axes = _new_fig()
    ax = axes[0]
    for i, (label, x, y) in enumerate(series):
        ax.plot(
            x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label, color=["black", GREY][i % 2]
        )
    ax.axhline(0.5, color=REJECTED, linestyle="--", linewidth=0.8, label="half of pairs")
    ax.set_ylim(-0.02, 1.02)
    _style(ax, "pairs whose chosen log-prob fell", "share of pairs")
    ax.legend(fontsize=9)
    _save(fig, out / "frac_chosen_fell.png")
    return Figure(
        "frac_chosen_fell",
        "Likelihood displacement",
        out / "frac_chosen_fell.png",
        "Share of pairs whose chosen log-prob is below its value at the first measurement (seed 003).",
    )


def _fig_entanglement(run: RunData, out: Path) -> Figure | None:
    m = run.metric_rows("probe")
    has_cos = _col(m, "probe/cosine") is not None
    has_cond = _col(m, "probe/frac_cond1_violated") or _col(m, "probe/frac_cond2_violated")
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
            import pandas as pd

            by_step = pd.DataFrame(agg).reset_index()
            m = by_step
            has_cos = "probe/cosine" in m.columns
            has_cond = "probe/frac_cond1_violated" in m.columns or "probe/frac_cond2_violated" in m.columns
    # --step-entanglement: the same statistics of each step's training batch (train rows)
    st = run.metric_rows("train")
    st_cos = _col(st, "entanglement/cosine") is not None
    st_cond = bool(
        _col(st, "entanglement/frac_cond1_violated") or _col(st, "entanglement/frac_cond2_violated")
    )
    if not (has_cos or has_cond or st_cos or st_cond):
        return None
    probe_tag = " (probe set)" if (st_cos or st_cond) else ""
    step_kw = {"alpha": 0.5, "linewidth": 1.0, "linestyle": "--"} if (has_cos or has_cond) else {}
    fig, axes = _new_fig(ncols=2)
    if has_cos:
        _plot_metric(axes[0], m, "probe/cosine", color="black", label="mean cosine" + probe_tag)
    if st_cos:
        _plot_metric(
            axes[0], st, "entanglement/cosine", color=GREY, label="mean cosine (training batch)", **step_kw
        )
    if has_cos or st_cos:
        axes[0].axhline(0, color=GREY, linewidth=0.8)
        axes[0].set_ylim(-1.05, 1.05)
        axes[0].legend(fontsize=8)
    _style(axes[0], "gradient cosine cos(g_w, g_l)", "cosine")
    for frame, prefix, tag, kw in (
        (m, "probe/", probe_tag, {}),
        (st, "entanglement/", " (training batch)", step_kw),
    ):
        _plot_metric(
            axes[1],
            frame,
            f"{prefix}frac_cond1_violated",
            color=CHOSEN,
            label="cond. 1 violated (chosen falls)" + tag,
            **kw,
        )
        _plot_metric(
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
    _style(axes[1], "entanglement conditions", "share of pairs")
    _save(fig, out / "entanglement.png")
    return Figure(
        "entanglement",
        "Gradient entanglement",
        out / "entanglement.png",
        "Seed 000, Sec. 3: one step moves chosen by eta (d_w |g_w|^2 - d_l <g_w,g_l>) and rejected by "
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
    pc = _col(p, "pred_at_prev_chosen")
    oc = _col(p, "obs_delta_chosen")
    pr = _col(p, "pred_at_prev_rejected")
    orr = _col(p, "obs_delta_rejected")
    if not ((pc and oc) or (pr and orr)):
        return None
    fig, axes = _new_fig(ncols=2, width=4.4, height=3.8)
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
        _style(ax, f"{name}: predicted vs observed change", "observed Δ", "predicted Δ (first order, SGD)")
    _save(fig, out / "pred_vs_obs.png")
    return Figure(
        "pred_vs_obs",
        "First-order prediction vs observed change",
        out / "pred_vs_obs.png",
        "Per probed pair: the first-order change predicted at one probe from the gradient Gram and the "
        "margin weights (one SGD step of the current learning rate, times the steps to the next probe) "
        "against the change observed at the next probe. With Adam the magnitudes differ; the signs are "
        "what the conditions test.",
    )


def _fig_weights(run: RunData, out: Path) -> Figure | None:
    m = run.metric_rows("train")
    has_w = _col(m, "margin_weights/dw") or _col(m, "margin_weights/dl")
    has_r = _col(m, "imbalance/ratio")
    if not (has_w or has_r):
        return None
    fig, axes = _new_fig(ncols=2)
    if has_w:
        _plot_metric(axes[0], m, "margin_weights/dw", color=CHOSEN, label="d_w = -dl/d chosen")
        _plot_metric(axes[0], m, "margin_weights/dl", color=REJECTED, label="d_l = dl/d rejected")
        axes[0].legend(fontsize=9)
    _style(axes[0], "margin weights", "mean weight")
    if has_r:
        d = m[m["imbalance/ratio"].notna()]
        axes[1].plot(
            d["step"], d["imbalance/ratio"], color="black", marker="o" if len(d) < 30 else None, markersize=3
        )
        axes[1].axhline(1.0, color=GREY, linestyle="--", linewidth=0.8)
        if (d["imbalance/ratio"] > 0).all() and len(d):
            axes[1].set_yscale("log")
    _style(axes[1], "gradient imbalance |dL/dπ_w| : |dL/dπ_l|", "ratio (1 = balanced)")
    _save(fig, out / "margin_weights.png")
    return Figure(
        "margin_weights",
        "Margin weights and gradient imbalance",
        out / "margin_weights.png",
        "d_w and d_l scale the chosen and rejected gradients in every step (seed 000). The imbalance "
        "ratio is pi(y_l)/pi(y_w) for DPO (seed 004, Eq. 2): far below 1, the update is driven by the "
        "rejected response.",
    )


def _fig_loss(run: RunData, out: Path) -> Figure | None:
    tr, ev = run.metric_rows("train"), run.metric_rows("eval")
    if not (_col(tr, "loss") or _col(ev, "loss")):
        return None
    # `--loss normalized` trains on a surrogate whose value (about 0) is not a loss level and logs DPO's
    # loss beside it as loss/dpo (its eval loss is DPO's): drawing "loss" would set one against the other
    key = "loss/dpo" if (_col(tr, "loss/dpo") or _col(ev, "loss/dpo")) else "loss"
    fig, axes = _new_fig()
    _plot_metric(axes[0], tr, key, color=GREY, label="train")
    _plot_metric(axes[0], ev, key, color="black", label="eval")
    _style(axes[0], "DPO loss" if key == "loss/dpo" else "loss", key)
    axes[0].legend(fontsize=9)
    _save(fig, out / "loss.png")
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
    fig, axes = _new_fig(ncols=2, width=4.6)
    axes[0].scatter(t["score"], t["chosen_change"], s=12, alpha=0.6, color=CHOSEN)
    axes[0].axhline(0, color="black", linewidth=0.6)
    _style(
        axes[0], f"CHES vs chosen change (ρ = {ches.spearman_ches:+.2f})", "chosen Δ log-prob", "CHES score"
    )
    q = ches.by_quartile
    axes[1].bar(q["quartile"].astype(str), q["mean_chosen_change"], color=CHOSEN)
    axes[1].axhline(0, color="black", linewidth=0.6)
    _style(axes[1], "mean chosen change by CHES quartile", "chosen Δ log-prob", "CHES quartile (4 = highest)")
    _save(fig, out / "ches.png")
    return Figure(
        "ches",
        "CHES score vs observed change",
        out / "ches.png",
        "Seed 003, Sec. 5: pairs with a higher CHES score (similar hidden embeddings of chosen and "
        "rejected) are predicted to lose chosen likelihood under DPO.",
    )


# Section order in the report, each with what is needed when it is absent.
_SECTIONS: list[tuple[str, str, str]] = [
    ("logps", "Chosen and rejected log-probs", "metrics.jsonl has no logps/chosen or logps/rejected"),
    ("pair_trajectories", "Per-pair log-prob change", "pairs.parquet absent or has a single step"),
    (
        "frac_chosen_fell",
        "Likelihood displacement",
        "no pairs.parquet and no frac_chosen_fell in metrics.jsonl",
    ),
    ("margin_accuracy", "Margin and accuracy", "metrics.jsonl has no rewards/margins or rewards/accuracies"),
    (
        "entanglement",
        "Gradient entanglement",
        "no probe rows in metrics.jsonl and no probes.parquet, and no entanglement/* train metrics "
        "(train with --probe-every K, or --step-entanglement)",
    ),
    (
        "pred_vs_obs",
        "First-order prediction vs observed change",
        "probes.parquet has no pred_at_prev_*/obs_delta_* columns (they need two probes or more)",
    ),
    (
        "margin_weights",
        "Margin weights and gradient imbalance",
        "metrics.jsonl has no margin_weights/* or imbalance/ratio",
    ),
    (
        "ches",
        "CHES score vs observed change",
        "no CHES scores (run `preflens ches` on the training data and save them in the run dir as ches_scores.parquet)",
    ),
    ("loss", "Loss", "metrics.jsonl has no loss"),
]


def make_figures(run: RunData, plots_dir: Path, ches: Any = None) -> dict[str, Figure]:
    """Draw every figure the data allow into `plots_dir`; returns name -> Figure."""
    import matplotlib

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


# ----------------------------------------------------------------------------------------------
# HTML


_CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1100px;
margin:24px auto;padding:0 16px;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:0.2em} h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0} .diag{background:#fafafa;border:1px solid #ddd;border-radius:6px;padding:10px 16px}
.diag li{margin:4px 0} .warn{color:#b00020} .ok{color:#1b7f3b} .info{color:#333}
img{max-width:100%;height:auto;border:1px solid #eee} .cap{color:#555;font-size:0.92em}
.note{color:#777;font-style:italic} table{border-collapse:collapse;font-size:0.9em}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left} code{background:#f3f3f3;padding:0 3px}
"""


def _b64_png(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _config_table(config: dict[str, Any] | None) -> str:
    if not config:
        return ""
    rows = []
    for k, v in config.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        rows.append(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>")
    return "<h2>Configuration</h2><table>" + "".join(rows) + "</table>"


def render_html(
    title: str,
    findings: list[Finding],
    figs: dict[str, Figure],
    run: RunData | None = None,
    sections: list[tuple[str, str, str]] | None = None,
    extra_html: str = "",
) -> str:
    """One self-contained page: diagnosis, figures (base64 PNG) or a note per missing section."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    if run is not None:
        parts.append(f"<p class='sub'>run directory: <code>{esc(str(run.run_dir.resolve()))}</code></p>")
    parts.append("<div class='diag'><b>Diagnosis</b><ul>")
    for f in findings:
        parts.append(f"<li class='{esc(f.severity)}'>{esc(f.text)}</li>")
    parts.append("</ul></div>")
    parts.append(extra_html)
    for name, heading, missing in sections if sections is not None else _SECTIONS:
        parts.append(f"<h2>{esc(heading)}</h2>")
        fig = figs.get(name)
        if fig is None:
            parts.append(f"<p class='note'>Skipped: {esc(missing)}.</p>")
            continue
        parts.append(
            f"<img alt='{esc(fig.title)}' src='data:image/png;base64,{_b64_png(fig.path)}'>"
            f"<p class='cap'>{esc(fig.caption)}</p>"
        )
    if run is not None:
        parts.append(_config_table(run.config))
        if run.notes:
            parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in run.notes) + "</ul>")
    parts.append("<p class='sub'>generated by preflens report</p></body></html>")
    return "\n".join(parts)


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write RUN_DIR/plots/*.png and RUN_DIR/report.html (or `output`); returns the HTML path."""
    return generate_report(run_dir, output)[0]


def generate_report(run_dir: str | Path, output: str | Path | None = None) -> tuple[Path, list[Finding]]:
    """`write_report`, also returning the diagnosis (so the CLI prints what the page says)."""
    run = load_run(run_dir)
    ches = _ches_result(run)
    figs = make_figures(run, run.run_dir / "plots", ches=ches)
    findings = diagnose(run, ches=ches)
    title = "preflens report"
    if run.config and run.config.get("loss"):
        title += f": {run.config.get('loss')}"
    out = Path(output) if output is not None else run.run_dir / "report.html"
    out.write_text(render_html(title, findings, figs, run))
    return out, findings


def diagnosis_text(findings: list[Finding]) -> str:
    """The diagnosis as plain lines, for the terminal."""
    return "\n".join(f"- {f.text}" for f in findings)
