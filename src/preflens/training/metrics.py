"""The numbers a preference run logs: per-pair statistics of a step or an evaluation, reduced to one row.

Keys are TRL's where TRL has one (ARCHITECTURE.md): loss, logps/*, rewards/*, plus preflens's margin
weights (d_w = -dl/d chosen, d_l = dl/d rejected, Yuan et al. 2024, arXiv 2410.13828, Sec. 3),
`frac_chosen_fell` (likelihood displacement, Razin et al. 2024, arXiv 2410.08847) and the gradient-imbalance
keys (Ma et al. 2025, arXiv 2502.20847). A step's per-pair numbers travel as one [B, len(STAT_COLS)] tensor,
so a micro-batch costs one gather across processes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from preflens.diagnostics.imbalance import imbalance_from_margin_weights, imbalance_metrics
from preflens.logprobs import PairLogps
from preflens.losses import LossFn, get_loss, margin_weights

__all__ = ["STAT_COLS", "pair_stats", "run_metrics", "eval_columns", "pair_rows", "eval_line"]

# Columns of the per-pair stats tensor gathered once per micro-batch (one collective).
STAT_COLS = ("pair_id", "chosen", "rejected", "ref_chosen", "ref_rejected", "chosen_len", "rejected_len", "loss",
             "d_w", "d_l", "tokens", "loss_dpo")  # fmt: skip


def _dpo_beside(loss_kwargs: dict[str, Any]) -> LossFn:
    """DPO with the run's beta: `normalized`'s surrogate value is not a likelihood, so DPO's is logged beside."""
    return get_loss("dpo", beta=loss_kwargs.get("beta", 0.1))


def pair_stats(
    p: PairLogps,
    loss: torch.Tensor,
    loss_fn: LossFn,
    pair_ids: torch.Tensor,
    tokens: torch.Tensor,
    *,
    log_dpo: bool,
    loss_kwargs: dict[str, Any],
) -> torch.Tensor:
    """[B, len(STAT_COLS)] per-pair numbers of this process's micro-batch (detached, float64)."""
    d_w, d_l = margin_weights(loss_fn, p)
    if log_dpo:
        loss_dpo = _dpo_beside(loss_kwargs)(p).detach()
    else:
        loss_dpo = torch.full_like(p.chosen, float("nan"))
    cols = [
        pair_ids.to(torch.float64),
        p.chosen.detach(),
        p.rejected.detach(),
        p.ref_chosen,
        p.ref_rejected,
        p.chosen_len,
        p.rejected_len,
        loss.detach(),
        d_w,
        d_l,
        tokens,
        loss_dpo,
    ]
    return torch.stack([c.to(torch.float64) for c in cols], dim=1)


def run_metrics(col: dict[str, Any], *, beta: float, fell_tol: float) -> dict[str, float]:
    """TRL-compatible keys (ARCHITECTURE.md) from per-pair tensors over all processes.

    rewards/* are the implicit rewards beta (log pi - log pi_ref) with the loss's beta (1 for losses
    without one), also for reference-free losses, where they measure the move from the initial model;
    frac_chosen_fell is the share of pairs whose chosen log-prob is below its reference value (the
    model before step 1) by more than `fell_tol` nats, i.e. likelihood displacement.
    """
    r_w = beta * (col["chosen"] - col["ref_chosen"])
    r_l = beta * (col["rejected"] - col["ref_rejected"])
    margin = r_w - r_l
    m = {
        "loss": float(col["loss"].mean()),
        "logps/chosen": float(col["chosen"].mean()),
        "logps/rejected": float(col["rejected"].mean()),
        "rewards/chosen": float(r_w.mean()),
        "rewards/rejected": float(r_l.mean()),
        "rewards/margins": float(margin.mean()),
        "rewards/accuracies": float((margin > 0).double().mean()),
        "margin_weights/dw": float(col["d_w"].mean()),
        "margin_weights/dl": float(col["d_l"].mean()),
        "frac_chosen_fell": float((col["chosen"] < col["ref_chosen"] - fell_tol).double().mean()),
    }
    if not torch.isnan(col["loss_dpo"]).all():
        m["loss/dpo"] = float(col["loss_dpo"].mean())
    imb = imbalance_from_margin_weights(col["d_w"], col["d_l"], col["chosen"], col["rejected"])
    m.update(imbalance_metrics(imb))
    return m


