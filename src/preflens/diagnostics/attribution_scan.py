"""`preflens attribute`: rank the training pairs of a dataset by how much one SGD step on each would push a
probe set's chosen log-probs down, at the current model, without training (a gradient-based companion to
`preflens ches`, Razin et al. 2024, arXiv 2410.08847, Sec. 5).

For each training pair i and probe pair j, from `preflens.grad.cross.objective_cross` (one forward and one
activation-only backward per batch of training pairs, the probe set's parts computed once):

    effect[i, j] = -lr * <grad l_i, grad logp(y_w,j)>    (and the same for y_l,j)

with l_i the loss of pair i at the current model taken as its own reference (the state at the start of a
DPO run; the loss's margin weights there, e.g. beta/2 for DPO), so the numbers are what the first step on
that pair alone would do. Token-level losses are differentiated as they are (the objective is the sum of
the per-pair losses). One row per training pair:

    pair_index, effect_chosen (sum over the probe set's chosen), effect_rejected, frac_probes_chosen_down,
    min_effect_chosen, percentile (of -effect_chosen: 100 = pushes chosen down most), dropped (--drop-top)

The probe set: the first P pairs of --eval-data (held out), else the first P of --data itself.
One process; the model is used in eval mode (no dropout).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from preflens import models
from preflens.data.collate import collate_pairs, tokenize_pairs
from preflens.data.formats import load_pairs
from preflens.diagnostics.attribution import pair_effects, rank_agreement
from preflens.diagnostics.ches_scan import check_drop_options, top_fraction, write_filtered
from preflens.errors import PreflensError
from preflens.grad.cross import objective_cross, probe_parts
from preflens.grad.estimates import plan_cross_batch
from preflens.grad.memory import resolve_budget
from preflens.logprobs import pair_logps_from_batch
from preflens.losses import LOSSES, TOKEN_LEVEL_LOSSES, get_loss

__all__ = ["run_attribution", "top_pushers"]


def _check(data: Path, output: Path, drop_top: float | None, filtered_output: Path | None, loss: str) -> None:
    check_drop_options(drop_top, filtered_output)
    if output.suffix.lower() != ".parquet":
        raise PreflensError(f"--output {output}: the attribution is a parquet table; name it *.parquet")
    if not data.exists():
        raise PreflensError(f"{data}: no such file")
    if loss not in LOSSES:
        raise PreflensError(f"--loss: unknown loss '{loss}'; available: {', '.join(LOSSES)}")
    if loss == "normalized" or loss == "sparse":
        raise PreflensError(f"--loss {loss}: needs per-step inputs (gradient norms / a mask) the scan lacks")


def top_pushers(df: pd.DataFrame, fraction: float) -> set[int]:
    """pair_index of the floor(fraction * n) pairs with the most negative effect on the probes' chosen."""
    return top_fraction(df, "effect_chosen", fraction, highest=False)


def _batch_to(batch: dict[str, Any], device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        batch["response_mask"].to(device).bool(),
    )


def _score(
    model: Any, tok: Any, items: list[Any], probe: Any, loss_fn: Any, *, lr: float, batch_size: int,
    token_level: bool, progress: bool,
) -> list[dict[str, Any]]:  # fmt: skip
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    dev = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: (-items[i].length, i))
    rows: list[dict[str, Any]] = []

    def objective(seq: Any) -> torch.Tensor:
        b = seq.logps.shape[0] // 2
        ref = (seq.logps[:b].detach(), seq.logps[b:].detach())
        ref_tokens = None
        if token_level:
            ref_tokens = (seq.token_logps[:b].detach(), seq.token_logps[b:].detach())
        return loss_fn(pair_logps_from_batch(seq, ref=ref, ref_tokens=ref_tokens)).sum()

    for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc="attribute"):
        chunk = [items[i] for i in order[start : start + batch_size]]
        batch = collate_pairs(chunk, pad)
        cross, _ = objective_cross(model, _batch_to(batch, dev), objective, probe, return_tokens=token_level)
        eff = pair_effects(cross, -lr).cpu()  # [b, P, 2]
        for i, it in enumerate(chunk):
            ec = eff[i, :, 0]
            rows.append(
                {
                    "pair_index": int(it.pair_id),
                    "effect_chosen": float(ec.sum()),
                    "effect_rejected": float(eff[i, :, 1].sum()),
                    "frac_probes_chosen_down": float((ec < 0).float().mean()),
                    "min_effect_chosen": float(ec.min()),
                }
            )
    return rows


