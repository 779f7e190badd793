"""Balanced losses: DPO with the chosen and rejected rewards re-weighted against gradient imbalance.

Ma et al. 2025, "Gradient Imbalance in Direct Preference Optimization" (arXiv 2502.20847): for DPO,
dL/dpi(y_w) : dL/dpi(y_l) = -pi(y_l) / pi(y_w) (Eq. 2), so once the chosen response is the likelier one
the rejected side gets the larger gradient. Sec. 5 re-weights the two rewards to balance it.

This module owns Balanced-DPO's weight `balanced_dpo_lambda`: the loss `bdpo` and the imbalance
diagnostic (`preflens.diagnostics.imbalance`, the trainer's `imbalance/lambda_w`) all call it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from preflens.logprobs import PairLogps
from preflens.losses.registry import register_loss
from preflens.losses.terms import implicit_rewards

__all__ = ["balanced_dpo_lambda", "bdpo", "nbdpo"]


def balanced_dpo_lambda(chosen: Tensor, rejected: Tensor) -> Tensor:
    """lambda_w = log pi_l / (log pi_w + log pi_l) (Ma et al. 2025, arXiv 2502.20847, Sec. 5), 1/2 where
    the denominator is 0.

    Both log-probs are <= 0, so the denominator is < 0 unless both are exactly 0 (probability 1): then
    the pair carries no imbalance and lambda_w = 1/2 (plain DPO up to a factor). No detach here: callers
    pass detached log-probs when lambda must carry no gradient (as `bdpo` does).
    """
    denom = chosen + rejected
    safe = torch.where(denom == 0, torch.ones_like(denom), denom)
    return torch.where(denom == 0, torch.full_like(denom, 0.5), rejected / safe)


@register_loss("bdpo")
def bdpo(p: PairLogps, beta: float = 1.0) -> Tensor:
    """Balanced-DPO: -log sigma(beta (lambda_w r_w - (1 - lambda_w) r_l)), lambda_w = rejected / (chosen +
    rejected) from the policy log-probs, detached (no gradient through lambda).

    Ma et al. 2025, "Gradient Imbalance in Direct Preference Optimization" (arXiv 2502.20847), Sec. 5,
    its lambda_w equation. With log-probs l_w, l_l < 0: dL/d l_w : dL/d l_l = -lambda_w : (1 - lambda_w)
    = -l_l : l_w, and since dl/dpi = 1/pi, dL/dpi_w : dL/dpi_l = -pi_l log pi_l / (pi_w log pi_w), the
    paper's balanced ratio.
    """
    r_w, r_l = implicit_rewards(p, "bdpo")
    lam_w = balanced_dpo_lambda(p.chosen.detach(), p.rejected.detach())
    return -F.logsigmoid(beta * (lam_w * r_w - (1.0 - lam_w) * r_l))


@register_loss("nbdpo")
def nbdpo(p: PairLogps, beta: float = 1.0, clip: float = 0.3, symmetric: bool = False) -> Tensor:
    """Naive Balanced-DPO: -log sigma(beta (lambda r_w - r_l)), lambda = 1 + clip(chosen - rejected,
    d_min, clip), detached.

    Ma et al. 2025 (arXiv 2502.20847), Sec. 5. `symmetric=True`: d_min = 1/(1+clip) - 1 (lambda may also
    shrink); else d_min = 0 (only the chosen side is amplified; the paper found the symmetric form
    unstable on real data).
    """
    r_w, r_l = implicit_rewards(p, "nbdpo")
    d_min = 1.0 / (1.0 + clip) - 1.0 if symmetric else 0.0
    lam = 1.0 + torch.clamp((p.chosen - p.rejected).detach(), min=d_min, max=clip)
    return -F.logsigmoid(beta * (lam * r_w - r_l))
