"""The report's attribution section: which training pairs pushed the probe set's chosen log-probs down
(`preflens train --attribute-every K`, `diagnostics.attribution`), how concentrated that push is, and how
the attribution ranking agrees with CHES (Razin et al. 2024, arXiv 2410.08847, Sec. 5) where scored.

`attribution_html(run)` returns "" for a run without attribution.parquet, so the page is unchanged.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import pandas as pd

from preflens.diagnostics.attribution import (
    ATTRIBUTION_FILE,
    ATTRIBUTION_PAIRS_FILE,
    concentration,
    rank_agreement,
    summarize_rows,
)
from preflens.report.runs import RunData

__all__ = ["attribution_html", "attribution_summary"]

TOP = 10
TEXT_CHARS = 240


def _summary_table(run_dir: Path) -> pd.DataFrame | None:
    path = run_dir / ATTRIBUTION_PAIRS_FILE
    if path.is_file():
        return pd.read_parquet(path)
    rows_path = run_dir / ATTRIBUTION_FILE
    if rows_path.is_file():  # an interrupted run: the summary is rebuilt from the rows
        return pd.DataFrame(summarize_rows(pd.read_parquet(rows_path).to_dict("records")))
    return None


def _texts(run: RunData, ids: list[int]) -> dict[int, tuple[str, str, str]]:
    """(prompt, chosen, rejected) of the train pairs `ids`, read from the run's --data (empty if unreadable)."""
    cfg = run.config or {}
    if not cfg.get("data"):
        return {}
    try:
        from preflens.data.formats import load_pairs

        opts = {k: cfg[k] for k in ("prompt_field", "chosen_field", "rejected_field") if cfg.get(k)}
        pairs, _ = load_pairs(cfg["data"], split=cfg.get("data_split", "train"), on_invalid="drop", **opts)
    except Exception as exc:  # the data moved or changed: the ids are still shown
        run.notes.append(f"attribution: the training texts could not be read from {cfg['data']}: {exc}")
        return {}
    want = set(ids)

    def text(t: Any) -> str:
        if isinstance(t, list):
            return " | ".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in t)
        return str(t)

    return {p.pair_id: (text(p.prompt), text(p.chosen), text(p.rejected)) for p in pairs if p.pair_id in want}


def _ches(run: RunData) -> pd.Series | None:
    if run.ches_path is None:
        return None
    df = pd.read_parquet(run.ches_path)
    col = "ches" if "ches" in df.columns else ("score" if "score" in df.columns else None)
    if col is None or "pair_index" not in df.columns:
        return None
    return df.set_index("pair_index")[col]


def attribution_summary(run: RunData) -> dict[str, Any] | None:
    """The numbers of the section: top pushers, concentration, CHES agreement (None: no attribution)."""
    table = _summary_table(run.run_dir)
    if table is None or table.empty:
        return None
    table = table.sort_values(["total_chosen", "pair_id"], kind="stable")
    ches = _ches(run)
    out: dict[str, Any] = {
        "pairs": len(table),
        "frac_pushing_down": float((table["total_chosen"] < 0).mean()),
        "concentration": concentration(list(table["total_chosen"])),
        "top": table.head(TOP).to_dict("records"),
        "spearman_vs_ches": None,
        "top20_overlap_with_ches": None,
    }
    if ches is not None:
        both = table.join(ches.rename("ches"), on="pair_id", how="inner")
        out["spearman_vs_ches"] = rank_agreement(list(-both["total_chosen"]), list(both["ches"]))
        k = max(1, math.ceil(0.2 * len(both)))
        top_a = set(both.nsmallest(k, "total_chosen")["pair_id"])
        top_c = set(both.nlargest(k, "ches")["pair_id"])
        out["top20_overlap_with_ches"] = len(top_a & top_c) / k if len(both) else None
        for r in out["top"]:
            r["ches"] = float(ches.get(r["pair_id"], math.nan))
    return out


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def attribution_html(run: RunData) -> str:
    """The section's HTML ("" when the run has no attribution)."""
    s = attribution_summary(run)
    if s is None:
        return ""
    esc = html.escape
    conc = s["concentration"]
    texts = _texts(run, [int(r["pair_id"]) for r in s["top"]])
    parts = [
        "<h2>Which training pairs pushed the chosen responses down (in-run attribution)</h2>",
        "<p class='cap'>First-order effect of each training pair's loss gradient on the probe set's chosen "
        "log-probs, -lr &lt;grad l_i, grad log pi(y_w,j)&gt;, summed over the probe pairs and the steps the "
        "pair was attributed in (Wang et al. 2024, arXiv 2406.11011, Sec. 4; likelihood displacement: "
        "Razin et al. 2024, arXiv 2410.08847). Negative: the pair pushed the probes' chosen down.</p>",
        f"<p>{s['frac_pushing_down']:.0%} of {s['pairs']} attributed training pairs pushed the probes' chosen "
        f"log-probs down in total. The top 5% of pairs account for {_fmt(conc.get(0.05))} and the top 20% "
        f"for {_fmt(conc.get(0.2))} of the total downward push.",
    ]
    if s["spearman_vs_ches"] is not None:
        parts.append(
            f" Rank agreement with CHES: Spearman {_fmt(s['spearman_vs_ches'])}; "
            f"{_fmt(s['top20_overlap_with_ches'])} of the top 20% by attribution are in CHES's top 20%."
        )
    parts.append("</p><table><tr><th>pair</th><th>total effect on chosen</th><th>seen</th><th>mean</th>"
                 "<th>cosine(g_w, g_l)</th><th>CHES</th><th>prompt / chosen / rejected</th></tr>")  # fmt: skip
    for r in s["top"]:
        pid = int(r["pair_id"])
        p, c, j = texts.get(pid, ("", "", ""))
        cell = "<br>".join(
            f"<b>{name}</b> {esc(t[:TEXT_CHARS])}{'…' if len(t) > TEXT_CHARS else ''}"
            for name, t in (("prompt", p), ("chosen", c), ("rejected", j))
            if t
        )
        parts.append(
            f"<tr><td>{pid}</td><td>{_fmt(float(r['total_chosen']))}</td><td>{int(r['seen'])}</td>"
            f"<td>{_fmt(float(r['mean_chosen']))}</td><td>{_fmt(r.get('mean_cosine'))}</td>"
            f"<td>{_fmt(r.get('ches'))}</td><td>{cell}</td></tr>"
        )
    parts.append("</table>")
    return "\n".join(parts)
