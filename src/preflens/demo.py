"""`preflens demo`: a preference run that fails, the diagnosis of why, and the fix, on the embedded model,
offline, on a CPU, in minutes.

What a new user sees first (DESIGN.md, "Who uses it"), in the order an alignment engineer would work:

1. write the data: single-turn pairs of Anthropic's HH-RLHF harmless-base test split (bundled as
   `preflens/resources/hh_demo_pairs.jsonl`, MIT licence in `resources/LICENSE-hh-rlhf`), each pair's
   chosen reply against, as rejected, the same reply said twice (a degenerate, repetitive answer). Every
   rejected token is a chosen token and the model is already confident in both: the set-up in which
   likelihood displacement happens (shared tokens, Yuan et al. 2024, arXiv 2410.13828, Sec. 4; similar
   hidden embeddings, high CHES, Razin et al. 2024, arXiv 2410.08847, Sec. 5 and 6). EXPERIMENTS.md
   ("The demo's setting") records the search that chose it;
2. score the train pairs with CHES (`preflens.diagnostics.ches_scan.run_ches`) and write a copy without the
   highest-scoring quarter;
3. train DPO with LoRA on the embedded SmolLM2-135M-Instruct with probes (the paper's SGD-form entanglement
   conditions and the first-order prediction of the optimizer's own update) and read its verdict;
4. train, from the same start, the mitigation that verdict recommends first (`mitigation="auto"`; rpo when
   DPO displaced likelihood), or the one asked for;
5. write each run's report and one comparison page, print both verdicts and where the page is.

`quick=True` shrinks every budget (for tests); `model=` swaps the embedded model for any local model
directory (tests use a tiny one).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console

from preflens.compare import compare_runs
from preflens.diagnostics.ches_scan import run_ches
from preflens.errors import PreflensError
from preflens.models import load_model
from preflens.report import Finding, generate_report, load_run, run_verdict
from preflens.report.papers import RAZIN
from preflens.report.runs import CHES_SCORES_FILE, ches_result, frac_chosen_fell_by_step
from preflens.train import TrainConfig, train

__all__ = ["DemoBudget", "MITIGATIONS", "run_demo", "demo_data", "hh_demo_rows", "repeated_pairs"]

MITIGATIONS = ("auto", "rpo", "ches", "normalized", "bdpo", "dpop")
HH_DEMO_PAIRS = "hh_demo_pairs.jsonl"


@dataclass(frozen=True)
class DemoBudget:
    """How much the demo does (EXPERIMENTS.md, "The demo's setting", measured these)."""

    train_pairs: int = 16
    eval_pairs: int = 12
    steps: int = 12
    batch_size: int = 4
    lr: float = 1e-3
    lora_rank: int = 8
    eval_every: int = 6
    probe_every: int = 6
    probe_pairs: int = 4
    pairs_train_subset: int = 16
    max_length: int = 80
    ches_drop: float = 0.25


QUICK = DemoBudget(
    train_pairs=6,
    eval_pairs=4,
    steps=2,
    batch_size=2,
    eval_every=1,
    probe_every=1,
    probe_pairs=2,
    max_length=64,
)


def hh_demo_rows() -> list[dict[str, str]]:
    """The bundled HH-RLHF pairs (prompt, chosen, rejected; MIT licence, resources/LICENSE-hh-rlhf)."""
    text = resources.files("preflens.resources").joinpath(HH_DEMO_PAIRS).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def repeated_pairs(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Each pair's chosen reply against the same reply said twice: the rejected response contains every
    token of the chosen one (the HH rejected reply is not used)."""
    return [
        {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["chosen"] + r["chosen"]} for r in rows
    ]


