"""`preflens report RUN_DIR`: plots and a self-contained report.html for a run directory."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        run_dir: Path = typer.Argument(
            ..., help="a run directory (preflens train/compare/demo, or a TRL run with the preflens callback)"
        ),
        output: Path = typer.Option(
            None, "--output", "-o", help="where to write the HTML (default RUN_DIR/report.html)"
        ),
    ) -> None:
        """Draw the run's dynamics (RUN_DIR/plots/*.png) and write one self-contained report.html
        that starts with a written diagnosis."""
        from preflens.report import diagnosis_text, generate_report

        path, findings = generate_report(run_dir, output)
        typer.echo(diagnosis_text(findings))
        typer.echo(f"report: {path.resolve()}")
