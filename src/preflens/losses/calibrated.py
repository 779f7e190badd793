"""Follow-ups that target likelihood displacement: objectives that keep the chosen log-prob from falling.

Razin et al. 2024 ("Unintentional Unalignment: Likelihood Displacement in Direct Preference
Optimization", arXiv 2410.08847) show DPO can lower the chosen response's likelihood while it widens the
margin; the gradient-entanglement analysis of Yuan et al. 2024 (arXiv 2410.13828, Sec. 3) says why (the
margin moves chosen and rejected together). Each loss here changes the objective so chosen has a target
of its own or a smaller pull from the rejected side:
- `cal_dpo`   (Xiao et al., NeurIPS 2024): DPO plus squared calibration of each implicit reward;
- `simper`    (Xiao et al., ICLR 2025): inverse perplexity, no reference, no hyper-parameter;
- `dpo_shift` (Yang et al. 2025, arXiv 2502.07599): the rejected reward scaled by lam < 1;
- `chipo`     (Huang et al. 2024, arXiv 2407.13399): chi-squared regularization, link e^r + r.
Each is checked against its paper's formula written out in `tests/test_losses_followups.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from preflens.errors import PreflensError
from preflens.logprobs import PairLogps
from preflens.losses.registry import register_loss
from preflens.losses.terms import implicit_rewards, response_lengths

__all__ = ["cal_dpo", "simper", "dpo_shift", "chipo"]


@register_loss("cal_dpo")
def cal_dpo(p: PairLogps, beta: float = 0.1, calibration: float = 1.0) -> Tensor:
    """Cal-DPO: -log sigma(r_w - r_l) + calibration [(r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2].

    Xiao, Yuan, Zhu, Li, Honavar, "Cal-DPO: Calibrated Direct Preference Optimization for Language Model
    Alignment" (NeurIPS 2024, arXiv 2412.14516), its Cal-DPO objective (r = log pi/pi_ref, the implicit
    reward without beta): the contrastive term is DPO's with beta = 1, and the calibration term pins the chosen reward
    at +1/(2 beta) and the rejected at -1/(2 beta), so the chosen log-ratio has a positive target of its
    own (a rising chosen likelihood, against displacement). The authors' code (tengxiao1/Cal-DPO) weighs
    the calibration term by 1/2: `calibration=0.5`; it trains 7B models with beta 0.001-0.002.
    """
    r_w, r_l = implicit_rewards(p, "cal_dpo")
    t = 1.0 / (2.0 * beta)
    return -F.logsigmoid(r_w - r_l) + calibration * ((r_w - t) ** 2 + (r_l + t) ** 2)


@register_loss("simper", reference_free=True)
def simper(p: PairLogps) -> Tensor:
    """SimPER: -exp(chosen/n_w) + exp(rejected/n_l): minus the chosen response's inverse perplexity plus the
    rejected one's.

    Xiao, Yuan, Chen, Li, Zhu, Honavar, "SimPER: A Minimalist Approach to Preference Alignment without
    Hyperparameters" (ICLR 2025, arXiv 2502.00883), its SimPER objective. No reference model, no hyper-parameter. The
    gradient on each response is its inverse perplexity times its mean token gradient, so it is bounded
    and the rejected side's push fades as its perplexity grows (the paper's argument against DPO's
    rejected-dominated gradient, cf. Ma et al. 2025, arXiv 2502.20847).
    """
    n_w, n_l = response_lengths(p, "simper")
    return -torch.exp(p.chosen / n_w) + torch.exp(p.rejected / n_l)


@register_loss("dpo_shift")
def dpo_shift(p: PairLogps, beta: float = 0.1, lam: float = 0.95) -> Tensor:
    """DPO-Shift: -log sigma(beta r_w - lam beta r_l), lam = the paper's f(lambda) <= 1.

    Yang, Wang, Song, Li, Yang, "DPO-Shift: Shifting the Distribution of Direct Preference Optimization"
    (arXiv 2502.07599), its DPO-Shift objective with a fixed f(lambda). lam < 1 weakens the rejected reward's pull, which
    shifts the chosen log-prob up at some cost in reward margin; lam = 1 is DPO. The authors'
    `dpo_lambda` (Meaquadddd/DPO-Shift) also has linear schedules over the steps; a loss sees one batch,
    so only the fixed form is here (their runs use 0.5 to 0.99).
    """
    r_w, r_l = implicit_rewards(p, "dpo_shift")
    return -F.logsigmoid(beta * r_w - lam * beta * r_l)


@register_loss("chipo")
def chipo(p: PairLogps, beta: float = 0.1, r_max: float | None = None) -> Tensor:
    """chi-PO: -log sigma(clip_{2 r_max}(beta phi(pi/pi_ref)(y_w) - beta phi(pi/pi_ref)(y_l))), phi(z) = z + log z.

    Huang, Zhan, Xie, Lee, Sun, Sridharan, Foster, "Correcting the Mythos of KL-Regularization: Direct
    Alignment without Overoptimization via Chi-Squared Preference Optimization" (arXiv 2407.13399),
    Algorithm 1 (chi-PO): DPO with the link log z replaced by z + log z (chi-squared plus KL regularization),
    i.e. beta (e^r + r) per response, r = log pi/pi_ref. The e^r term penalizes a rising ratio more than
    the log does (pessimism against overoptimization). `r_max`: the clip at +-2 r_max of the paper's
    analysis (None: no clip). e^r is computed with r capped at 50 so float32 stays finite.
    """
    if r_max is not None and not r_max > 0:
        raise PreflensError(f"loss 'chipo': r_max must be > 0 (or None), got {r_max}")
    r_w, r_l = implicit_rewards(p, "chipo")

    def phi(r: Tensor) -> Tensor:
        return torch.exp(torch.clamp(r, max=50.0)) + r

    h = beta * (phi(r_w) - phi(r_l))
    if r_max is not None:
        h = torch.clamp(h, -2.0 * r_max, 2.0 * r_max)
    return -F.logsigmoid(h)
