"""`preflens ches`: rank preference pairs by CHES score and drop the ones that displace likelihood.

Razin et al. 2024 (arXiv 2410.08847, Sec. 5): pairs with a high CHES score make DPO lower the chosen
response's probability; removing the top-scoring pairs mitigates it. The scan itself (chunks, resume,
several processes, the output columns) is `preflens.diagnostics.ches_scan.run_ches`; this command parses
the flags, gives it the one Accelerator factory's process group, and prints the summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from preflens.commands import options as opt

__all__ = ["run_ches", "register"]


def run_ches(**kwargs: Any) -> dict[str, Any] | None:
    """`preflens.diagnostics.ches_scan.run_ches` (imported on first use, so that listing the commands
    stays fast)."""
    from preflens.diagnostics import ches_scan

    return ches_scan.run_ches(**kwargs)


def __getattr__(name: str) -> Any:
    """Names that lived here before the scan moved to the library still import from here."""
    if name in ("edit_similarity", "top_indices"):
        from preflens.diagnostics import ches_scan

        return getattr(ches_scan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _print(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    kind = "length-normalized CHES" if summary["length_normalized"] else "CHES"
    t = Table(title=f"{kind} over {summary['scored']} of {summary['pairs']} pairs")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    for q, v in summary["score_quantiles"].items():
        t.add_row(f"score p{q}", f"{v:.4g}")
    if summary["spearman_score_vs_edit_similarity"] is not None:
        t.add_row("Spearman(score, edit similarity)", f"{summary['spearman_score_vs_edit_similarity']:.3f}")
    for reason, count in summary.get("invalid_rows_dropped", {}).items():
        t.add_row(f"invalid rows dropped ({reason})", str(count))
    if summary["skipped_by_tokenization"]:
        t.add_row("skipped by tokenization", str(summary["skipped_by_tokenization"]))
    if summary["resumed_chunks"]:
        t.add_row("chunks reused from a previous run", str(summary["resumed_chunks"]))
    if "dropped" in summary:
        t.add_row(f"dropped (top {summary['drop_top']:.0%})", str(summary["dropped"]))
        t.add_row("kept", str(summary["kept"]))
    console.print(t)
    console.print(
        "[dim]higher CHES = more similar preferences = more likelihood displacement under DPO "
        "(Razin et al. 2024, arXiv 2410.08847, Sec. 5)[/dim]"
    )
    console.print(
        f"wrote {summary['output']}"
        + (f" and {summary['filtered_output']}" if "filtered_output" in summary else "")
    )


def register(app: typer.Typer) -> None:
    @app.command("ches")
    def ches(
        data: Path = typer.Option(
            ..., "--data", help="preference pairs (jsonl/json/parquet/csv with prompt/chosen/rejected)"
        ),
        output: Path = typer.Option(..., "--output", "-o", help="scores parquet (one row per pair)"),
        model: str = opt.MODEL,
        length_normalized: bool = typer.Option(
            False, "--length-normalized", help="score = CHES of the mean hidden states"
        ),
        drop_top: float = typer.Option(
            None, "--drop-top", help="drop this fraction of highest-scoring pairs"
        ),
        filtered_output: Path = typer.Option(
            None, "--filtered-output", help="where --drop-top writes the kept pairs"
        ),
        batch_size: int = typer.Option(8, "--batch-size", help="pairs per forward (2x rows)"),
        max_length: int = typer.Option(
            512, "--max-length", help="tokens per sequence (longer: truncated), as in training"
        ),
        max_prompt_length: int = typer.Option(
            256, "--max-prompt-length", help="prompt tokens (longer: truncated)"
        ),
        chunk_size: int = typer.Option(512, "--chunk-size", help="pairs per resumable chunk"),
        dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
        chat_template: bool = opt.CHAT_TEMPLATE,
        overwrite: bool = typer.Option(
            False, "--overwrite", help="replace a finished output / discard a partial one"
        ),
        data_split: str = opt.DATA_SPLIT,
        prompt_field: str = opt.PROMPT_FIELD,
        chosen_field: str = opt.CHOSEN_FIELD,
        rejected_field: str = opt.REJECTED_FIELD,
        on_invalid: str = opt.ON_INVALID,
        max_memory: str = opt.MAX_MEMORY,
    ) -> None:
        """Score pairs by CHES (Razin et al. 2024, arXiv 2410.08847, Sec. 5); optionally write the dataset
        minus the top-scoring fraction."""
        budget = opt.parse_bytes(max_memory, "--max-memory")
        opt.check_pairs_early(
            data,
            split=data_split,
            prompt_field=prompt_field,
            chosen_field=chosen_field,
            rejected_field=rejected_field,
            on_invalid=on_invalid,
        )
        from preflens.training.runtime import make_accelerator  # torch: once the data is known to be good

        summary = run_ches(
            model=model,
            data=data,
            output=output,
            length_normalized=length_normalized,
            drop_top=drop_top,
            filtered_output=filtered_output,
            batch_size=batch_size,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            chunk_size=chunk_size,
            dtype=dtype,
            chat_template=chat_template,
            overwrite=overwrite,
            data_split=data_split,
            prompt_field=prompt_field,
            chosen_field=chosen_field,
            rejected_field=rejected_field,
            on_invalid=on_invalid,
            accelerator=make_accelerator(),
            max_memory=budget,
        )
        if summary is not None:
            _print(summary)
