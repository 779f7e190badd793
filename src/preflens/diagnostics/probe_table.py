"""The gradient entanglement / imbalance table of a dataset, without training (`preflens probe`).

For every pair (Yuan et al. 2024, arXiv 2410.13828, Sec. 3; Ma et al. 2025, arXiv 2502.20847, Eq. 2):
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
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from preflens import models  # models.load_model looked up per call: tests substitute the loader
from preflens.data.collate import collate_pairs, tokenize_pairs
from preflens.data.formats import load_pairs
from preflens.diagnostics.entanglement import entanglement_from_gram, token_entanglement
from preflens.diagnostics.probe_options import check_probe_options
from preflens.diagnostics.probe_state import probe_rows
from preflens.errors import PreflensError
from preflens.grad import sequence_gram_and_logps
from preflens.grad.api import gram_rows_per_run
from preflens.grad.memory import human, memory_budget, resolve_budget
from preflens.logprobs import split_pairs
from preflens.losses import TOKEN_LEVEL_LOSSES, LossFn, get_loss

__all__ = ["run_probe", "probe_rows", "summarize_probe_table"]


def _probe_batch(
    lm: Any, batch: dict[str, Any], loss_fn: LossFn, lr: float, token_ids: set[int]
) -> list[dict[str, Any]]:
    """The table's rows for one batch of pairs: one Gram forward+backward, then the per-pair statistics;
    the pairs in `token_ids` also get the token-level contrast."""
    gram, logps = sequence_gram_and_logps(
        lm, batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    )
    b = logps.shape[0] // 2
    lengths = batch["response_mask"].bool().sum(1)
    norms = gram.diagonal().clamp_min(0).sqrt().float()
    # the reference is the model itself (step 0 of a run): r_w = r_l = 0
    p = split_pairs(logps.float(), lengths, ref=(logps[:b].float(), logps[b:].float()), grad_norms=norms)
    # reduction "sum": each pair's prediction is for a step on its own loss (the paper's setting)
    stats = entanglement_from_gram(gram, p, loss_fn, eta=lr, reduction="sum")
    pid = [int(i) for i in batch["pair_index"].tolist()]
    rows, _ = probe_rows(stats, p, loss_fn, pid, step=0)
    for i, r in enumerate(rows):
        r.pop("step", None)
        r["chosen_len"], r["rejected_len"] = int(lengths[i]), int(lengths[b + i])
        if pid[i] in token_ids:
            te = token_entanglement(lm, batch, i).summary()
            r.update({f"token/{k}": v for k, v in te.items()})
    return rows


def plan_probe_memory(
    lm: Any, items: list[Any], batch_size: int, token_ids: set[int], budget: int
) -> dict[str, Any]:
    """Plan every Gram pass of the probe against `budget` from the shapes, before the first one runs:
    the largest batch (2 x batch_size rows) and, per token-level pair, its one-row-per-response-token
    pass. Returns the estimated peak extra bytes and the chunking, the one line the command prints before
    the work starts (`line`), the worst pass's per-term breakdown (`breakdown`, `--explain-memory`) and
    the layers left out under `--skip-oversize-layers` (`skipped_layers`: the Gram is then inexact);
    raises `MemoryBudgetError` naming the layer, the shape and the bytes when even two rows of a pass
    cannot fit."""

    longest = max(it.length for it in items)
    n_rows = min(2 * batch_size, 2 * len(items))
    rows, est = gram_rows_per_run(lm, [longest] * n_rows, max_memory=budget, what="probe batch")
    plan: dict[str, Any] = {"budget_bytes": budget, "batch_rows_per_pass": rows, "estimate_bytes": est.total}
    worst, skipped = est, set(est.skipped)
    parts = [f"probe batch {rows} of {n_rows} rows per pass"]
    for it in items:
        if it.pair_id not in token_ids:
            continue
        # token_gram: one row per response token, the row cut after that token
        p = len(it.prompt_ids)
        lens = [p + j + 1 for j in range(len(it.chosen_ids))] + [
            p + j + 1 for j in range(len(it.rejected_ids))
        ]
        t_rows, t_est = gram_rows_per_run(lm, lens, max_memory=budget, what=f"token-level pair {it.pair_id}")
        if t_est.total > worst.total:
            worst = t_est
        skipped |= set(t_est.skipped)
        plan["estimate_bytes"] = max(plan["estimate_bytes"], t_est.total)
        plan.setdefault("token_rows", {})[it.pair_id] = len(lens)
        plan.setdefault("token_rows_per_pass", {})[it.pair_id] = t_rows
        m = -(-len(lens) // max(1, t_rows // 2)) if t_rows < len(lens) else 1
        parts.append(
            f"token-level pair {it.pair_id}: {len(lens)} rows, {t_rows} per pass ({max(1, m * (m - 1) // 2)} passes)"
        )
    plan["skipped_layers"] = sorted(skipped)
    plan["line"] = (
        f"memory: estimated peak extra {human(plan['estimate_bytes'])} ({plan['estimate_bytes']} bytes) under the "
        f"budget of {human(budget)}; "
        + "; ".join(parts)
        + (
            f"; INEXACT Gram: {len(skipped)} layer(s) left out: {', '.join(sorted(skipped))}"
            if skipped
            else ""
        )
    )
    plan["breakdown"] = worst.breakdown()
    return plan


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
    max_memory: int | None = None,
    skip_oversize_layers: bool = False,
    explain_memory: bool = False,
    _model_obj: Any = None,
) -> dict[str, Any]:
    """Measure every pair of `data` (up to `max_pairs`), write the per-pair parquet, return a summary.

    `data_split`, the `*_field` names and `on_invalid` are `load_pairs`'s; `max_length`,
    `max_prompt_length` and `chat_template` tokenize as `preflens train` does, so the probed
    sequences are the ones a run trains on. `token_level` N measures the N lowest pair ids.
    `max_memory` (bytes; None: half the free memory): every Gram pass is planned against it before the
    first one runs (`preflens.grad.memory`): chunked to fit, or refused up front naming layer, shape, bytes.
    """
    check_probe_options(output, batch_size, lr)
    loss_fn = get_loss(loss, **(loss_kwargs or {}))
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
        lm, tok = models.load_model(model, dtype=dtype, device=device)
    # fresh adapters (--lora-rank), or a saved adapter (RUN/final) unfrozen: what a run would train
    lm = models.with_trainable_adapters(lm, lora_rank)
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
    budget = resolve_budget(max_memory, dev)
    with memory_budget(budget, skip_layers=skip_oversize_layers):
        plan = plan_probe_memory(lm, items, batch_size, token_ids, budget)  # refuses before any pass runs
        print(plan["line"], file=sys.stderr, flush=True)  # the estimate, before the long work
        if explain_memory:
            print("\n".join(["memory breakdown of the largest pass:", *plan["breakdown"]]), file=sys.stderr)
        for start in range(0, len(items), batch_size):
            batch = collate_pairs(items[start : start + batch_size], pad)
            batch = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            rows.extend(_probe_batch(lm, batch, loss_fn, lr, token_ids))
    df = pd.DataFrame(rows).sort_values("pair_id", kind="stable").reset_index(drop=True)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(output, index=False)
    out = summarize_probe_table(df, loss, output)
    out["memory"] = plan
    if plan["skipped_layers"]:  # the Gram left these layers out: every Gram-derived number is inexact
        out["gram_inexact_skipped_layers"] = list(plan["skipped_layers"])
    if load_report.n_dropped:
        out["invalid_rows_dropped"] = dict(load_report.dropped)
    if tok_report.n_dropped:
        out["skipped_by_tokenization"] = dict(tok_report.dropped)
    return out


def summarize_probe_table(df: Any, loss: str, output: Path) -> dict[str, Any]:
    """The table's headline numbers (what `preflens probe` prints), and where it was written."""
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
