"""`preflens demo`: CHES, DPO with probes, one mitigation and the report, on the embedded model."""

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
            "bdpo",
            "--mitigation",
            help="what to train after DPO: bdpo, normalized, ches (CHES-filtered data) or rpo",
        ),
        model: str = typer.Option(
            None, "--model", help="a local model directory instead of the embedded SmolLM2-135M-Instruct"
        ),
    ) -> None:
        """Run all of preflens on the embedded SmolLM2-135M-Instruct, offline, on a CPU (about five
        minutes): a synthetic preference set, CHES scores, DPO with LoRA and gradient probes, one
        mitigation, and a report. Prints where the report is."""
        from preflens.demo import run_demo

        run_demo(output_dir, quick=quick, mitigation=mitigation, model=model)
