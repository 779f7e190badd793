"""The self-contained report page: the diagnosis, then one section per figure (a base64 PNG, or a note
saying what the run lacks for it), the run's configuration and the reader's notes.

Images are embedded as base64 PNG and nothing is fetched from outside: the HTML is one file that can be
mailed or attached to a ticket. `render_html` also draws `preflens compare`'s page (its own sections).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from preflens.report.figures import Figure
from preflens.report.findings import Finding
from preflens.report.runs import CHES_SCORES_FILE, RunData
from preflens.tracking import METRICS_FILE, PAIRS_FILE, PROBES_FILE

__all__ = ["SECTIONS", "render_html"]

# Section order in the report, each with what is needed when it is absent.
SECTIONS: list[tuple[str, str, str]] = [
    ("logps", "Chosen and rejected log-probs", f"{METRICS_FILE} has no logps/chosen or logps/rejected"),
    ("pair_trajectories", "Per-pair log-prob change", f"{PAIRS_FILE} absent or has a single step"),
    (
        "frac_chosen_fell",
        "Likelihood displacement",
        f"no {PAIRS_FILE} and no frac_chosen_fell in {METRICS_FILE}",
    ),
    (
        "margin_accuracy",
        "Margin and accuracy",
        f"{METRICS_FILE} has no rewards/margins or rewards/accuracies",
    ),
    (
        "entanglement",
        "Gradient entanglement",
        f"no probe rows in {METRICS_FILE} and no {PROBES_FILE}, and no entanglement/* train metrics "
        "(train with --probe-every K, or --step-entanglement)",
    ),
    (
        "pred_vs_obs",
        "First-order prediction vs observed change",
        f"{PROBES_FILE} has no pred_at_prev_*/obs_delta_* columns (they need two probes or more)",
    ),
    (
        "margin_weights",
        "Margin weights and gradient imbalance",
        f"{METRICS_FILE} has no margin_weights/* or imbalance/ratio",
    ),
    (
        "ches",
        "CHES score vs observed change",
        f"no CHES scores (run `preflens ches` on the training data and save them in the run dir as {CHES_SCORES_FILE})",
    ),
    ("loss", "Loss", f"{METRICS_FILE} has no loss"),
]


_CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1100px;
margin:24px auto;padding:0 16px;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:0.2em} h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0} .diag{background:#fafafa;border:1px solid #ddd;border-radius:6px;padding:10px 16px}
.diag li{margin:4px 0} .bad{color:#b00020;font-weight:600} .risk{color:#a15c00} .ok{color:#1b7f3b} .info{color:#333}
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
    for name, heading, missing in sections if sections is not None else SECTIONS:
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
