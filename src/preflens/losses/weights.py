"""The margin weights of any registered loss: d_w = -dl/d chosen and d_l = dl/d rejected, by autograd.

Why autograd: every loss sees only `PairLogps`, so its weights on the two log-prob gradients come from a
backward pass over [B]-sized tensors, the same code for every loss (no per-loss derivative to keep in sync).
They are the d_w, d_l of the first-order analysis of Yuan et al. 2024 (arXiv 2410.13828, Sec. 3), used by
`preflens.diagnostics.entanglement` and `preflens.diagnostics.imbalance` and logged by the trainer.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import Tensor

from preflens.logprobs import PairLogps
from preflens.losses.registry import LossFn

__all__ = ["margin_weights"]


def margin_weights(loss_fn: LossFn, p: PairLogps) -> tuple[Tensor, Tensor]:
    """d_w = -dl/d chosen and d_l = dl/d rejected per pair, by autograd on PairLogps alone.

    Yuan et al. 2024 (arXiv 2410.13828), Sec. 3: one gradient step moves chosen by
    eta (d_w |g_w|^2 - d_l <g_w, g_l>) and rejected by eta (d_w <g_w, g_l> - d_l |g_l|^2) (see
    `preflens.diagnostics.entanglement.first_order_change`); d_w, d_l are the loss's weights on the two
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
