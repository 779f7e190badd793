"""Margin-based losses: a function of the chosen-minus-rejected margin (plus, for some, an SFT term).

Yuan et al. 2024, "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement"
(arXiv 2410.13828), Table 1, lists these losses in the form "-log sigma(margin)" or a hinge/square; its
Sec. 3 shows that because each depends on the log-probs mainly through the margin, chosen and rejected
move together (gradient entanglement). The formulas are DESIGN.md's loss table, which is the contract;
where a paper or TRL writes a variant differently, the variant is an option documented on the function.

Notation: r_w = chosen - ref_chosen, r_l = rejected - ref_rejected (implicit rewards without beta),
n_w, n_l the response token counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from preflens.logprobs import PairLogps
from preflens.losses.registry import register_loss
from preflens.losses.terms import implicit_rewards, response_lengths

__all__ = ["dpo", "ipo", "simpo", "cpo", "slic", "rrhf", "dpop", "rdpo", "sppo", "rpo"]


@register_loss("dpo")
def dpo(p: PairLogps, beta: float = 0.1) -> Tensor:
    """DPO: -log sigma(beta (r_w - r_l)).

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
    Model" (arXiv 2305.18290), Eq. 7; Yuan et al. 2024 (arXiv 2410.13828), Table 1. Its margin weights
    are d_w = d_l = beta sigma(-beta (r_w - r_l)): the one loss whose two weights are always equal.
    """
    r_w, r_l = implicit_rewards(p, "dpo")
    return -F.logsigmoid(beta * (r_w - r_l))


@register_loss("ipo")
def ipo(p: PairLogps, beta: float = 0.1, length_normalize: bool = True) -> Tensor:
    """IPO: ((r_w/n_w - r_l/n_l) - 1/(2 beta))^2.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences"
    (arXiv 2310.12036), Eq. 17; Yuan et al. 2024 (arXiv 2410.13828), Table 1. `beta` plays the role of
    IPO's tau. Length-averaged as TRL and the IPO authors' implementation do; `length_normalize=False`
    gives the un-averaged form (r_w - r_l - 1/(2 beta))^2 that Razin et al.'s code uses (DESIGN.md,
    reference settings).
    """
    r_w, r_l = implicit_rewards(p, "ipo")
    if length_normalize:
        n_w, n_l = response_lengths(p, "ipo")
        h = r_w / n_w - r_l / n_l
    else:
        h = r_w - r_l
    return (h - 1.0 / (2.0 * beta)) ** 2


@register_loss("simpo", reference_free=True)
def simpo(p: PairLogps, beta: float = 2.0, gamma: float = 1.0) -> Tensor:
    """SimPO, reference-free: -log sigma(beta (chosen/n_w - rejected/n_l) - gamma).

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
    (arXiv 2405.14734), Eq. 6; Yuan et al. 2024 (arXiv 2410.13828), Table 1. The length-averaged
    log-prob is the reward, `gamma` the target reward margin.
    """
    n_w, n_l = response_lengths(p, "simpo")
    return -F.logsigmoid(beta * (p.chosen / n_w - p.rejected / n_l) - gamma)


@register_loss("cpo", reference_free=True)
def cpo(p: PairLogps, beta: float = 0.1, alpha: float = 1.0) -> Tensor:
    """CPO: -log sigma(beta (chosen - rejected)) - alpha chosen/n_w.

    Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in
    Machine Translation" (arXiv 2401.08417), Eq. 3-4; Yuan et al. 2024 (arXiv 2410.13828), Table 1.
    The second term is the length-averaged NLL of the chosen response (behaviour cloning regularizer).
    """
    n_w, _ = response_lengths(p, "cpo")
    return -F.logsigmoid(beta * (p.chosen - p.rejected)) - alpha * p.chosen / n_w


@register_loss("slic", reference_free=True)
def slic(p: PairLogps, delta: float = 1.0, lam: float = 0.1) -> Tensor:
    """SLiC-HF: max(0, delta - (chosen - rejected)) - lam chosen/n_w.

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback" (arXiv 2305.10425),
    Eq. 1; Yuan et al. 2024 (arXiv 2410.13828), Table 1. A rank-calibration hinge with margin `delta`
    plus a length-averaged SFT term on the chosen response.
    """
    n_w, _ = response_lengths(p, "slic")
    return torch.clamp(delta - (p.chosen - p.rejected), min=0.0) - lam * p.chosen / n_w


@register_loss("rrhf", reference_free=True)
def rrhf(p: PairLogps, lam: float = 1.0) -> Tensor:
    """RRHF for one pair: max(0, rejected/n_l - chosen/n_w) - lam chosen/n_w.

    Yuan et al. 2023, "RRHF: Rank Responses to Align Language Models with Human Feedback without tears"
    (arXiv 2304.05302), Eq. 2-3; Yuan et al. 2024 (arXiv 2410.13828), Table 1. A length-normalized
    ranking hinge plus SFT on the chosen response.
    """
    n_w, n_l = response_lengths(p, "rrhf")
    return torch.clamp(p.rejected / n_l - p.chosen / n_w, min=0.0) - lam * p.chosen / n_w


@register_loss("dpop")
def dpop(p: PairLogps, beta: float = 0.1, lam: float = 50.0) -> Tensor:
    """DPOP / DPO-Positive: -log sigma(beta (r_w - r_l - lam max(0, ref_chosen - chosen))).

    Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive"
    (arXiv 2402.13228), Eq. 3; Yuan et al. 2024 (arXiv 2410.13828), Table 1. The penalty fires when the
    chosen log-prob falls below the reference's, the likelihood-displacement failure.
    """
    r_w, r_l = implicit_rewards(p, "dpop")
    penalty = torch.clamp(p.ref_chosen - p.chosen, min=0.0)  # type: ignore[operator]
    return -F.logsigmoid(beta * (r_w - r_l - lam * penalty))


@register_loss("rdpo")
def rdpo(p: PairLogps, beta: float = 0.1, alpha: float = 0.01) -> Tensor:
    """R-DPO: -log sigma(beta (r_w - r_l) - alpha (n_w - n_l)).

    Park et al. 2024, "Disentangling Length from Quality in Direct Preference Optimization"
    (arXiv 2403.19159), Eq. 9; Yuan et al. 2024 (arXiv 2410.13828), Table 1. Sign of alpha as in Park
    et al. (a longer chosen response is penalized). The gradient-entanglement authors' code uses the
    opposite sign: pass a negative `alpha` for that variant.
    """
    r_w, r_l = implicit_rewards(p, "rdpo")
    n_w, n_l = response_lengths(p, "rdpo")
    return -F.logsigmoid(beta * (r_w - r_l) - alpha * (n_w - n_l))


@register_loss("sppo")
def sppo(p: PairLogps, beta: float = 0.1) -> Tensor:
    """SPPO, hard-label form: (r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2.

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment" (arXiv 2405.00675),
    Eq. 4.7 with P(y_w > y_l) = 1; Yuan et al. 2024 (arXiv 2410.13828), Table 1. Not margin-based:
    chosen and rejected have separate targets, so their changes are not entangled through the margin
    (Yuan et al. 2024, Sec. 4). The entanglement authors' code halves this; the table's (unhalved) form
    is kept.
    """
    r_w, r_l = implicit_rewards(p, "sppo")
    t = 1.0 / (2.0 * beta)
    return (r_w - t) ** 2 + (r_l + t) ** 2


@register_loss("rpo")
def rpo(p: PairLogps, beta: float = 0.1, alpha: float = 1.0) -> Tensor:
    """DPO plus an SFT term on the chosen response: -log sigma(beta (r_w - r_l)) - alpha chosen/n_w.

    Pang et al. 2024, "Iterative Reasoning Preference Optimization" (arXiv 2404.19733), its DPO+NLL
    loss with the NLL term length-averaged; the mitigation baseline of Razin et al. 2024, "Unintentional
    Unalignment: Likelihood Displacement in Direct Preference Optimization" (arXiv 2410.08847).
    """
    n_w, _ = response_lengths(p, "rpo")
    return dpo(p, beta=beta) - alpha * p.chosen / n_w
