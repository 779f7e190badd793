"""`preflens probe`: the gradient entanglement / imbalance table of a dataset, without training.

Per pair: <g_w, g_l>, |g_w|, |g_l|, cosine, margin weights, the predicted first-order changes and which of
Yuan et al. 2024's (arXiv 2410.13828, Sec. 3) conditions they violate, and the imbalance ratio of Ma et
al. 2025 (arXiv 2502.20847, Eq. 2). The table is `preflens.diagnostics.probe_table.run_probe`; this
command parses the flags, calls it and prints the summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from preflens.commands import options as opt
from preflens.errors import PreflensError

__all__ = ["run_probe", "register"]


def _parse_kwargs(text: str | None) -> dict[str, Any]:
    """'beta=0.1,gamma=0.5' -> {'beta': 0.1, 'gamma': 0.5} (numbers, true/false, else strings)."""
    out: dict[str, Any] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise PreflensError(f"--loss-kwargs: expected key=value, got {part!r}")
        k, v = (s.strip() for s in part.split("=", 1))
        low = v.lower()
        if low in ("true", "false"):
            out[k] = low == "true"
            continue
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
    return out


def _check_early(output: Path, batch_size: int, lr: float, token_level: int, max_memory: str | None) -> None:
    """The options `run_probe` would refuse, checked before torch is imported."""
    from preflens.diagnostics.probe_options import check_probe_options  # torch-free

    check_probe_options(output, batch_size, lr)
    if token_level < 0:
        raise PreflensError(f"--token-level must be >= 0, got {token_level}")
    opt.parse_bytes(max_memory, "--max-memory")


def run_probe(**kwargs: Any) -> dict[str, Any]:
    """`preflens.diagnostics.probe_table.run_probe` (imported on first use, so that listing the commands
    stays fast)."""
    from preflens.diagnostics import probe_table

    return probe_table.run_probe(**kwargs)


def _print(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"gradient entanglement and imbalance, loss {s['loss']}, {s['pairs']} pairs")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("cosine(g_w, g_l) mean / median", f"{s['cosine_mean']:.3f} / {s['cosine_median']:.3f}")
    t.add_row("condition 1 violated (chosen would fall)", f"{s['frac_cond1_violated']:.0%}")
    t.add_row("condition 2 violated (rejected would rise)", f"{s['frac_cond2_violated']:.0%}")
    t.add_row("both fall / both rise", f"{s['frac_both_fall']:.0%} / {s['frac_both_rise']:.0%}")
    t.add_row("|dL/dpi_w| : |dL/dpi_l| median", f"{s['imbalance_ratio_median']:.3g}")
    if "token_pairs" in s:
        t.add_row(f"token level ({s['token_pairs']} pairs): share of negative token products",
                  f"{s['token_frac_negative_mean']:.0%}")  # fmt: skip
        t.add_row("  inner product from shared / differing tokens",
                  f"{s['token_inner_same_tokens_mean']:.3g} / {s['token_inner_different_tokens_mean']:.3g}")  # fmt: skip
    if s.get("gram_inexact_skipped_layers"):
        skipped = s["gram_inexact_skipped_layers"]
        t.add_row(f"INEXACT: layers left out of the Gram (--skip-oversize-layers): {len(skipped)}",
                  ", ".join(skipped))  # fmt: skip
    for reason, count in s.get("invalid_rows_dropped", {}).items():
        t.add_row(f"invalid rows dropped ({reason})", str(count))
    for reason, count in s.get("skipped_by_tokenization", {}).items():
        t.add_row(f"skipped by tokenization ({reason})", str(count))
    Console().print(t)
    Console().print(
        "[dim]conditions of Yuan et al. 2024 (arXiv 2410.13828, Sec. 3), first order, one step per pair; "
        "imbalance: Ma et al. 2025 (arXiv 2502.20847, Eq. 2; DPO: pi_l / pi_w)[/dim]"
    )
    Console().print(f"wrote {s['output']}")


def register(app: typer.Typer) -> None:
    @app.command("probe")
    def probe(
        data: Path = typer.Option(..., "--data", help="preference pairs (jsonl/json/parquet/csv)"),
        model: str = opt.MODEL,
        loss: str = typer.Option("dpo", "--loss", help="loss whose margin weights are used"),
        loss_kwargs: str = typer.Option(None, "--loss-kwargs", help="hyper-parameters, e.g. beta=0.1"),
        output: Path = typer.Option(Path("probe.parquet"), "--output", "-o", help="per-pair parquet"),
        batch_size: int = typer.Option(4, "--batch-size", help="pairs per forward+backward"),
        max_pairs: int = typer.Option(64, "--max-pairs", help="first N pairs of the data (0: all)"),
        max_length: int = typer.Option(512, "--max-length", help="token budget per sequence"),
        max_prompt_length: int = typer.Option(
            256, "--max-prompt-length", help="prompt tokens (longer: truncated), as in training"
        ),
        lora_rank: int = typer.Option(
            0, "--lora-rank", help="gradients over fresh LoRA adapters of this rank"
        ),
        lr: float = typer.Option(1.0, "--lr", help="step size of the predicted first-order changes"),
        token_level: int = typer.Option(
            0, "--token-level", help="token-level inner products for the first N pairs"
        ),
        dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16"),
        device: str = typer.Option("auto", "--device", help="auto (a GPU if there is one) | cpu | cuda[:N]"),
        chat_template: bool = opt.CHAT_TEMPLATE,
        data_split: str = opt.DATA_SPLIT,
        prompt_field: str = opt.PROMPT_FIELD,
        chosen_field: str = opt.CHOSEN_FIELD,
        rejected_field: str = opt.REJECTED_FIELD,
        on_invalid: str = opt.ON_INVALID,
        max_memory: str = opt.MAX_MEMORY,
        skip_oversize_layers: bool = typer.Option(
            False,
            "--skip-oversize-layers",
            help="leave out of the Gram a layer that cannot fit --max-memory in either form even for one "
            "pair (default: refuse); the output names the layers left out and the Gram is then inexact",
        ),
        explain_memory: bool = typer.Option(
            False, "--explain-memory", help="print the per-layer memory estimate (form, shape, bytes) first"
        ),
    ) -> None:
        """Per-pair gradient entanglement (Yuan et al. 2024, arXiv 2410.13828) and imbalance (Ma et al.
        2025, arXiv 2502.20847) of a dataset, without training."""
        kwargs = _parse_kwargs(loss_kwargs)
        _check_early(output, batch_size, lr, token_level, max_memory)
        opt.check_pairs_early(
            data,
            limit=max_pairs or None,
            split=data_split,
            prompt_field=prompt_field,
            chosen_field=chosen_field,
            rejected_field=rejected_field,
            on_invalid=on_invalid,
        )
        summary = run_probe(
            data=data,
            output=output,
            model=model,
            loss=loss,
            loss_kwargs=kwargs,
            batch_size=batch_size,
            max_pairs=max_pairs or None,
            max_length=max_length,
            lora_rank=lora_rank,
            lr=lr,
            token_level=token_level,
            dtype=dtype,
            device=device,
            chat_template=chat_template,
            max_prompt_length=max_prompt_length,
            data_split=data_split,
            prompt_field=prompt_field,
            chosen_field=chosen_field,
            rejected_field=rejected_field,
            on_invalid=on_invalid,
            max_memory=opt.parse_bytes(max_memory, "--max-memory"),
            skip_oversize_layers=skip_oversize_layers,
            explain_memory=explain_memory,
        )
        _print(summary)