def demo_data(out: Path, budget: DemoBudget) -> tuple[Path, Path]:
    """Write data/train.jsonl (the first `train_pairs` bundled HH pairs) and data/eval.jsonl (the next
    `eval_pairs`), each as `repeated_pairs`."""
    rows = repeated_pairs(hh_demo_rows())
    if budget.train_pairs + budget.eval_pairs > len(rows):
        raise PreflensError(f"demo: {len(rows)} bundled pairs, the budget asks for more")
    d = out / "data"
    d.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = d / "train.jsonl", d / "eval.jsonl"
    tr, ev = rows[: budget.train_pairs], rows[budget.train_pairs : budget.train_pairs + budget.eval_pairs]
    train_path.write_text("".join(json.dumps(r) + "\n" for r in tr))
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
    mitigation: str = "auto",
    model: str | None = None,
    budget: DemoBudget | None = None,
    progress: bool = True,
) -> Path:
    """Run the demo into `output_dir` (default runs/demo-<timestamp>; an existing non-empty directory
    is refused) and return the path of its top-level report.html (the comparison page)."""
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

    where = (
        " (the embedded SmolLM2-135M-Instruct; converted once, then cached)" if model is None else f" {model}"
    )
    st.start("loading the model" + where)
    lm, tok = load_model(model)
    st.done(f"{type(lm).__name__}, {sum(p.numel() for p in lm.parameters()) / 1e6:.0f}M parameters")

    st.start("writing the data: HH-RLHF pairs, each chosen reply against the same reply said twice")
    train_path, eval_path = demo_data(out, budget)
    st.done(
        f"{budget.train_pairs} train pairs -> {train_path}, {budget.eval_pairs} eval pairs -> {eval_path}"
    )

    st.start(f"scoring the train pairs with CHES ({RAZIN}): which pairs push the chosen response down?")
    scores, filtered = out / CHES_SCORES_FILE, out / "data" / "train_ches_filtered.jsonl"
    run_ches(
        model=model, data=train_path, output=scores, drop_top=budget.ches_drop, filtered_output=filtered,
        batch_size=budget.batch_size, max_length=budget.max_length, progress=progress, _model_obj=(lm, tok),
    )  # fmt: skip
    del lm
    st.done(f"scores -> {scores}; top {budget.ches_drop:.0%} dropped -> {filtered}")

    common = _common(budget, eval_path, progress)
    runs: dict[str, Path] = {}
    st.start(
        f"training DPO with LoRA (rank {budget.lora_rank}) for {budget.steps} steps, probing every {budget.probe_every}"
    )
    runs["dpo"] = _train(out / "dpo", "dpo", str(train_path), common, model)
    shutil.copyfile(scores, runs["dpo"] / CHES_SCORES_FILE)  # the report draws CHES vs change
    dpo_verdict = run_verdict(load_run(runs["dpo"]), ches_result(load_run(runs["dpo"])))
    st.done(f"verdict: {dpo_verdict.headline}")

    chosen = mitigation if mitigation != "auto" else (dpo_verdict.remedies or ["rpo"])[0]
    name = {"ches": "dpo-ches-filtered"}.get(chosen, chosen)
    why = "the verdict's first remedy" if mitigation == "auto" and dpo_verdict.remedies else "as asked"
    st.start(f"training the mitigation '{name}' ({why}) on the same data and start")
    data, loss = (str(filtered), "dpo") if chosen == "ches" else (str(train_path), chosen)
    runs[name] = _train(out / name, loss, data, common, model)
    st.done(str(runs[name]))

    st.start("writing the reports and the comparison page")
    page = _pages(runs, out, name)
    st.done()
    _print_end(console, runs, page, time.perf_counter() - t_start, common["eval_data"])
    return page


def _common(budget: DemoBudget, eval_path: Path, progress: bool) -> dict[str, Any]:
    """The TrainConfig fields both runs share (same data order, same start, same seed)."""
    return dict(
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
        scheduler="constant",
        save_every=0,
        report_to="none",
        progress=progress,
        seed=0,
    )


def _pages(runs: dict[str, Path], out: Path, name: str) -> Path:
    """Each run's report, then the comparison page with both verdicts and the runs' diagnosis lines."""
    findings: list[Finding] = []
    for run_name, rd in runs.items():
        _, f = generate_report(rd)
        findings += [
            Finding(x.kind, f"{run_name}: {x.text}", x.severity)
            for x in f
            if x.kind not in ("verdict", "try")
        ]
    shares = {n: _fell_share(rd) for n, rd in runs.items()}
    if all(v is not None for v in shares.values()):
        (a, fa), (b, fb) = shares.items()
        findings.insert(
            0,
            Finding(
                "compare",
                f"chosen log-prob fell (by more than the noise tolerance) in {fa:.0%} of eval pairs under {a}, "
                f"{fb:.0%} under {b}: {100 * (fa - fb):+.0f} percentage points",
                "info",
            ),
        )
    return compare_runs(
        runs, out, title=f"preflens demo: DPO vs {name}", filename="report.html", extra_findings=findings
    )


def _fell_share(rd: Path) -> float | None:
    run = load_run(rd)
    if run.pairs is None or not (run.pairs["split"] == "eval").any():
        return None
    return float(frac_chosen_fell_by_step(run.pairs, "eval", run.fell_tol())["frac"].iloc[-1])


def _print_end(console: Any, runs: dict[str, Path], page: Path, total: float, eval_data: str) -> None:
    console.print(f"\n[bold]preflens demo finished in {total / 60:.1f} min.[/]")
    for run_name, rd in runs.items():
        v = run_verdict(load_run(rd), ches_result(load_run(rd)))
        colour = {"bad": "red", "risk": "yellow", "ok": "green"}.get(v.severity, "white")
        console.print(f"  {run_name:>18}: [{colour}]{v.headline}[/]")
        console.print(f"  {'':>18}  {(rd / 'report.html').resolve()}")
    console.print(f"[bold green]report:[/] {page.resolve()}")


def _train(rd: Path, loss: str, data: str, common: dict[str, Any], model: str | None) -> Path:
    """One trainer run; the trainer loads the model itself, so every run starts from the same weights."""
    cfg = TrainConfig(model=model, data=data, loss=loss, output_dir=str(rd), **common)
    return Path(train(cfg))
