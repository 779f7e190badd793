"""Gradient imbalance between the chosen and the rejected response.

Ma et al. 2025, "Gradient Imbalance in Direct Preference Optimization" (arXiv 2502.20847), Eq. 2: for DPO,
dL/dpi(y_w) : dL/dpi(y_l) = -pi(y_l) / pi(y_w): once the chosen response is more likely than the
rejected one, the *rejected* side gets the larger gradient and DPO mostly pushes probability down.

For any loss of the registry the ratio follows from the margin weights (autograd on `PairLogps`):
with d_w = -dl/d log pi_w and d_l = dl/d log pi_l, and d log pi / d pi = 1/pi,

    |dL/dpi_w| / |dL/dpi_l| = (|d_w| / pi_w) / (|d_l| / pi_l),
    log ratio = log|d_w| - log|d_l| + log pi_l - log pi_w.

Sequence probabilities are tiny (log-probs of -100 are common), so the ratio is computed and stored
in log space; `ratio` is its exp and may be inf. Balanced-DPO's weight (Ma et al. 2025, Sec. 5)
lambda_w = log pi_l / (log pi_w + log pi_l) is `preflens.losses.balanced.balanced_dpo_lambda`, the one
copy the `bdpo` loss also uses.

One owner per quantity: `imbalance_from_margin_weights` is the only place the log-ratio is computed
(`gradient_imbalance` here, the probe set and the trainer's `imbalance/*` keys all go through it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from preflens.logprobs import PairLogps
from preflens.losses.balanced import balanced_dpo_lambda
from preflens.losses.registry import LossFn
from preflens.losses.weights import margin_weights

__all__ = [
    "ImbalanceStats",
    "gradient_imbalance",
    "imbalance_from_margin_weights",
    "balanced_dpo_lambda",
    "imbalance_metrics",
]


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


def imbalance_from_margin_weights(
    d_w: Tensor, d_l: Tensor, chosen: Tensor, rejected: Tensor
) -> ImbalanceStats:
    """The imbalance of each pair from its margin weights and summed log-probs (all [B], one dtype).

    log_ratio = log|d_w| - log|d_l| + (rejected - chosen) (Ma et al. 2025, arXiv 2502.20847, Eq. 2 for
    any loss), NaN where both weights are 0; ratio = exp(log_ratio); lambda_w = Balanced-DPO's weight.
    Computed in the dtype of the inputs, which are used as given (`d_w`, `d_l` are stored unchanged):
    the trainer passes its float64 per-pair columns, `gradient_imbalance` float64 copies.
    """
    dw, dl = d_w.abs(), d_l.abs()
    with torch.no_grad():
        log_ratio = torch.log(dw) - torch.log(dl) + (rejected - chosen)
        log_ratio = torch.where((dw == 0) & (dl == 0), torch.full_like(log_ratio, math.nan), log_ratio)
        lam = balanced_dpo_lambda(chosen, rejected)
    return ImbalanceStats(log_ratio=log_ratio, ratio=log_ratio.exp(), lambda_w=lam, d_w=d_w, d_l=d_l)


def gradient_imbalance(loss_fn: LossFn, p: PairLogps) -> ImbalanceStats:
    """The imbalance ratio |dL/dpi(y_w)| / |dL/dpi(y_l)| per pair, for any loss in the registry.

    Computed in float64 (log-probs of long responses lose the ratio in float32), stored as float32;
    `d_w`, `d_l` are the margin weights in the log-probs' dtype.
    """
    d_w, d_l = margin_weights(loss_fn, p)
    s = imbalance_from_margin_weights(
        d_w.double(), d_l.double(), p.chosen.detach().double(), p.rejected.detach().double()
    )
    return ImbalanceStats(
        log_ratio=s.log_ratio.float(), ratio=s.ratio.float(), lambda_w=s.lambda_w.float(), d_w=d_w, d_l=d_l
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
