"""`preflens probe`: the gradient entanglement / imbalance table of a dataset, without training.

For every pair (seed 000, Yuan et al. arXiv 2410.13828, Sec. 3; seed 004, arXiv 2502.20847, Eq. 2):
<g_w, g_l>, |g_w|, |g_l|, cosine, the loss's margin weights d_w, d_l, the first-order changes of
chosen and rejected under one SGD step of size --lr on the pair's loss, which of condition 1 (chosen
rises) / condition 2 (rejected falls) is violated, the imbalance ratio |dL/dpi_w| : |dL/dpi_l| and
Balanced-DPO's lambda_w. With --token-level N, the first N pairs also get the token-level contrast
of Sec. 4 (sum of token-level inner products from shared vs differing tokens, share negative).

The reference model is the model itself (the state at step 0 of a training run), so r_w = r_l = 0:
the margin weights are those of the first step. Gradients are over the trainable parameters: the
whole model, or fresh LoRA adapters with --lora-rank (peft initialises B = 0, so the lora_A gradients
are zero at that point and only lora_B carries gradient, as at a real run's first step).
"""

from __future__ import annotations

import math
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


def run_probe(
    *,
    data: Path,
    output: Path,
    model: str | None = None,
    loss: str = "dpo",
    loss_kwargs: dict[str, Any] | None = None,
    batch_size: int = 4,
    max_pairs: int | None = 64,
    max_length: int | None = 512,
    lora_rank: int = 0,
    lr: float = 1.0,
    token_level: int = 0,
    dtype: str = "float32",
    device: str = "auto",
    chat_template: bool | None = None,
    max_prompt_length: int | None = 256,
    data_split: str = "train",
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    on_invalid: str = "error",
    _model_obj: Any = None,
) -> dict[str, Any]:
    """Measure every pair of `data` (up to `max_pairs`), write the per-pair parquet, return a summary.

    `data_split`, the `*_field` names and `on_invalid` are `load_pairs`'s; `max_length`,
    `max_prompt_length` and `chat_template` tokenize as `preflens train` does, so the probed
    sequences are the ones a run trains on. `token_level` N measures the N lowest pair ids.
    """
    import pandas as pd
    import torch

    from preflens.data.collate import collate_pairs, tokenize_pairs
    from preflens.data.formats import load_pairs
    from preflens.diagnostics.entanglement import entanglement_from_gram, token_entanglement
    from preflens.diagnostics.gram import sequence_gram_and_logps
    from preflens.losses import PairLogps, get_loss
    from preflens.probes import probe_rows

    if Path(output).suffix.lower() != ".parquet":
        raise PreflensError(f"--output {output}: the per-pair table is parquet; name it *.parquet")
    if batch_size < 1:
        raise PreflensError(f"--batch-size must be >= 1, got {batch_size}")
    if not lr > 0:
        raise PreflensError(f"--lr must be > 0, got {lr}")
    loss_fn = get_loss(loss, **(loss_kwargs or {}))
    from preflens.losses import TOKEN_LEVEL_LOSSES

    if loss in TOKEN_LEVEL_LOSSES:
        raise PreflensError(
            f"--loss {loss} weighs tokens individually: its margin weights are per token, not per sequence; "
            "probe it with --loss dpo (the same sentence-level gradients)"
        )
    pairs, load_report = load_pairs(
        data,
        limit=max_pairs,
        split=data_split,
        prompt_field=prompt_field,
        chosen_field=chosen_field,
        rejected_field=rejected_field,
        on_invalid=on_invalid,  # type: ignore[arg-type]
    )
    if _model_obj is not None:
        lm, tok = _model_obj
    else:
        from preflens.models import load_model

        lm, tok = load_model(model, dtype=dtype, device=device)
    from preflens.models import with_trainable_adapters

    # fresh adapters (--lora-rank), or a saved adapter (RUN/final) unfrozen: what a run would train
    lm = with_trainable_adapters(lm, lora_rank)
    lm.eval()
    dev = next(lm.parameters()).device
    items, tok_report = tokenize_pairs(
        pairs, tok, max_length=max_length, max_prompt_length=max_prompt_length, chat_template=chat_template
    )
    if not items:
        why = ", ".join(f"{k}: {v}" for k, v in tok_report.dropped.items()) or "none kept"
        raise PreflensError(
            f"{data}: no pairs left after tokenization ({why}); raise --max-length / --max-prompt-length"
        )
    items = sorted(items, key=lambda it: (it.length, it.pair_id))  # little padding per batch
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows: list[dict[str, Any]] = []
    # the token-level contrast (one forward row per response token) for the first N pairs by id;
    # the batches below are sorted by length, so "the first N batch rows" would be the N shortest
    token_ids = set(sorted(it.pair_id for it in items)[: max(token_level, 0)])
    for start in range(0, len(items), batch_size):
        batch = collate_pairs(items[start : start + batch_size], pad)
        batch = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        gram, logps = sequence_gram_and_logps(
            lm, batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        )
        b = logps.shape[0] // 2
        lengths = batch["response_mask"].bool().sum(1)
        norms = gram.diagonal().clamp_min(0).sqrt().float()
        p = PairLogps(
            chosen=logps[:b].float(),
            rejected=logps[b:].float(),
            ref_chosen=logps[:b].float(),
            ref_rejected=logps[b:].float(),
            chosen_len=lengths[:b],
            rejected_len=lengths[b:],
            chosen_grad_norm=norms[:b],
            rejected_grad_norm=norms[b:],
        )
        # reduction "sum": each pair's prediction is for a step on its own loss (the paper's setting)
        stats = entanglement_from_gram(gram, p, loss_fn, eta=lr, reduction="sum")
        pid = [int(i) for i in batch["pair_index"].tolist()]
        brows, _ = probe_rows(stats, p, loss_fn, pid, step=0)
        for i, r in enumerate(brows):
            r.pop("step", None)
            r["chosen_len"], r["rejected_len"] = int(lengths[i]), int(lengths[b + i])
            if pid[i] in token_ids:
                te = token_entanglement(lm, batch, i).summary()
                r.update({f"token/{k}": v for k, v in te.items()})
        rows.extend(brows)
    df = pd.DataFrame(rows).sort_values("pair_id", kind="stable").reset_index(drop=True)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(output, index=False)
    out = _summary(df, loss, output)
    if load_report.n_dropped:
        out["invalid_rows_dropped"] = dict(load_report.dropped)
    if tok_report.n_dropped:
        out["skipped_by_tokenization"] = dict(tok_report.dropped)
    return out


