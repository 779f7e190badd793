"""`preflens demo`: a DPO run that displaces likelihood, its diagnosis and the fix, on the embedded model."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        output_dir: Path = typer.Option(
            None,
            "--output-dir",
            help="a new directory (default: runs/demo-<timestamp>); an existing one is refused",
        ),
        quick: bool = typer.Option(False, "--quick", help="the smallest budget (a smoke test, for tests)"),
        mitigation: str = typer.Option(
            "auto",
            "--mitigation",
            help="what to train after DPO: auto (the DPO verdict's first remedy), rpo, ches (CHES-filtered "
            "data), normalized, bdpo or dpop",
        ),
        model: str = typer.Option(
            None, "--model", help="a local model directory instead of the embedded SmolLM2-135M-Instruct"
        ),
    ) -> None:
        """Run all of preflens on the embedded SmolLM2-135M-Instruct, offline, on a CPU (minutes): HH-RLHF
        pairs set up so that DPO displaces the chosen likelihood, CHES scores, DPO with LoRA and probes,
        the mitigation its verdict recommends from the same start, each run's report and a comparison
        page. Prints both verdicts and where the page is."""
        from preflens.demo import run_demo

        run_demo(output_dir, quick=quick, mitigation=mitigation, model=model)
