"""The written diagnosis at the top of the report: one `Finding` per failure mode the run's data can
speak to, then what to try.

- likelihood displacement (Razin et al. 2024, arXiv 2410.08847, Sec. 1): the share of pairs whose
  chosen log-prob fell below its first measurement;
- synchronized movement and gradient entanglement (Yuan et al. 2024, arXiv 2410.13828, Fig. 1 and
  Sec. 3): chosen and rejected moving the same way; conditions 1 and 2 and the gradient cosine;
- gradient imbalance (Ma et al. 2025, arXiv 2502.20847, Eq. 2): |dL/dpi_w| : |dL/dpi_l|;
- CHES (Razin et al. 2024, arXiv 2410.08847, Sec. 5): does the score order the chosen change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from preflens.report.papers import MA, RAZIN, YUAN
from preflens.report.runs import RunData, find_column, frac_chosen_fell_by_step, mean_trajectory

__all__ = ["Finding", "diagnose", "diagnosis_text"]


@dataclass
class Finding:
    """One line of the written diagnosis."""

    kind: str  # "displacement", "entanglement", "synchronized", "imbalance", "ches", "ok", "info"
    text: str
    severity: str = "warn"  # "warn" | "ok" | "info"


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
        c = find_column(ev, "frac_chosen_fell")
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


def _mean_changes(run: RunData) -> tuple[float | None, float | None, str]:
    """(mean chosen change, mean rejected change, over what) from first to last measurement: per-pair
    means of pairs.parquet when it has several steps, else the batch means of metrics.jsonl."""
    if run.pairs is not None:
        for s in ("eval", "train"):
            sub = run.pairs[run.pairs["split"] == s]
            if sub["step"].nunique() > 1:
                dc = mean_trajectory(run.pairs, s, "chosen").iloc[-1]
                dr = mean_trajectory(run.pairs, s, "rejected").iloc[-1]
                return dc, dr, f"{s} pairs"
    for s in ("eval", "train"):
        m = run.metric_rows(s)
        if find_column(m, "logps/chosen") and find_column(m, "logps/rejected"):
            m = m[m["logps/chosen"].notna() & m["logps/rejected"].notna()]
            if len(m) > 1:
                dc = float(m["logps/chosen"].iloc[-1] - m["logps/chosen"].iloc[0])
                dr = float(m["logps/rejected"].iloc[-1] - m["logps/rejected"].iloc[0])
                return dc, dr, f"{s} batches"
    return None, None, ""


def _synchronized_findings(run: RunData) -> list[Finding]:
    """Yuan et al. 2024 (arXiv 2410.13828), Fig. 1: chosen and rejected moving in the same direction."""
    dc, dr, where = _mean_changes(run)
    if dc is None:
        return []
    dc, dr = float(dc), float(dr)
    if dc < 0 and dr < 0:
        return [
            Finding(
                "synchronized",
                f"synchronized decrease: mean chosen log-prob {dc:+.2f}, rejected {dr:+.2f} nats ({where}); "
                f"the margin grew by pushing both down (gradient entanglement, {YUAN})",
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


def _entanglement_numbers(run: RunData) -> tuple[float | None, float | None, float | None, str]:
    """(share violating condition 1, condition 2, mean cosine, over what): probes.parquet first, then
    the probe rows of metrics.jsonl, then the per-step statistics of the training batches."""
    c1 = c2 = cos = None
    if run.probes is not None:
        p = run.probes
        k1 = find_column(p, "cond1_violated", "cond1_violation")
        k2 = find_column(p, "cond2_violated", "cond2_violation")
        kc = find_column(p, "cosine", "cos")
        if k1:
            c1 = float(p[k1].astype(float).mean())
        if k2:
            c2 = float(p[k2].astype(float).mean())
        if kc:
            cos = float(p[kc].mean())
    probe = run.metric_rows("probe")
    if c1 is None and find_column(probe, "probe/frac_cond1_violated"):
        c1 = float(probe["probe/frac_cond1_violated"].mean())
    if c2 is None and find_column(probe, "probe/frac_cond2_violated"):
        c2 = float(probe["probe/frac_cond2_violated"].mean())
    if cos is None and find_column(probe, "probe/cosine"):
        cos = float(probe["probe/cosine"].mean())
    if c1 is not None or c2 is not None or cos is not None:
        return c1, c2, cos, "of probed pairs"
    # --step-entanglement alone: the per-step statistics of the training batches (train rows)
    train = run.metric_rows("train")
    vals = {
        k: float(train[k].mean())
        for k in (
            "entanglement/frac_cond1_violated",
            "entanglement/frac_cond2_violated",
            "entanglement/cosine",
        )
        if find_column(train, k) and train[k].notna().any()
    }
    return (
        vals.get("entanglement/frac_cond1_violated"),
        vals.get("entanglement/frac_cond2_violated"),
        vals.get("entanglement/cosine"),
        "of training batch pairs (per step, mean over steps)",
    )


def _entanglement_findings(run: RunData) -> list[Finding]:
    c1, c2, cos, where = _entanglement_numbers(run)
    if c1 is None and c2 is None and cos is None:
        return []
    parts = []
    if c1 is not None:
        parts.append(f"condition 1 (chosen rises) violated in {_pct(c1)} {where}")
    if c2 is not None:
        parts.append(f"condition 2 (rejected falls) in {_pct(c2)}")
    if cos is not None:
        parts.append(f"mean gradient cosine {cos:.2f}")
    bad = (c1 is not None and c1 > 0.25) or (c2 is not None and c2 > 0.25) or (cos is not None and cos > 0.5)
    return [Finding("entanglement", "entanglement: " + "; ".join(parts), "warn" if bad else "ok")]


def _imbalance_findings(run: RunData) -> list[Finding]:
    m = run.metric_rows("train")
    k = find_column(m, "imbalance/ratio")
    if k is None:
        return []
    r = m[k].dropna()
    med = float(r.median())
    # the ratio |dL/dpi_w| : |dL/dpi_l| = pi_l / pi_w for DPO (Ma et al. 2025, Eq. 2): below 1 means the
    # rejected response gets the larger push
    if med < 0.5 or med > 2.0:
        return [
            Finding(
                "imbalance",
                f"gradient imbalance: median |dL/dpi_w| : |dL/dpi_l| = {med:.2g} (balanced is 1; {MA}, Eq. 2)",
            )
        ]
    return [Finding("imbalance", f"gradient imbalance ratio median {med:.2g} (balanced is 1)", "ok")]


def _ches_findings(ches: Any) -> list[Finding]:
    if ches is None or math.isnan(ches.spearman_ches):
        return []
    rho = ches.spearman_ches
    return [
        Finding(
            "ches",
            f"CHES predicts displacement: Spearman(CHES, chosen change) = {rho:+.2f} "
            f"(negative: high-CHES pairs lose chosen likelihood, {RAZIN}, Sec. 5)",
            "warn" if rho < -0.2 else "info",
        )
    ]


def _what_to_try(findings: list[Finding]) -> list[Finding]:
    """The mitigations the papers propose for the failure modes found (one line, or none)."""
    kinds = {f.kind for f in findings if f.severity == "warn"}
    tries: list[str] = []
    if kinds & {"displacement", "synchronized", "entanglement"}:
        tries += [f"normalized ({YUAN}, Sec. 5.1)", f"sparse ({YUAN}, Sec. 5.2)"]
    if kinds & {"displacement", "imbalance"}:
        tries += [f"bdpo ({MA}, Sec. 5)"]
    if "displacement" in kinds or "ches" in kinds:
        tries += [f"CHES filtering: `preflens ches --drop-top 0.1` ({RAZIN}, Sec. 5)", "rpo (DPO + SFT term)"]
    if not tries:
        return []
    return [Finding("try", "try: " + ", ".join(dict.fromkeys(tries)), "info")]


def diagnose(run: RunData, ches: Any = None) -> list[Finding]:
    """The written diagnosis: one finding per failure mode the data can speak to, then what to try."""
    findings = (
        _displacement_findings(run)
        + _synchronized_findings(run)
        + _entanglement_findings(run)
        + _imbalance_findings(run)
        + _ches_findings(ches)
    )
    findings += _what_to_try(findings)
    if not findings:
        findings.append(
            Finding("info", "no per-pair or probe data to diagnose from; see the plots below", "info")
        )
    return findings


def diagnosis_text(findings: list[Finding]) -> str:
    """The diagnosis as plain lines, for the terminal."""
    return "\n".join(f"- {f.text}" for f in findings)
