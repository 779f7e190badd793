"""The written diagnosis at the top of the report: the run's verdict first, then what to try (each backed
by this run's number), then the context lines (`preflens.report.verdict` decides all of them from one
`Evidence`, so they agree with each other and with the data).

- likelihood displacement (Razin et al. 2024, arXiv 2410.08847, Sec. 1): the share of pairs whose
  chosen log-prob fell below its first measurement by more than the trainer's noise tolerance;
- synchronized movement and gradient entanglement (Yuan et al. 2024, arXiv 2410.13828, Fig. 1 and
  Sec. 3): chosen and rejected moving the same way; the paper's SGD-form conditions 1 and 2;
- gradient imbalance (Ma et al. 2025, arXiv 2502.20847, Eq. 2): |dL/dpi_w| : |dL/dpi_l|, as context;
- CHES (Razin et al. 2024, arXiv 2410.08847, Sec. 5): whether the score ranks the pairs' chosen change.

Severities: "bad" (red, a failure in this run), "risk" (amber), "ok" (green, healthy), "info" (context).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from preflens.report.runs import RunData
from preflens.report.verdict import Verdict, context_lines, decide, gather_evidence

__all__ = ["Finding", "diagnose", "diagnosis_text", "run_verdict", "SEVERITIES"]

SEVERITIES = ("bad", "risk", "ok", "info")


@dataclass
class Finding:
    """One line of the written diagnosis."""

    kind: str  # "verdict", "try", "entanglement", "first_order", "ches", "imbalance", "compare"
    text: str
    severity: str = "info"  # "bad" | "risk" | "ok" | "info"


def run_verdict(run: RunData, ches: Any = None) -> Verdict:
    """The run's verdict with its mitigations and context lines."""
    ev = gather_evidence(run, ches)
    v = decide(ev)
    v.context = context_lines(ev, v)
    return v


def verdict_findings(v: Verdict) -> list[Finding]:
    out = [Finding("verdict", f"verdict: {v.headline}", v.severity)]
    if v.tries:
        out.append(Finding("try", "try: " + "; ".join(v.tries), "info"))
    out += [Finding(kind, text, sev) for kind, sev, text in v.context]
    return out


def diagnose(run: RunData, ches: Any = None) -> list[Finding]:
    """The written diagnosis: the verdict, what to try, then the context lines."""
    return verdict_findings(run_verdict(run, ches))


def diagnosis_text(findings: list[Finding]) -> str:
    """The diagnosis as plain lines, for the terminal."""
    return "\n".join(f"- {f.text}" for f in findings)
