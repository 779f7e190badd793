"""`preflens report RUN_DIR`: the run's dynamics as PNGs and one self-contained report.html.

What a user sees first after a run, so it leads with a short written diagnosis ("chosen fell in 61%
of eval pairs from step 40; condition 1 violated in 55% of probed pairs; try: ...") and then draws
the figures the papers draw (Yuan et al. 2024, arXiv 2410.13828; Razin et al. 2024, arXiv 2410.08847;
Ma et al. 2025, arXiv 2502.20847). The report reads whatever the run directory holds and replaces a
section whose data are absent by a note, so it works on a TRL run instrumented by
`preflens.integrations.trl` as well as on `preflens train`.

One module per step, in the order the data flow:

- `runs`: reading a run directory (`load_run` -> `RunData`) and the per-step numbers (`frac_chosen_fell_by_step`,
  `logps_series`, the CHES join);
- `findings`: the written diagnosis (`Finding`, `diagnose`, `diagnosis_text`);
- `figures`: the matplotlib PNGs (`make_figures`, and the drawing helpers `preflens compare` shares);
- `html`: the self-contained page (`render_html`);
- `generate`: all of it for one run (`generate_report`, `write_report`).
"""

from __future__ import annotations

from preflens.report.figures import CHOSEN, GREY, REJECTED, Figure, make_figures
from preflens.report.findings import Finding, diagnose, diagnosis_text, run_verdict
from preflens.report.generate import generate_report, write_report
from preflens.report.html import render_html
from preflens.report.runs import RunData, frac_chosen_fell_by_step, load_run, logps_series

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
    "run_verdict",
    "render_html",
    "frac_chosen_fell_by_step",
    "logps_series",
    "CHOSEN",
    "REJECTED",
    "GREY",
]
