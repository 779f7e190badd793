"""Token-level (sparse) preference optimization: the DPO margin over a masked subset of response tokens.

Yuan et al. 2024, "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement"
(arXiv 2410.13828), Sec. 5.2: the sentence-level inner product <g_w, g_l> is a sum of token-level ones,
and the tokens the two responses share carry most of its positive part; leaving them out of the margin
weakens the entanglement. The learned-mask variant follows SparsePO (Christopoulou et al. 2024,
"SparsePO: Controlling Preference Alignment of LLMs via Sparse Token Masks", arXiv 2410.05102).

Token-level losses read the per-token fields of `PairLogps`; they register with `token_level=True` so the
trainer keeps those fields (`preflens.losses.TOKEN_LEVEL_LOSSES`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from preflens.errors import PreflensError
from preflens.logprobs import PairLogps
from preflens.losses.registry import register_loss

__all__ = ["diff_token_mask", "sparse"]


def diff_token_mask(
    chosen_ids: Tensor, chosen_mask: Tensor, rejected_ids: Tensor, rejected_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """The `diff` mask of sparse PO (Yuan et al. 2024, arXiv 2410.13828, Sec. 5.2): response positions
    where the chosen and rejected tokens differ. Positions past the shorter response count as different.
    Left-aligned [B, L_w] and [B, L_l] float masks, zero on padding.
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


@register_loss("sparse", token_level=True)
def sparse(p: PairLogps, beta: float = 0.1, mask: str = "diff", l1: float = 0.01) -> Tensor:
    """Sparse / token-masked preference optimization: the DPO margin over masked token log-ratios,
    -log sigma(beta (sum_t m_w,t (l_w,t - l^ref_w,t) - sum_t m_l,t (l_l,t - l^ref_l,t))).

    Yuan et al. 2024 (arXiv 2410.13828), Sec. 5.2. mask="diff": m marks response positions where the
    chosen and rejected tokens differ (shared tokens, which carry the positive part of the gradient inner
    product, are left out; positions past the shorter response count as different). mask="learned":
    m = sigmoid(mask logits) from a learned token-mask head (Christopoulou et al. 2024, arXiv 2410.05102),
    plus l1 * mean mask value as a sparsity penalty.
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
