"""`preflens attribute`: which training pairs would push a probe set's chosen responses down, at the
current model, from exact cross-example gradient products (`preflens.diagnostics.attribution_scan`);
optionally write the dataset minus the worst fraction, like `preflens ches`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from preflens.commands import options as opt

__all__ = ["register"]


def _print(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"attribution of {summary['scored']} pairs against {summary['probe_pairs']} probe pairs")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row(
        "share of pairs pushing the probes' chosen down", f"{summary['frac_pairs_pushing_chosen_down']:.1%}"
    )
    for q, v in summary["effect_chosen_quantiles"].items():
        t.add_row(f"effect on chosen p{q}", f"{v:.4g}")
    if summary.get("spearman_attribution_vs_ches") is not None:
        t.add_row("Spearman(attribution, CHES)", f"{summary['spearman_attribution_vs_ches']:.3f}")
    if "dropped" in summary:
        t.add_row(f"dropped (top {summary['drop_top']:.0%})", str(summary["dropped"]))
        t.add_row("kept", str(summary["kept"]))
    console.print(t)
    console.print(f"probe set from {summary['probe_source']}; wrote {summary['output']}"
                  + (f" and {summary['filtered_output']}" if "filtered_output" in summary else ""))  # fmt: skip


def register(app: typer.Typer) -> None:
    @app.command("attribute")
    def attribute(
        data: Path = typer.Option(..., "--data", help="training pairs (jsonl/json/parquet/csv)"),
        output: Path = typer.Option(..., "--output", "-o", help="attribution parquet (one row per pair)"),
        eval_data: Path = typer.Option(
            None,
            "--eval-data",
            help="held-out pairs; the probe set is their first --probe-pairs (default: --data's)",
        ),
        model: str = opt.MODEL,
        probe_pairs: int = typer.Option(16, "--probe-pairs", help="pairs in the probe set"),
        loss: str = typer.Option(
            "dpo", "--loss", help="loss whose gradient is attributed (its margin weights)"
        ),
        beta: float = typer.Option(None, "--beta", help="the loss's beta (default: its own)"),
        lr: float = typer.Option(
            1.0, "--lr", help="learning rate the effects are scaled by (1: per unit lr)"
        ),
        drop_top: float = typer.Option(
            None, "--drop-top", help="drop this fraction of pairs that push the probes' chosen down most"
        ),
        filtered_output: Path = typer.Option(
            None, "--filtered-output", help="where --drop-top writes the kept pairs"
        ),
        ches: Path = typer.Option(None, "--ches", help="a `preflens ches` output of --data: rank agreement"),
        batch_size: int = typer.Option(8, "--batch-size", help="pairs per forward+backward"),
        max_length: int = typer.Option(512, "--max-length", help="tokens per sequence, as in training"),
        max_prompt_length: int = typer.Option(256, "--max-prompt-length", help="prompt tokens"),
        dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16"),
        device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
        chat_template: bool = opt.CHAT_TEMPLATE,
        max_memory: str = opt.MAX_MEMORY,
    ) -> None:
        """Rank training pairs by the first-order effect one SGD step on each has on a probe set's chosen
        log-probs (-lr <grad l_i, grad log pi(y_w,j)>); optionally write the dataset minus the worst ones."""
        budget = opt.parse_bytes(max_memory, "--max-memory")
        from preflens.diagnostics.attribution_scan import run_attribution

        summary = run_attribution(
            model=model, data=data, output=output, eval_data=eval_data, probe_pairs=probe_pairs, loss=loss,
            beta=beta, lr=lr, drop_top=drop_top, filtered_output=filtered_output, ches=ches,
            batch_size=batch_size, max_length=max_length, max_prompt_length=max_prompt_length, dtype=dtype,
            chat_template=chat_template, device=device, max_memory=budget,
        )  # fmt: skip
        _print(summary)
