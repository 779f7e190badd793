"""The margin-based preference-optimization loss family.

Every loss here is a function of per-sequence statistics only (`PairLogps`): summed policy
log-probs of the chosen and rejected responses, the reference model's, and the response lengths.
That is the design choice the whole package rests on: because the loss sees only these numbers,
the *margin weights* d_w = -dl/d chosen and d_l = dl/d rejected of any loss come from autograd on a
[B]-sized tensor (`margin_weights`), and the gradient-entanglement analysis of seed 000 applies to
every loss in the registry without a special case.

Sources (seeds in DESIGN.md):
- seed 000: Yuan et al., "A Common Pitfall of Margin-based Language Model Alignment: Gradient
  Entanglement" (arXiv 2410.13828). Its Table 1 lists the margin-based losses below (DPO, IPO,
  SimPO, CPO, SLiC-HF, RRHF, DPOP, R-DPO, SPPO) in the form "-log sigma(margin)" or a hinge/square,
  Sec. 3 derives the update of chosen/rejected log-probs, Sec. 5 proposes normalized and sparse PO.
- seed 003: Razin et al., "Unintentional Unalignment: Likelihood Displacement in DPO"
  (arXiv 2410.08847): DPO with an SFT term on the chosen response (`rpo`) as a mitigation baseline.
- seed 004: "Gradient Imbalance in Direct Preference Optimization" (arXiv 2502.20847):
  Balanced-DPO (`bdpo`, its Eq. for lambda_w) and naive Balanced-DPO (`nbdpo`).

The original papers: DPO (Rafailov et al. 2023, Eq. 7), IPO (Azar et al. 2023, Eq. 17),
SimPO (Meng et al. 2024, Eq. 6), CPO (Xu et al. 2024, Eq. 3-4), SLiC-HF (Zhao et al. 2023, Eq. 1),
RRHF (Yuan et al. 2023, Eq. 2-3), DPOP (Pal et al. 2024, Eq. 3), R-DPO (Park et al. 2024, Eq. 9),
SPPO (Wu et al. 2024, Eq. 4.7, hard-label form).

The formulas are DESIGN.md's table, which is the contract; where a paper or TRL writes a variant
differently, the variant is an option documented on the function.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from preflens.errors import PreflensError
from preflens.logprobs import PairLogps

__all__ = ["PairLogps", "LOSSES", "get_loss", "register_loss", "loss_hparams", "margin_weights", "LossFn"]


LossFn = Callable[[PairLogps], Tensor]
LOSSES: dict[str, Callable[..., Tensor]] = {}
"""Registry: name -> loss function `f(p: PairLogps, **hparams) -> Tensor[B]`. Use `get_loss` to bind hparams."""


def register_loss(name: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator adding a loss to `LOSSES`; its keyword arguments (with defaults) are its hparams."""

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in LOSSES:
            raise ValueError(f"loss '{name}' registered twice")
        LOSSES[name] = fn
        return fn

    return deco


def loss_hparams(name: str) -> dict[str, Any]:
    """The hyper-parameters of a loss and their defaults."""
    fn = _lookup(name)
    sig = inspect.signature(fn)
    return {
        k: v.default for k, v in list(sig.parameters.items())[1:] if v.default is not inspect.Parameter.empty
    }


