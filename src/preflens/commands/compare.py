"""`preflens compare --losses dpo,ipo,simpo --data D --output-dir DIR`: one run per loss, one figure."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare(
        losses: str = typer.Option(
            ..., "--losses", help="comma-separated loss names, e.g. dpo,ipo,simpo,sppo"
        ),
        data: str = typer.Option(..., "--data", help="preference pairs (file, directory or hub id)"),
        output_dir: Path = typer.Option(
            ..., "--output-dir", help="new directory: one run per loss + compare.html"
        ),
        model: str = typer.Option(
            None, "--model", help="HF id or local dir (default: the embedded SmolLM2-135M)"
        ),
        eval_data: str = typer.Option(
            None,
            "--eval-data",
            help="held-out pairs (default: the test split of --data if it has one, else a share of it)",
        ),
        steps: int = typer.Option(None, "--steps", help="optimizer steps per run (default: one epoch)"),
        batch_size: int = typer.Option(8, "--batch-size", help="pairs per step"),
        lr: float = typer.Option(5e-6, "--lr", help="peak learning rate"),
        lora_rank: int = typer.Option(0, "--lora-rank", help="LoRA rank (0: full finetune)"),
        eval_every: int = typer.Option(50, "--eval-every", help="evaluate every N steps"),
        probe_every: int = typer.Option(
            0, "--probe-every", help="gradient-entanglement probes every N steps"
        ),
        probe_pairs: int = typer.Option(8, "--probe-pairs", help="pairs in the probe set"),
        max_length: int = typer.Option(512, "--max-length", help="longest prompt+response in tokens"),
        seed: int = typer.Option(0, "--seed", help="the same seed for every run"),
    ) -> None:
        """Train the same data and model under each loss (its own default hyper-parameters) and draw
        their chosen/rejected log-prob trajectories side by side (Yuan et al. 2024, arXiv 2410.13828,
        Fig. 1)."""
        from preflens.compare import run_compare

        names = [x.strip() for x in losses.split(",") if x.strip()]
        path = run_compare(
            names,
            data,
            output_dir,
            model=model,
            eval_data=eval_data,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            lora_rank=lora_rank,
            eval_every=eval_every,
            probe_every=probe_every,
            probe_pairs=probe_pairs,
            max_length=max_length,
            seed=seed,
        )
        typer.echo(f"comparison: {path.resolve()}")
        for name in names:
            typer.echo(f"  {name}: {(Path(output_dir) / name / 'report.html').resolve()}")
