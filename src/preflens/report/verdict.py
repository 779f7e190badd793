"""One verdict per run: healthy, or which failure, how large, since when, and what to try given *this*
run's numbers.

The evidence (`Evidence`) is read once from the run directory and every line of the diagnosis is written
from it, so the lines cannot disagree with each other or with the data. The failures, in the order they
are checked:

- **displaced** (Razin et al. 2024, arXiv 2410.08847, Sec. 1): the chosen log-prob ended more than the
  trainer's noise tolerance below its first measurement in most tracked pairs;
- **stuck**: the margin (chosen minus rejected log-prob) hardly moved and the loss did not fall;
- **entangled** (Yuan et al. 2024, arXiv 2410.13828, Fig. 1): chosen and rejected rose together, so
  the rejected response became more likely while the margin grew.

Colours (`Finding.severity`): "bad" (red) is a failure that happened in this run; "risk" (amber) is a sign
that one may come (e.g. a third of the pairs displaced, or the probes' first-order conditions violated
in many pairs with nothing fallen yet); "ok" (green) is healthy; "info" is context: quantities inherent
to the loss (DPO's gradient imbalance ratio, which is pi_l / pi_w and so tiny in any run whose responses
differ by tens of nats), how CHES ranks the pairs, how well the first-order picture held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from preflens.diagnostics.update_prediction import prediction_agreement
from preflens.report.papers import MA, RAZIN, YUAN
from preflens.report.runs import RunData, find_column, frac_chosen_fell_by_step

__all__ = [
    "Evidence",
    "Verdict",
    "gather_evidence",
    "decide",
    "DISPLACED_SHARE",
    "RISK_SHARE",
    "STUCK_MARGIN",
]

DISPLACED_SHARE = 0.5  # "most pairs": above this share of pairs fell, the run displaced likelihood
RISK_SHARE = 0.25  # above this share (but not most), a risk
STUCK_MARGIN = 0.1  # nats: a mean margin gain below this is no learning
CONDITION_SHARE = 0.25  # share of probed pairs violating a first-order condition that is worth a line


@dataclass
class Evidence:
    """The numbers a verdict is decided from (None where the run directory lacks them)."""

    where: str = ""  # "eval pairs (n=16)", ...
    n_steps: int | None = None
    frac_fell: float | None = None  # share of tracked pairs whose chosen fell by more than `tol`
    fell_since: int | None = None  # first step from which more than half stayed fallen
    last_step: int | None = None
    tol: float = 1e-4
    d_chosen: float | None = None  # mean change of chosen / rejected log-prob, first -> last measurement
    d_rejected: float | None = None
    rejected_rose_since: int | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    loss_name: str | None = None
    cond1: float | None = None  # share of probed pairs violating Yuan et al.'s condition 1 / 2
    cond2: float | None = None
    cosine: float | None = None
    cond_where: str = "probed pairs"  # or "training batches" (--step-entanglement)
    imbalance: float | None = None  # median |dL/dpi_w| : |dL/dpi_l|
    ches_rho: float | None = None  # Spearman(CHES, chosen change)
    update_sign_agreement: float | None = None  # optimizer-aware first-order prediction vs observed
    update_corr: float | None = None
    update_n: int = 0


@dataclass
class Verdict:
    """What the report opens with."""

    status: str  # "healthy" | "displaced" | "stuck" | "entangled" | "unknown"
    severity: str  # "bad" | "risk" | "ok" | "info"
    headline: str
    tries: list[str] = field(default_factory=list)
    # the tries as something to run, in the same order: a loss name ("rpo", "normalized") or "ches"
    # (DPO on the CHES-filtered data); what `preflens demo` trains as the mitigation
    remedies: list[str] = field(default_factory=list)
    context: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, severity, text)

    @property
    def label(self) -> str:
        return {"displaced": "likelihood displacement"}.get(self.status, self.status)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _first_step_stays(steps: Any, ok: Any) -> int | None:
    """The first step from which `ok` holds to the end, or None."""
    first = None
    for s, v in zip(list(steps), list(ok)):
        if v:
            first = s if first is None else first
        else:
            first = None
    return int(first) if first is not None else None


def _displacement_evidence(run: RunData, ev: Evidence) -> None:
    ev.tol = run.fell_tol()
    if run.pairs is not None:
        for s in ("eval", "train", "probe"):
            sub = run.pairs[run.pairs["split"] == s].sort_values(["pair_id", "step"], kind="stable")
            if sub["step"].nunique() < 2:
                continue
            fr = frac_chosen_fell_by_step(run.pairs, s, ev.tol)
            ev.frac_fell, ev.last_step = float(fr["frac"].iloc[-1]), int(fr["step"].iloc[-1])
            ev.fell_since = _first_step_stays(fr["step"], fr["frac"] > DISPLACED_SHARE)
            ev.where = f"{s} pairs (n={int(fr['n'].iloc[-1])})"
            g = sub.groupby("pair_id")
            dc = sub["chosen"] - g["chosen"].transform("first")
            dr = sub["rejected"] - g["rejected"].transform("first")
            per = sub.assign(dc=dc, dr=dr).groupby("step")
            ev.d_chosen, ev.d_rejected = float(per["dc"].mean().iloc[-1]), float(per["dr"].mean().iloc[-1])
            ev.rejected_rose_since = _first_step_stays(per["dr"].mean().index, per["dr"].mean() > ev.tol)
            return
    m = run.metric_rows("eval")
    c = find_column(m, "frac_chosen_fell")
    if c is not None:
        m = m[m[c].notna()]
        ev.frac_fell, ev.last_step, ev.where = float(m[c].iloc[-1]), int(m["step"].iloc[-1]), "eval batches"
        ev.fell_since = _first_step_stays(m["step"], m[c] > DISPLACED_SHARE)
    for s in ("eval", "train"):
        m = run.metric_rows(s)
        if find_column(m, "logps/chosen") and find_column(m, "logps/rejected"):
            m = m[m["logps/chosen"].notna() & m["logps/rejected"].notna()]
            if len(m) > 1:
                ev.d_chosen = float(m["logps/chosen"].iloc[-1] - m["logps/chosen"].iloc[0])
                ev.d_rejected = float(m["logps/rejected"].iloc[-1] - m["logps/rejected"].iloc[0])
                ev.where = ev.where or f"{s} batches"
                return


def _probe_evidence(run: RunData, ev: Evidence) -> None:
    p = run.probes
    if p is not None:
        k1 = find_column(p, "cond1_violated", "cond1_violation")
        k2 = find_column(p, "cond2_violated", "cond2_violation")
        kc = find_column(p, "cosine", "cos")
        ev.cond1 = float(p[k1].astype(float).mean()) if k1 else None
        ev.cond2 = float(p[k2].astype(float).mean()) if k2 else None
        ev.cosine = float(p[kc].mean()) if kc else None
        if find_column(p, "update_pred_chosen") and find_column(p, "update_obs_chosen"):
            agree = prediction_agreement(p, tol=ev.tol)
            ev.update_sign_agreement, ev.update_corr, ev.update_n = agree
        return
    probe = run.metric_rows("probe")
    train = run.metric_rows("train")
    for attr, keys in (
        ("cond1", ("probe/frac_cond1_violated", "entanglement/frac_cond1_violated")),
        ("cond2", ("probe/frac_cond2_violated", "entanglement/frac_cond2_violated")),
        ("cosine", ("probe/cosine", "entanglement/cosine")),
    ):
        for df, k, where in ((probe, keys[0], "probed pairs"), (train, keys[1], "training batches")):
            if find_column(df, k):
                setattr(ev, attr, float(df[k].mean()))
                ev.cond_where = where
                break


def gather_evidence(run: RunData, ches: Any = None) -> Evidence:
    """Every number the verdict and the diagnosis lines use, read once from the run."""
    ev = Evidence()
    _displacement_evidence(run, ev)
    _probe_evidence(run, ev)
    tr = run.metric_rows("train")
    if find_column(tr, "loss"):
        losses = tr["loss"].dropna()
        k = max(1, min(3, len(losses) // 4))  # a few steps at each end: batch noise is not a trend
        ev.loss_first, ev.loss_last = float(losses.iloc[:k].mean()), float(losses.iloc[-k:].mean())
        ev.n_steps = int(tr["step"].max())
    if find_column(tr, "grad_norm"):
        ev.grad_norm = float(tr["grad_norm"].dropna().median())
    if find_column(tr, "imbalance/ratio"):
        ev.imbalance = float(tr["imbalance/ratio"].dropna().median())
    cfg = run.config or {}
    ev.lr = _num(cfg.get("lr"))
    ev.loss_name = cfg.get("loss")
    if ches is not None and not math.isnan(ches.spearman_ches):
        ev.ches_rho = float(ches.spearman_ches)
    return ev


def _num(x: Any) -> float | None:
    """A config number (YAML 1.1 reads "1e-05" as a string)."""
    try:
        return float(x) if x is not None else None
    except (TypeError, ValueError):
        return None


def _margin_gain(ev: Evidence) -> float | None:
    if ev.d_chosen is None or ev.d_rejected is None:
        return None
    return ev.d_chosen - ev.d_rejected


def _is_stuck(ev: Evidence) -> bool:
    gain = _margin_gain(ev)
    if gain is None or abs(gain) >= STUCK_MARGIN:
        return False
    if ev.loss_first is not None and ev.loss_last is not None:
        return ev.loss_last > ev.loss_first - 0.02 * abs(ev.loss_first)
    return True


def _displaced_tries(ev: Evidence) -> list[str]:
    tries = [
        f"rpo (DPO + an SFT term on the chosen response, which pushes its log-prob up directly): here the "
        f"chosen log-prob fell in {_pct(ev.frac_fell or 0)} of {ev.where}, by {ev.d_chosen:+.2f} nats on average"
    ]
    if ev.ches_rho is not None and ev.ches_rho < -0.2:
        tries.append(
            f"CHES filtering (`preflens ches --drop-top 0.1`, {RAZIN}, Sec. 5): in this run the "
            f"high-CHES pairs lost the most chosen likelihood (Spearman(CHES, chosen change) = {ev.ches_rho:+.2f})"
        )
    elif ev.cond1 is not None and ev.cond1 > CONDITION_SHARE:
        tries.append(
            f"normalized ({YUAN}, Sec. 5.1): condition 1 (chosen rises) was violated in {_pct(ev.cond1)} "
            f"of {ev.cond_where}"
        )
    return tries[:2]


def _remedy(text: str) -> str:
    """The runnable name of a try line ("CHES filtering ..." -> "ches", "rpo (...)" -> "rpo")."""
    return "ches" if text.startswith("CHES") else text.split(" ", 1)[0]


def _since(step: int | None) -> str:
    return f", since step {step}" if step is not None else ""


def decide(ev: Evidence) -> Verdict:
    """The verdict from the evidence (see the module docstring for the rules)."""
    v = _decide(ev)
    v.remedies = [_remedy(t) for t in v.tries if not t.startswith(("a larger", "check"))]
    return v


def _decide(ev: Evidence) -> Verdict:
    fell, dc, dr = ev.frac_fell, ev.d_chosen, ev.d_rejected
    if fell is None and dc is None:
        return Verdict("unknown", "info", "no per-pair log-probs or log-prob metrics: nothing to decide from")
    if fell is not None and fell > DISPLACED_SHARE:
        moved = f" (mean {dc:+.2f} nats; rejected {dr:+.2f})" if dc is not None and dr is not None else ""
        return Verdict(
            "displaced",
            "bad",
            f"likelihood displacement: the chosen log-prob fell by more than {ev.tol:g} nats in {_pct(fell)} of "
            f"{ev.where} by step {ev.last_step}{moved}{_since(ev.fell_since)}",
            _displaced_tries(ev),
        )
    if _is_stuck(ev):
        gain = _margin_gain(ev)
        loss = (
            f", loss {ev.loss_first:.3f} -> {ev.loss_last:.3f}"
            if ev.loss_first is not None and ev.loss_last
            else ""
        )
        tries = [f"a larger learning rate (this run: lr {ev.lr:g})" if ev.lr else "a larger learning rate"]
        if ev.grad_norm is not None and ev.grad_norm < 1e-8:
            tries = [f"check that parameters are trainable: median gradient norm {ev.grad_norm:.1e}"]
        return Verdict(
            "stuck",
            "bad",
            f"stuck: the margin moved {gain:+.3f} nats over {ev.where}{loss}: the preference was not learned"
            + (
                f"; the chosen log-prob fell by more than {ev.tol:g} nats in {_pct(fell)} of them"
                if fell is not None
                else ""
            ),
            tries,
        )
    if dc is not None and dr is not None and dc > ev.tol and dr > ev.tol:
        tries = [
            f"normalized ({YUAN}, Sec. 5.1): each pair's gradients normalized so, to first order, the rejected "
            f"log-prob falls; here it rose {dr:+.2f} nats"
            + (f" with a mean gradient cosine of {ev.cosine:.2f}" if ev.cosine is not None else "")
        ]
        return Verdict(
            "entangled",
            "bad",
            f"entangled: chosen and rejected rose together (chosen {dc:+.2f}, rejected {dr:+.2f} nats, {ev.where})"
            f"{_since(ev.rejected_rose_since)}: the rejected response became more likely",
            tries,
        )
    gain = _margin_gain(ev)
    parts = []
    if fell is not None:
        parts.append(f"the chosen log-prob fell by more than {ev.tol:g} nats in {_pct(fell)} of {ev.where}")
    if dc is not None and dr is not None:
        parts.append(f"chosen {dc:+.2f}, rejected {dr:+.2f} nats on average (margin {gain:+.2f})")
    sev = "risk" if fell is not None and fell > RISK_SHARE else "ok"
    head = ("healthy" if sev == "ok" else "healthy so far, at risk") + ": " + "; ".join(parts)
    return Verdict("healthy", sev, head)


def context_lines(ev: Evidence, v: Verdict) -> list[tuple[str, str, str]]:
    """The diagnosis lines after the verdict, as (kind, severity, text): the paper's SGD-form conditions
    ("entanglement"), the optimizer-aware first-order check ("first_order"), "ches", "imbalance"."""
    out: list[tuple[str, str, str]] = []
    if ev.cond1 is not None or ev.cond2 is not None or ev.cosine is not None:
        parts = []
        if ev.cond1 is not None:
            parts.append(f"condition 1 (chosen rises) violated in {_pct(ev.cond1)} of {ev.cond_where}")
        if ev.cond2 is not None:
            parts.append(f"condition 2 (rejected falls) in {_pct(ev.cond2)}")
        if ev.cosine is not None:
            parts.append(f"mean gradient cosine {ev.cosine:.2f}")
        violated = max(ev.cond1 or 0, ev.cond2 or 0) > CONDITION_SHARE
        sev = "risk" if violated and v.status == "healthy" else "info"
        out.append(
            ("entanglement", sev, f"the paper's SGD-form conditions ({YUAN}, Sec. 3): " + "; ".join(parts))
        )
    if ev.update_sign_agreement is not None:
        corr = f", correlation {ev.update_corr:+.2f}" if ev.update_corr is not None else ""
        held = "held" if ev.update_sign_agreement >= 0.8 else "held only partly"
        out.append(
            (
                "first_order",
                "info",
                f"first-order picture for the optimizer's own updates {held}: the predicted change of the probed "
                f"log-probs (<grad, parameter update>) had the observed sign in {_pct(ev.update_sign_agreement)} of "
                f"{ev.update_n} probed log-probs{corr}",
            )
        )
    if ev.ches_rho is not None:
        rho = ev.ches_rho
        if abs(rho) < 0.2:
            how = "does not rank the pairs' chosen change (|rho| < 0.2)"
        elif v.status == "displaced":
            how = (
                "higher-CHES pairs lost more" if rho < 0 else "higher-CHES pairs lost less, against the paper"
            )
        else:
            how = "higher-CHES pairs gained least" if rho < 0 else "higher-CHES pairs gained most"
        out.append(
            ("ches", "info", f"CHES ({RAZIN}, Sec. 5): Spearman(CHES, chosen change) = {rho:+.2f}: {how}")
        )
    if ev.imbalance is not None:
        out.append(
            (
                "imbalance",
                "info",
                f"gradient imbalance |dL/dpi_w| : |dL/dpi_l|, median {ev.imbalance:.2g} ({MA}, Eq. 2): for DPO this "
                "is pi_l / pi_w, tiny whenever the responses' likelihoods differ; context, not a failure",
            )
        )
    return out
