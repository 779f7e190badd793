"""`preflens report RUN_DIR`: plots and a self-contained report.html for a run directory."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        run_dir: Path = typer.Argument(
            ...,
            help="a run directory (preflens train/compare/demo/rft, a reward-std output directory, or a TRL DPO/GRPO run with a preflens callback)",
        ),
        output: Path = typer.Option(
            None, "--output", "-o", help="where to write the HTML (default RUN_DIR/report.html)"
        ),
    ) -> None:
        """Draw the run's dynamics (RUN_DIR/plots/*.png) and write one self-contained report.html
        that starts with a written diagnosis."""
        from preflens.report import diagnosis_text
        from preflens.report.rl import is_rl_run

        if is_rl_run(run_dir):  # preflens rft / reward-std output / a TRL GRPO run with PreflensGRPOCallback
            from preflens.report.rl_page import generate_rl_report as generate
        else:
            from preflens.report import generate_report as generate
        path, findings = generate(run_dir, output)
        typer.echo(diagnosis_text(findings))
        typer.echo(f"report: {path.resolve()}")