def _lookup(name: str) -> Callable[..., Tensor]:
    if name not in LOSSES:
        raise PreflensError(f"unknown loss '{name}'; available: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def get_loss(name: str, **hparams: Any) -> LossFn:
    """Bind a registered loss to its hyper-parameters: returns `fn(p: PairLogps) -> Tensor[B]`.

    Unknown hyper-parameter names are an error (a typo would otherwise silently use a default).
    """
    fn = _lookup(name)
    allowed = loss_hparams(name)
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise PreflensError(
            f"loss '{name}' has no hyper-parameter(s) {unknown}; its hyper-parameters are "
            + (", ".join(f"{k}={v!r}" for k, v in allowed.items()) or "none")
        )
    bound = {**allowed, **hparams}

    def loss_fn(p: PairLogps) -> Tensor:
        return fn(p, **bound)

    loss_fn.__name__ = f"{name}_loss"
    loss_fn.loss_name = name  # type: ignore[attr-defined]
    loss_fn.hparams = dict(bound)  # type: ignore[attr-defined]
    return loss_fn


def margin_weights(loss_fn: LossFn, p: PairLogps) -> tuple[Tensor, Tensor]:
    """d_w = -dl/d chosen and d_l = dl/d rejected per pair, by autograd on PairLogps alone.

    Seed 000, Sec. 3: one gradient step moves chosen by eta (d_w |g_w|^2 - d_l <g_w, g_l>) and
    rejected by eta (d_w <g_w, g_l> - d_l |g_l|^2); d_w, d_l are the loss's weights on the two
    log-prob gradients. Cheap: the graph is over [B]-sized tensors only.

    Token-level losses (`sparse`) read the per-token log-probs, not the sums: their weight on response
    token t is dl/d l_t, and the sequence-level weight returned is its mean over the response tokens
    (for sparse PO with every token masked in, exactly DPO's beta sigma(-beta m)). The sequence-level
    first-order prediction is then an approximation; the per-token weights are what the update uses.
    """

    def prep(x: Tensor) -> Tensor:
        x = x.detach()
        return x.double() if x.is_floating_point() else x

    with torch.enable_grad():
        values = {
            f.name: prep(getattr(p, f.name)) for f in fields(p) if isinstance(getattr(p, f.name), Tensor)
        }
        wrt = ["chosen", "rejected"]
        if p.chosen_tokens is not None and p.rejected_tokens is not None:
            wrt += ["chosen_tokens", "rejected_tokens"]
        for name in wrt:
            values[name] = values[name].requires_grad_(True)
        loss = loss_fn(p.replace(**values)).sum()
        grads = dict(zip(wrt, torch.autograd.grad(loss, [values[n] for n in wrt], allow_unused=True)))
    zeros = torch.zeros_like(values["chosen"])
    d_chosen = grads["chosen"] if grads["chosen"] is not None else zeros
    d_rejected = grads["rejected"] if grads["rejected"] is not None else zeros
    if grads.get("chosen_tokens") is not None or grads.get("rejected_tokens") is not None:
        mw = p.chosen_mask.double() if p.chosen_mask is not None else torch.ones_like(values["chosen_tokens"])
        ml = (
            p.rejected_mask.double()
            if p.rejected_mask is not None
            else torch.ones_like(values["rejected_tokens"])
        )
        for key, mask, acc in (("chosen_tokens", mw, "w"), ("rejected_tokens", ml, "l")):
            g = grads.get(key)
            if g is None:
                continue
            mean = (g * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            if acc == "w":
                d_chosen = d_chosen + mean
            else:
                d_rejected = d_rejected + mean
    return (-d_chosen).to(p.chosen.dtype).detach(), d_rejected.to(p.chosen.dtype).detach()


# --------------------------------------------------------------------------------------------
# helpers


def _rewards(p: PairLogps, loss: str) -> tuple[Tensor, Tensor]:
    """Implicit rewards without beta: r_w = chosen - ref_chosen, r_l = rejected - ref_rejected."""
    p.require("ref_chosen", "ref_rejected", loss=loss)
    return p.chosen - p.ref_chosen, p.rejected - p.ref_rejected  # type: ignore[operator]


def _lens(p: PairLogps, loss: str) -> tuple[Tensor, Tensor]:
    p.require("chosen_len", "rejected_len", loss=loss)
    n_w = p.chosen_len.to(p.chosen.dtype)  # type: ignore[union-attr]
    n_l = p.rejected_len.to(p.rejected.dtype)  # type: ignore[union-attr]
    if bool((n_w <= 0).any()) or bool((n_l <= 0).any()):
        raise PreflensError(f"loss '{loss}' needs response lengths >= 1; got a zero-length response")
    return n_w, n_l


# --------------------------------------------------------------------------------------------
# the table


@register_loss("dpo")
def dpo(p: PairLogps, beta: float = 0.1) -> Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7; seed 000 Table 1): -log sigma(beta (r_w - r_l))."""
    r_w, r_l = _rewards(p, "dpo")
    return -F.logsigmoid(beta * (r_w - r_l))


@register_loss("ipo")
def ipo(p: PairLogps, beta: float = 0.1, length_normalize: bool = True) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17; seed 000 Table 1): ((r_w/n_w - r_l/n_l) - 1/(2 beta))^2.

    `beta` plays the role of IPO's tau. Length-averaged as TRL and the IPO authors' implementation do;
    `length_normalize=False` gives the un-averaged form (r_w - r_l - 1/(2 beta))^2 that Razin et al.'s
    code uses (DESIGN.md, reference settings).
    """
    r_w, r_l = _rewards(p, "ipo")
    if length_normalize:
        n_w, n_l = _lens(p, "ipo")
        h = r_w / n_w - r_l / n_l
    else:
        h = r_w - r_l
    return (h - 1.0 / (2.0 * beta)) ** 2


@register_loss("simpo")
def simpo(p: PairLogps, beta: float = 2.0, gamma: float = 1.0) -> Tensor:
    """SimPO (Meng et al. 2024, Eq. 6; seed 000 Table 1), reference-free:
    -log sigma(beta (chosen/n_w - rejected/n_l) - gamma)."""
    n_w, n_l = _lens(p, "simpo")
    return -F.logsigmoid(beta * (p.chosen / n_w - p.rejected / n_l) - gamma)


@register_loss("cpo")
def cpo(p: PairLogps, beta: float = 0.1, alpha: float = 1.0) -> Tensor:
    """CPO (Xu et al. 2024, Eq. 3-4; seed 000 Table 1): -log sigma(beta (chosen - rejected)) - alpha chosen/n_w.

    The second term is the length-averaged NLL of the chosen response (behaviour cloning regularizer).
    """
    n_w, _ = _lens(p, "cpo")
    return -F.logsigmoid(beta * (p.chosen - p.rejected)) - alpha * p.chosen / n_w


@register_loss("slic")
def slic(p: PairLogps, delta: float = 1.0, lam: float = 0.1) -> Tensor:
    """SLiC-HF (Zhao et al. 2023, Eq. 1; seed 000 Table 1): max(0, delta - (chosen - rejected)) - lam chosen/n_w."""
    n_w, _ = _lens(p, "slic")
    return torch.clamp(delta - (p.chosen - p.rejected), min=0.0) - lam * p.chosen / n_w


@register_loss("rrhf")
def rrhf(p: PairLogps, lam: float = 1.0) -> Tensor:
    """RRHF (Yuan et al. 2023, Eq. 2-3; seed 000 Table 1) for one pair:
    max(0, rejected/n_l - chosen/n_w) - lam chosen/n_w (length-normalized ranking hinge plus SFT)."""
    n_w, n_l = _lens(p, "rrhf")
    return torch.clamp(p.rejected / n_l - p.chosen / n_w, min=0.0) - lam * p.chosen / n_w


@register_loss("dpop")
def dpop(p: PairLogps, beta: float = 0.1, lam: float = 50.0) -> Tensor:
    """DPOP / DPO-Positive (Pal et al. 2024, Eq. 3; seed 000 Table 1):
    -log sigma(beta (r_w - r_l - lam max(0, ref_chosen - chosen))): penalizes the chosen log-prob
    falling below the reference's, the likelihood-displacement failure."""
    r_w, r_l = _rewards(p, "dpop")
    penalty = torch.clamp(p.ref_chosen - p.chosen, min=0.0)  # type: ignore[operator]
    return -F.logsigmoid(beta * (r_w - r_l - lam * penalty))


@register_loss("rdpo")
def rdpo(p: PairLogps, beta: float = 0.1, alpha: float = 0.01) -> Tensor:
    """R-DPO (Park et al. 2024, Eq. 9; seed 000 Table 1): -log sigma(beta (r_w - r_l) - alpha (n_w - n_l)).

    Sign of alpha as in Park et al. (a longer chosen response is penalized). The gradient-entanglement
    authors' code uses the opposite sign: pass a negative `alpha` for that variant.
    """
    r_w, r_l = _rewards(p, "rdpo")
    n_w, n_l = _lens(p, "rdpo")
    return -F.logsigmoid(beta * (r_w - r_l) - alpha * (n_w - n_l))


@register_loss("sppo")
def sppo(p: PairLogps, beta: float = 0.1) -> Tensor:
    """SPPO, hard-label form (Wu et al. 2024, Eq. 4.7 with P(y_w > y_l) = 1; seed 000 Table 1):
    (r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2. Not margin-based: chosen and rejected have separate
    targets, so their changes are not entangled through the margin (seed 000, Sec. 4).
    The entanglement authors' code halves this; the table's (unhalved) form is kept."""
    r_w, r_l = _rewards(p, "sppo")
    t = 1.0 / (2.0 * beta)
    return (r_w - t) ** 2 + (r_l + t) ** 2


@register_loss("rpo")
def rpo(p: PairLogps, beta: float = 0.1, alpha: float = 1.0) -> Tensor:
    """DPO plus an SFT term on the chosen response (seed 003's baseline mitigation; Pang et al. 2024):
    -log sigma(beta (r_w - r_l)) - alpha chosen/n_w."""
    n_w, _ = _lens(p, "rpo")
    return dpo(p, beta=beta) - alpha * p.chosen / n_w


@register_loss("bdpo")
def bdpo(p: PairLogps, beta: float = 1.0) -> Tensor:
    """Balanced-DPO (seed 004, Sec. 5, its lambda_w equation):
    -log sigma(beta (lambda_w r_w - (1 - lambda_w) r_l)), lambda_w = rejected / (chosen + rejected)
    computed from the policy log-probs and detached (no gradient through lambda).

    With log-probs l_w, l_l < 0: dL/d l_w : dL/d l_l = -lambda_w : (1 - lambda_w) = -l_l : l_w, and since
    dl/dpi = 1/pi, dL/dpi_w : dL/dpi_l = -pi_l log pi_l / (pi_w log pi_w), the paper's balanced ratio.
    """
    r_w, r_l = _rewards(p, "bdpo")
    denom = (p.chosen + p.rejected).detach()
    # Both log-probs are <= 0, so denom < 0 unless both are exactly 0 (probability 1): then the pair
    # carries no imbalance and lambda_w = 1/2 (plain DPO up to a factor).
    safe = torch.where(denom == 0, torch.ones_like(denom), denom)
    lam_w = torch.where(denom == 0, torch.full_like(denom, 0.5), p.rejected.detach() / safe)
    return -F.logsigmoid(beta * (lam_w * r_w - (1.0 - lam_w) * r_l))


@register_loss("nbdpo")
def nbdpo(p: PairLogps, beta: float = 1.0, clip: float = 0.3, symmetric: bool = False) -> Tensor:
    """Naive Balanced-DPO (seed 004, Sec. 5): -log sigma(beta (lambda r_w - r_l)),
    lambda = 1 + clip(chosen - rejected, d_min, clip), detached.

    `symmetric=True`: d_min = 1/(1+clip) - 1 (lambda may also shrink); else d_min = 0 (only the chosen
    side is amplified; the paper found the symmetric form unstable on real data).
    """
    r_w, r_l = _rewards(p, "nbdpo")
    d_min = 1.0 / (1.0 + clip) - 1.0 if symmetric else 0.0
    lam = 1.0 + torch.clamp((p.chosen - p.rejected).detach(), min=d_min, max=clip)
    return -F.logsigmoid(beta * (lam * r_w - r_l))


@register_loss("normalized")
def normalized(p: PairLogps, beta: float = 0.1) -> Tensor:
    """Pairwise normalized gradient descent (seed 000, Sec. 5.1): the surrogate
    c (rejected / |g_l| - chosen / |g_w|), c = beta sigma(-beta (r_w - r_l)) (DPO's weight), with c and
    the per-sequence gradient norms |g_w|, |g_l| (`chosen_grad_norm`, `rejected_grad_norm`, from
    `preflens.diagnostics.gram.sequence_grad_norms`) all detached.

    Its descent direction is c (g_w/|g_w| - g_l/|g_l|), so to first order a step of size eta moves
    chosen by eta c |g_w| (1 - cos) >= 0 and rejected by eta c |g_l| (cos - 1) <= 0 for every pair,
    whatever the entanglement (cos = cosine of g_w, g_l). The value is a surrogate, not a likelihood:
    log the DPO loss beside it.
    """
    p.require("chosen_grad_norm", "rejected_grad_norm", loss="normalized")
    r_w, r_l = _rewards(p, "normalized")
    c = (beta * torch.sigmoid(-beta * (r_w - r_l))).detach()
    n_w = p.chosen_grad_norm.detach().to(p.chosen.dtype).clamp_min(1e-12)  # type: ignore[union-attr]
    n_l = p.rejected_grad_norm.detach().to(p.rejected.dtype).clamp_min(1e-12)  # type: ignore[union-attr]
    return c * (p.rejected / n_l - p.chosen / n_w)


# --------------------------------------------------------------------------------------------
# token level


def diff_token_mask(
    chosen_ids: Tensor, chosen_mask: Tensor, rejected_ids: Tensor, rejected_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """The `diff` mask of sparse PO (seed 000, Sec. 5.2): response positions where the chosen and
    rejected tokens differ. Positions past the shorter response count as different. Left-aligned
    [B, L_w] and [B, L_l] float masks, zero on padding.
    """
    L = max(chosen_ids.shape[1], rejected_ids.shape[1])

    def pad(x: Tensor, value: int) -> Tensor:
        return F.pad(x, (0, L - x.shape[1]), value=value)

    cw, mw = pad(chosen_ids, -1), pad(chosen_mask.long(), 0).bool()
    cl, ml = pad(rejected_ids, -2), pad(rejected_mask.long(), 0).bool()
    both = mw & ml
    same = both & (cw == cl)
    diff = ~same
    m_w = (diff & mw)[:, : chosen_ids.shape[1]]
    m_l = (diff & ml)[:, : rejected_ids.shape[1]]
    return m_w.to(torch.get_default_dtype()), m_l.to(torch.get_default_dtype())


@register_loss("sparse")
def sparse(p: PairLogps, beta: float = 0.1, mask: str = "diff", l1: float = 0.01) -> Tensor:
    """Sparse / token-masked preference optimization (seed 000, Sec. 5.2): the DPO margin over masked
    token log-ratios, -log sigma(beta (sum_t m_w,t (l_w,t - l^ref_w,t) - sum_t m_l,t (l_l,t - l^ref_l,t))).

    mask="diff": m marks response positions where the chosen and rejected tokens differ (shared tokens,
    which carry the positive part of the gradient inner product, are left out; positions past the
    shorter response count as different). mask="learned": m = sigmoid(mask logits) from a learned
    token-mask head (SparsePO-style, Christopoulou et al. 2024), plus l1 * mean mask value as a
    sparsity penalty.
    """
    p.require(
        "chosen_tokens",
        "rejected_tokens",
        "ref_chosen_tokens",
        "ref_rejected_tokens",
        "chosen_mask",
        "rejected_mask",
        loss="sparse",
    )
    if mask == "diff":
        p.require("chosen_token_ids", "rejected_token_ids", loss="sparse")
        m_w, m_l = diff_token_mask(p.chosen_token_ids, p.chosen_mask, p.rejected_token_ids, p.rejected_mask)  # type: ignore[arg-type]
        m_w, m_l = m_w.to(p.chosen_tokens.dtype), m_l.to(p.rejected_tokens.dtype)  # type: ignore[union-attr]
        penalty = torch.zeros_like(p.chosen)
    elif mask == "learned":
        p.require("chosen_mask_logits", "rejected_mask_logits", loss="sparse")
        vw, vl = p.chosen_mask.to(p.chosen.dtype), p.rejected_mask.to(p.rejected.dtype)  # type: ignore[union-attr]
        m_w = torch.sigmoid(p.chosen_mask_logits) * vw  # type: ignore[arg-type]
        m_l = torch.sigmoid(p.rejected_mask_logits) * vl  # type: ignore[arg-type]
        n = vw.sum(-1) + vl.sum(-1)
        penalty = l1 * (m_w.sum(-1) + m_l.sum(-1)) / n.clamp(min=1)
    else:
        raise PreflensError(f"loss 'sparse': mask must be 'diff' or 'learned', got {mask!r}")
    vw, vl = p.chosen_mask.to(m_w.dtype), p.rejected_mask.to(m_l.dtype)  # type: ignore[union-attr]
    r_w = ((p.chosen_tokens - p.ref_chosen_tokens) * m_w * vw).sum(-1)  # type: ignore[operator]
    r_l = ((p.rejected_tokens - p.ref_rejected_tokens) * m_l * vl).sum(-1)  # type: ignore[operator]
    return -F.logsigmoid(beta * (r_w - r_l)) + penalty


TOKEN_LEVEL_LOSSES = frozenset({"sparse"})
"""Losses that need per-token log-probs of policy and reference."""

REFERENCE_FREE_LOSSES = frozenset({"simpo", "cpo", "slic", "rrhf"})
"""Losses that never read the reference log-probs (no reference pass is needed)."""