def _summary(df: Any, loss: str, output: Path) -> dict[str, Any]:
    lr = df["imbalance_log_ratio"]
    lr = lr[lr.map(math.isfinite)]
    out: dict[str, Any] = {
        "pairs": int(len(df)),
        "loss": loss,
        "cosine_mean": float(df["cosine"].mean()),
        "cosine_median": float(df["cosine"].median()),
        "frac_cond1_violated": float(df["cond1_violated"].mean()),
        "frac_cond2_violated": float(df["cond2_violated"].mean()),
        "frac_both_fall": float(((df["pred_delta_chosen"] < 0) & (df["pred_delta_rejected"] < 0)).mean()),
        "frac_both_rise": float(((df["pred_delta_chosen"] > 0) & (df["pred_delta_rejected"] > 0)).mean()),
        "imbalance_ratio_median": float(math.exp(lr.median())) if len(lr) and lr.median() < 700 else math.inf,
        "output": str(output),
    }
    if "token/sentence_inner" in df.columns:
        t = df.dropna(subset=["token/sentence_inner"])
        out["token_pairs"] = int(len(t))
        out["token_inner_positive_sentence"] = float((t["token/sentence_inner"] > 0).mean())
        out["token_frac_negative_mean"] = float(t["token/frac_token_inner_negative"].mean())
        out["token_inner_same_tokens_mean"] = float(t["token/inner_from_same_tokens"].mean())
        out["token_inner_different_tokens_mean"] = float(t["token/inner_from_different_tokens"].mean())
    return out


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
    for reason, count in s.get("invalid_rows_dropped", {}).items():
        t.add_row(f"invalid rows dropped ({reason})", str(count))
    for reason, count in s.get("skipped_by_tokenization", {}).items():
        t.add_row(f"skipped by tokenization ({reason})", str(count))
    Console().print(t)
    Console().print(
        "[dim]conditions of Yuan et al. 2024 (Sec. 3), first order, one step per pair; imbalance: seed 004 "
        "Eq. 2 (DPO: pi_l / pi_w)[/dim]"
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
    ) -> None:
        """Per-pair gradient entanglement (seed 000) and imbalance (seed 004) of a dataset, without training."""
        summary = run_probe(
            data=data,
            output=output,
            model=model,
            loss=loss,
            loss_kwargs=_parse_kwargs(loss_kwargs),
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
        )
        _print(summary)
