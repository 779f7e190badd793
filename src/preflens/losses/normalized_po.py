"""Normalized preference optimization: a step whose first-order effect raises chosen and lowers rejected
for every pair, whatever the gradient entanglement.

Yuan et al. 2024, "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement"
(arXiv 2410.13828), Sec. 5.1. The loss needs the per-sequence gradient norms |g_w|, |g_l|
(`PairLogps.chosen_grad_norm` / `rejected_grad_norm`, from the Gram pass of `preflens.grad`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from preflens.logprobs import PairLogps
from preflens.losses.registry import register_loss
from preflens.losses.terms import implicit_rewards

__all__ = ["normalized"]


@register_loss("normalized")
def normalized(p: PairLogps, beta: float = 0.1) -> Tensor:
    """Pairwise normalized gradient descent: the surrogate c (rejected / |g_l| - chosen / |g_w|),
    c = beta sigma(-beta (r_w - r_l)) (DPO's weight).

    Yuan et al. 2024 (arXiv 2410.13828), Sec. 5.1. c and the per-sequence gradient norms |g_w|, |g_l|
    (`chosen_grad_norm`, `rejected_grad_norm`, from `preflens.grad.sequence_grad_norms`) are
    all detached. Its descent direction is c (g_w/|g_w| - g_l/|g_l|), so to first order a step of size eta
    moves chosen by eta c |g_w| (1 - cos) >= 0 and rejected by eta c |g_l| (cos - 1) <= 0 for every pair,
    whatever the entanglement (cos = cosine of g_w, g_l). The value is a surrogate, not a likelihood:
    log the DPO loss beside it.
    """
    p.require("chosen_grad_norm", "rejected_grad_norm", loss="normalized")
    r_w, r_l = implicit_rewards(p, "normalized")
    c = (beta * torch.sigmoid(-beta * (r_w - r_l))).detach()
    n_w = p.chosen_grad_norm.detach().to(p.chosen.dtype).clamp_min(1e-12)  # type: ignore[union-attr]
    n_l = p.rejected_grad_norm.detach().to(p.rejected.dtype).clamp_min(1e-12)  # type: ignore[union-attr]
    return c * (p.rejected / n_l - p.chosen / n_w)