def _fill_tokens(
    p: PairLogps, ids: list[int], rows: dict[int, dict[str, Any]], ref: dict[int, dict[str, Any]]
) -> None:
    """The per-token fields of an evaluation's PairLogps (token-level losses), padded to the longest."""

    def pad(key: str, src: dict[int, dict[str, Any]], value: float = 0.0) -> Any:
        return pad_sequence([src[i][key].double() for i in ids], batch_first=True, padding_value=value)

    p.chosen_tokens, p.rejected_tokens = pad("chosen_tokens", rows), pad("rejected_tokens", rows)
    p.ref_chosen_tokens, p.ref_rejected_tokens = pad("chosen_tokens", ref), pad("rejected_tokens", ref)
    p.chosen_mask = pad_sequence(
        [torch.ones(len(rows[i]["chosen_tokens"]), dtype=torch.bool) for i in ids], batch_first=True
    )
    p.rejected_mask = pad_sequence(
        [torch.ones(len(rows[i]["rejected_tokens"]), dtype=torch.bool) for i in ids], batch_first=True
    )
    p.chosen_token_ids = pad_sequence(
        [rows[i]["chosen_token_ids"] for i in ids], batch_first=True, padding_value=-1
    )
    p.rejected_token_ids = pad_sequence(
        [rows[i]["rejected_token_ids"] for i in ids], batch_first=True, padding_value=-1
    )
    if "chosen_log_sum_sq" in rows[ids[0]]:  # WPO's weight (use_weighting)
        p.chosen_log_sum_sq, p.rejected_log_sum_sq = (
            pad("chosen_log_sum_sq", rows),
            pad("rejected_log_sum_sq", rows),
        )
    if "chosen_mask_logits" in rows[ids[0]]:
        p.chosen_mask_logits = pad("chosen_mask_logits", rows)
        p.rejected_mask_logits = pad("rejected_mask_logits", rows)


def eval_columns(
    rows: dict[int, dict[str, Any]],
    ref: dict[int, dict[str, Any]],
    loss_fn: LossFn,
    *,
    needs_tokens: bool,
    needs_grad_norms: bool,
    loss_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """Per-pair eval columns (STAT_COLS but tokens), with the loss and margin weights of the configured loss.

    `normalized` needs per-sequence gradients, which an evaluation does not compute: its eval loss is DPO's
    with the same beta (and logged as loss/dpo too, the key its train rows use).
    """
    ids = sorted(rows)

    def col(key: str, src: dict[int, dict[str, Any]] = rows) -> Any:
        return torch.tensor([src[i][key] for i in ids], dtype=torch.float64)

    p = PairLogps(
        chosen=col("chosen"),
        rejected=col("rejected"),
        ref_chosen=col("chosen", ref),
        ref_rejected=col("rejected", ref),
        chosen_len=col("chosen_len"),
        rejected_len=col("rejected_len"),
    )
    if needs_tokens:
        _fill_tokens(p, ids, rows, ref)
    if needs_grad_norms:
        loss_fn = _dpo_beside(loss_kwargs)
    with torch.no_grad():
        loss = loss_fn(p).double()
    d_w, d_l = margin_weights(loss_fn, p)
    nan = torch.full_like(p.chosen, float("nan"))
    return {
        "pair_id": torch.tensor(ids, dtype=torch.float64),
        "chosen": p.chosen,
        "rejected": p.rejected,
        "ref_chosen": p.ref_chosen,
        "ref_rejected": p.ref_rejected,
        "chosen_len": p.chosen_len,
        "rejected_len": p.rejected_len,
        "loss": loss,
        "d_w": d_w.double(),
        "d_l": d_l.double(),
        "loss_dpo": loss if needs_grad_norms else nan,
    }


def pair_rows(
    step: int, split: str, scored: dict[int, dict[str, Any]], ref: dict[int, dict[str, Any]]
) -> list[dict[str, Any]]:
    """pairs.parquet rows of one evaluation of a split: each pair's log-probs beside its reference."""
    return [
        {"step": step, "split": split, "pair_id": int(pid), "chosen": scored[pid]["chosen"],
         "rejected": scored[pid]["rejected"], "ref_chosen": ref[pid]["chosen"],
         "ref_rejected": ref[pid]["rejected"], "chosen_len": scored[pid]["chosen_len"],
         "rejected_len": scored[pid]["rejected_len"]}
        for pid in sorted(scored)
    ]  # fmt: skip


def eval_line(step: int, m: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """One line per evaluation for the console or a job's log (the row itself is in metrics.jsonl)."""
    n = max(1, len(rows))
    d_c = sum(r["chosen"] - r["ref_chosen"] for r in rows) / n
    d_r = sum(r["rejected"] - r["ref_rejected"] for r in rows) / n
    return (
        f"eval step {step}: loss {m['loss']:.4f} | accuracy {m['rewards/accuracies']:.0%} | "
        f"margin {m['rewards/margins']:+.4g} | chosen {m['logps/chosen']:.2f} ({d_c:+.3g}) "
        f"rejected {m['logps/rejected']:.2f} ({d_r:+.3g}) nats | chosen fell {m['frac_chosen_fell']:.0%}"
    )
