"""`preflens report RUN_DIR` end to end: read the run, draw its figures, write the diagnosis and the page."""

from __future__ import annotations

from pathlib import Path

from preflens.report.attribution import attribution_html
from preflens.report.figures import make_figures
from preflens.report.findings import Finding, diagnose
from preflens.report.html import render_html
from preflens.report.runs import ches_result, load_run

__all__ = ["generate_report", "write_report"]


def generate_report(run_dir: str | Path, output: str | Path | None = None) -> tuple[Path, list[Finding]]:
    """`write_report`, also returning the diagnosis (so the CLI prints what the page says)."""
    run = load_run(run_dir)
    ches = ches_result(run)
    figs = make_figures(run, run.run_dir / "plots", ches=ches)
    findings = diagnose(run, ches=ches)
    title = "preflens report"
    if run.config and run.config.get("loss"):
        title += f": {run.config.get('loss')}"
    out = Path(output) if output is not None else run.run_dir / "report.html"
    out.write_text(render_html(title, findings, figs, run, extra_html=attribution_html(run)))
    return out, findings


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write RUN_DIR/plots/*.png and RUN_DIR/report.html (or `output`); returns the HTML path."""
    return generate_report(run_dir, output)[0]
