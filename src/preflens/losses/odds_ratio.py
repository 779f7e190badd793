"""Odds-ratio and prospect-theory losses: ORPO (reference-free) and KTO's paired form.

ORPO: Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model" (arXiv
2403.07691), Eq. 4-7; TRL's `experimental.orpo.ORPOTrainer` and LLaMA-Factory's `orpo` implement it.
KTO: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization" (arXiv 2402.01306),
its KTO loss, in the paired form TRL's `DPOTrainer` shipped as `loss_type="kto_pair"` until v0.9 and
LLaMA-Factory as `kto_pair`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from preflens.logprobs import PairLogps
from preflens.losses.registry import register_loss
from preflens.losses.terms import implicit_rewards, response_lengths

__all__ = ["log1mexp", "orpo", "kto_pair"]


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, stable on both sides of -log 2 (Maechler 2012, "Accurately Computing
    log(1 - exp(-|a|))")."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@register_loss("orpo", reference_free=True)
def orpo(p: PairLogps, beta: float = 0.1, token_average: bool = False) -> Tensor:
    """ORPO: -chosen/n_w - beta log sigma(log odds(y_w) - log odds(y_l)), odds(y) = P(y) / (1 - P(y)) with
    P(y) = exp(mean token log-prob) (Hong et al. 2024, arXiv 2403.07691, Eq. 6-7; `beta` is the paper's
    lambda, TRL's and LLaMA-Factory's `beta`).

    No reference model: the NLL term keeps the chosen likelihood up while the odds ratio separates the
    pair. TRL's ORPO averages the NLL over all chosen tokens of the batch; per pair it is the mean over the
    pair's own tokens here (see `sft`); `token_average=True` gives TRL's batch NLL (expanded to [B]).
    """
    n_w, n_l = response_lengths(p, "orpo")
    a, b = p.chosen / n_w, p.rejected / n_l
    log_odds = (a - b) - (log1mexp(a) - log1mexp(b))
    nll = (-p.chosen.sum() / n_w.sum()).expand(a.shape[0]) if token_average else -a
    return nll - beta * F.logsigmoid(log_odds)


@register_loss("kto_pair")
def kto_pair(p: PairLogps, beta: float = 0.1) -> Tensor:
    """KTO on pairs: 1/2 [(1 - sigma(beta (r_w - z_l))) + (1 - sigma(beta (z_w - r_l)))], z_w = max(0, mean
    of r_w over the batch), z_l = max(0, mean of r_l), detached (Ethayarajh et al. 2024, arXiv 2402.01306,
    the KTO loss with lambda_D = lambda_U = 1; as TRL's former `kto_pair`, the chosen side's reference point is
    estimated from the rejected half and vice versa).

    The reference points are not differentiated, as the KTO paper prescribes (TRL's old `kto_pair` did
    back-propagate through them). They couple the batch: element i is pair i's two terms against the
    batch's reference points; the mean is the mean of TRL's 2B-vector.
    """
    r_w, r_l = implicit_rewards(p, "kto_pair")
    z_w = r_w.detach().mean().clamp(min=0)
    z_l = r_l.detach().mean().clamp(min=0)
    return 0.5 * ((1.0 - torch.sigmoid(beta * (r_w - z_l))) + (1.0 - torch.sigmoid(beta * (z_w - r_l))))
