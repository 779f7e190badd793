"""nn.Embedding: a Linear whose input rows are one-hot token ids.

The per-sequence gradient is sum_{r in s} onehot(id_r) dy_r^T: a one-hot `Outer` (ids, b = dy), so
the ghost form compares ids instead of multiplying rows, and a tied lm_head's dense part meets it
in the kernels' cross terms. Rows of the padding index get no gradient (as in torch). Subclasses
that return c * E[ids] (Gemma's scaled embedding) scale b by c; any other subclass is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from preflens.grad.errors import GramError
from preflens.grad.layout import SequenceRows
from preflens.grad.parts import Call, Outer, Part
from preflens.grad.rules.base import Rule, register_rule

__all__ = ["EmbeddingRule", "embedding_scale"]


def embedding_scale(m: nn.Module, ids: Tensor, out: Tensor) -> float:
    """c such that an nn.Embedding subclass's output is c * E[ids] (1.0 for nn.Embedding itself).

    Gemma's `*ScaledWordEmbedding` returns E[ids] * sqrt(d) from the embedding module itself, so the
    weight gradient is c * onehot^T dy, not onehot^T dy: ignoring c made Gemma's Gram 20-50% off. A
    subclass whose output is not a constant multiple of the lookup is refused.
    """
    if type(m).forward is nn.Embedding.forward:
        return 1.0
    with torch.no_grad():
        base = torch.nn.functional.embedding(ids, m.weight, m.padding_idx).float()  # type: ignore[arg-type]
        o = out.detach().float()
        denom = (base * base).sum()
        c = float((o * base).sum() / denom) if bool(denom > 0) else 1.0
        tol = 1e-2 if out.dtype in (torch.float16, torch.bfloat16) else 1e-4
        if not torch.allclose(o, c * base, rtol=tol, atol=tol * float(o.abs().max().clamp_min(1e-30))):
            raise GramError(
                f"{type(m).__name__}: an nn.Embedding whose output is not a constant multiple of its "
                "lookup E[ids]; its per-sequence gradient is not supported"
            )
    return c


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    kind = "embedding"
    supports = "nn.Embedding"
    token_rows = True
    anchored = True

    def refuse(self, module: nn.Module) -> str | None:
        if module.max_norm is not None or module.scale_grad_by_freq:  # type: ignore[union-attr]
            return "Embedding with max_norm/scale_grad_by_freq"
        return None

    def save(self, module: nn.Module, x: Tensor, out: Tensor) -> float:
        return embedding_scale(module, x, out)

    def parts(self, call: Call, grad: Tensor, rows: SequenceRows) -> list[tuple[nn.Parameter, Part]]:
        ids, seg = rows.rows(call.seg, call.x)
        d, _ = rows.rows(call.seg, grad)
        pad = call.module.padding_idx  # type: ignore[union-attr]
        if pad is not None:  # torch gives the padding row no gradient
            keep = ids != pad
            ids, d, seg = ids[keep], d[keep], seg[keep]
        _name, p = call.params[0]
        scale: float = call.saved
        b = d.to(rows.dtype) if scale == 1.0 else d.to(rows.dtype) * scale
        return [(p, Outer(a=None, ids=ids, b=b, seg=seg, p=p.shape[0], q=d.shape[-1], rows=ids.shape[0]))]
