"""User journeys through the diagnostics commands: what a user hits that the unit tests did not.

Each test reproduces one defect found in a QA pass (the command line in its docstring) on the tiny
random model, so the default run stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_report_shows_step_entanglement_without_probes(tmp_path: Path) -> None:
    """`preflens train --step-entanglement` (no --probe-every) then `preflens report RUN`.

    The train rows carry `entanglement/cosine` and `entanglement/frac_cond{1,2}_violated`; the report
    used to read only probe rows and said "no probe rows ... (train with probes on)".
    """
    from preflens.report import generate_report

    run = tmp_path / "run"
    run.mkdir()
    rows = []
    cond1 = [0.0, 0.5, 1.0, 0.5]
    for step in range(1, 5):
        rows.append(
            {
                "step": step,
                "split": "train",
                "loss": 0.69,
                "logps/chosen": -50.0 - step,
                "logps/rejected": -50.0 - 2 * step,
                "entanglement/cosine": 0.8,
                "entanglement/inner": 10.0,
                "entanglement/frac_cond1_violated": cond1[step - 1],
                "entanglement/frac_cond2_violated": 0.0,
            }
        )
    _write_jsonl(run / "metrics.jsonl", rows)
    out, findings = generate_report(run)
    page = out.read_text()
    assert (run / "plots" / "entanglement.png").exists()
    assert "no probe rows in metrics.jsonl" not in page
    text = " ".join(f.text for f in findings if f.kind == "entanglement")
    # means over the steps, written out: cond1 (0 + .5 + 1 + .5) / 4 = 50%, cosine 0.80
    assert "condition 1 (chosen rises) violated in 50%" in text
    assert "0.80" in text
    assert "training batch" in text  # says where the numbers come from
