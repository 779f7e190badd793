"""Gradient imbalance between the chosen and the rejected response (seed 004).

"Gradient Imbalance in Direct Preference Optimization" (arXiv 2502.20847), Eq. 2: for DPO,
dL/dpi(y_w) : dL/dpi(y_l) = -pi(y_l) / pi(y_w): once the chosen response is more likely than the
rejected one, the *rejected* side gets the larger gradient and DPO mostly pushes probability down.

For any loss of the registry the ratio follows from the margin weights (autograd on `PairLogps`):
with d_w = -dl/d log pi_w and d_l = dl/d log pi_l, and d log pi / d pi = 1/pi,

    |dL/dpi_w| / |dL/dpi_l| = (|d_w| / pi_w) / (|d_l| / pi_l),
    log ratio = log|d_w| - log|d_l| + log pi_l - log pi_w.

Sequence probabilities are tiny (log-probs of -100 are common), so the ratio is computed and stored
in log space; `ratio` is its exp and may be inf. Balanced-DPO's weight (seed 004, Sec. 5) is
lambda_w = log pi_l / (log pi_w + log pi_l).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from preflens.losses import LossFn, PairLogps, margin_weights

__all__ = ["ImbalanceStats", "gradient_imbalance", "balanced_dpo_lambda", "imbalance_metrics"]


@dataclass
class ImbalanceStats:
    """Per pair, shape [B]."""

    log_ratio: Tensor
    """log(|dL/dpi_w| / |dL/dpi_l|); NaN where both weights are 0 (saturated), +-inf where one is."""
    ratio: Tensor
    """exp(log_ratio) (inf where it overflows float)."""
    lambda_w: Tensor
    """Balanced-DPO's lambda_w = rejected / (chosen + rejected) (1/2 where both log-probs are 0)."""
    d_w: Tensor
    d_l: Tensor


def balanced_dpo_lambda(chosen: Tensor, rejected: Tensor) -> Tensor:
    """lambda_w = log pi_l / (log pi_w + log pi_l) (seed 004, Sec. 5), 1/2 where the denominator is 0."""
    denom = chosen + rejected
    safe = torch.where(denom == 0, torch.ones_like(denom), denom)
    return torch.where(denom == 0, torch.full_like(denom, 0.5), rejected / safe)


def gradient_imbalance(loss_fn: LossFn, p: PairLogps) -> ImbalanceStats:
    """The imbalance ratio |dL/dpi(y_w)| / |dL/dpi(y_l)| per pair, for any loss in the registry."""
    d_w, d_l = margin_weights(loss_fn, p)
    dw, dl = d_w.double().abs(), d_l.double().abs()
    with torch.no_grad():
        log_ratio = torch.log(dw) - torch.log(dl) + (p.rejected.double() - p.chosen.double())
        log_ratio = torch.where((dw == 0) & (dl == 0), torch.full_like(log_ratio, math.nan), log_ratio)
    return ImbalanceStats(
        log_ratio=log_ratio.float(),
        ratio=log_ratio.exp().float(),
        lambda_w=balanced_dpo_lambda(p.chosen.detach().double(), p.rejected.detach().double()).float(),
        d_w=d_w,
        d_l=d_l,
    )


def imbalance_metrics(stats: ImbalanceStats) -> dict[str, float]:
    """Batch aggregates for metrics.jsonl (ARCHITECTURE.md key `imbalance/ratio`).

    The median is taken in log space (the median of a monotone transform is the transform of the
    median), so an overflowing pair does not turn the batch value into inf or NaN. For an even
    count it is the mean of the two middle values (as pandas and numpy take it, so `preflens probe`
    and the report agree with these rows), not torch.median's lower middle value.
    """
    lr = stats.log_ratio[torch.isfinite(stats.log_ratio)]
    if lr.numel() == 0:
        return {"imbalance/ratio": math.nan, "imbalance/log_ratio": math.nan, "imbalance/lambda_w": math.nan}
    med = float(lr.double().quantile(0.5))
    return {
        "imbalance/ratio": math.exp(med) if med < 700 else math.inf,
        "imbalance/log_ratio": float(lr.mean()),
        "imbalance/lambda_w": float(stats.lambda_w.mean()),
    }