def run_attribution(
    *,
    model: str | None,
    data: Path,
    output: Path,
    eval_data: Path | None = None,
    probe_pairs: int = 16,
    loss: str = "dpo",
    beta: float | None = None,
    lr: float = 1.0,
    drop_top: float | None = None,
    filtered_output: Path | None = None,
    ches: Path | None = None,
    batch_size: int = 8,
    max_length: int | None = 512,
    max_prompt_length: int | None = 256,
    dtype: str = "float32",
    chat_template: bool | None = None,
    device: str = "cpu",
    progress: bool = True,
    max_memory: int | None = None,
    _model_obj: Any = None,
) -> dict[str, Any]:
    """Attribute every pair of `data` against the probe set; write OUTPUT (and the filtered pairs).

    `max_memory` (bytes; None: half the free memory): the batch size is cut to fit beside the probe set's
    parts before the probe pass runs, or the run is refused in one line (`grad.estimates.plan_cross_batch`).
    `ches`: a `preflens ches` output of the same data, for the rank agreement in the summary.
    `_model_obj` = (model, tokenizer) already loaded (tests, notebooks).
    """
    data, output = Path(data), Path(output)
    _check(data, output, drop_top, filtered_output, loss)
    if probe_pairs < 1 or batch_size < 1:
        raise PreflensError("--probe-pairs and --batch-size must be at least 1")
    pairs, _ = load_pairs(data)
    probe_src = load_pairs(Path(eval_data))[0] if eval_data is not None else pairs
    lm, tok = _model_obj if _model_obj is not None else models.load_model(model, dtype=dtype, device=device)
    lm.eval()
    limits = {
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "chat_template": chat_template,
    }
    items, _ = tokenize_pairs(pairs, tok, **limits)
    probe_items, _ = tokenize_pairs(probe_src, tok, **limits)
    probe_items = sorted(probe_items, key=lambda it: it.pair_id)[:probe_pairs]
    if not items or not probe_items:
        raise PreflensError(f"{data}: no pair survived tokenization (check --max-length)")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    dev = next(lm.parameters()).device
    probe_lens = [len(it.prompt_ids) + len(r) for it in probe_items for r in (it.chosen_ids, it.rejected_ids)]
    batch_size = plan_cross_batch(  # issue 18: up front, before the probe pass
        lm, max(it.length for it in items), probe_lens, batch_size, resolve_budget(max_memory, dev),
        what=f"attribute: pairs against {len(probe_items)} probe pairs (counted in pairs)",
    )  # fmt: skip
    probe = probe_parts(lm, *_batch_to(collate_pairs(probe_items, pad), dev))
    loss_fn = get_loss(loss, **({"beta": beta} if beta is not None else {}))
    rows = _score(
        lm, tok, items, probe, loss_fn, lr=lr, batch_size=batch_size,
        token_level=loss in TOKEN_LEVEL_LOSSES, progress=progress,
    )  # fmt: skip
    df = pd.DataFrame(rows).sort_values("pair_index", kind="stable").reset_index(drop=True)
    df["percentile"] = (-df["effect_chosen"]).rank(pct=True) * 100
    summary: dict[str, Any] = {
        "pairs": len(pairs),
        "scored": len(df),
        "probe_pairs": len(probe_items),
        "probe_source": str(eval_data if eval_data is not None else data),
        "frac_pairs_pushing_chosen_down": float((df["effect_chosen"] < 0).mean()),
        "effect_chosen_quantiles": {
            q: float(df["effect_chosen"].quantile(q / 100)) for q in (0, 10, 50, 90, 100)
        },
    }
    if ches is not None:
        cs = pd.read_parquet(ches).set_index("pair_index")
        both = df.join(cs[["ches"]], on="pair_index", how="inner")
        summary["spearman_attribution_vs_ches"] = rank_agreement(
            list(-both["effect_chosen"]), list(both["ches"])
        )
    if drop_top is not None:
        top = top_pushers(df, drop_top)
        df["dropped"] = df["pair_index"].isin(top)
        write_filtered(pairs, top, filtered_output)  # type: ignore[arg-type]
        summary.update(
            drop_top=drop_top,
            dropped=len(top),
            kept=sum(p.pair_id not in top for p in pairs),
            filtered_output=str(filtered_output),
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, output)
    summary["output"] = str(output)
    return summary
