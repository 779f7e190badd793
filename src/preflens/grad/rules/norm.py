"""RMSNorm / LayerNorm weights and biases (any elementwise-affine norm, Gemma's (1 + w) included).

y = c(x) + w * n(x) (+ b): the per-sequence gradients are the d-vectors sum_t dy * n(x) and sum_t dy
(always materialized, [N, d]). n(x) is obtained without knowing the norm's formula:
n = f(x; w=1, b=0) - f(x; w=0, b=0). That y is affine in w is verified on a module's first call.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from preflens.grad.errors import GramError
from preflens.grad.layout import SequenceRows
from preflens.grad.parts import Call, Part
from preflens.grad.rules.base import Rule, register_rule

__all__ = ["NormRule"]


def _named_like_a_norm(m: nn.Module) -> bool:
    """transformers defines one norm class per model family (LlamaRMSNorm, ...), with no common base."""
    return type(m).__name__.endswith(("RMSNorm", "LayerNorm"))


@register_rule(nn.LayerNorm, nn.RMSNorm, match=_named_like_a_norm)
class NormRule(Rule):
    kind = "norm"
    supports = "RMSNorm/LayerNorm weights and biases"
    per_head = True

    def __init__(self) -> None:
        # Norm modules already checked to be elementwise-affine in their weight ("zero": f(x; w=0, b=0) = 0,
        # Llama/LayerNorm-style, so f0 need not be recomputed; "affine": it must be).
        self.forms: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()

    def accepts(self, module: nn.Module) -> bool:
        w = getattr(module, "weight", None)
        return isinstance(w, nn.Parameter) and w.dim() == 1

    def save(self, module: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        return out.detach()  # the output, to verify the affine form on the first call

    def _normalized(self, call: Call, rows: SequenceRows) -> Tensor:
        """n(x) of the call's input, verifying the affine form on the module's first call."""
        m, x = call.module, call.x
        w = m.weight
        bias = getattr(m, "bias", None)
        pdict = {"weight": torch.ones_like(w)}
        zdict = {"weight": torch.zeros_like(w)}
        if isinstance(bias, torch.Tensor):
            pdict["bias"] = torch.zeros_like(bias)
            zdict["bias"] = torch.zeros_like(bias)
        verified = self.forms.get(m)
        rows.busy = True
        try:
            with torch.no_grad():
                f1 = torch.func.functional_call(m, pdict, (x,))
                # f0 = f(x; w=0, b=0) is 0 for Llama/LayerNorm-style norms: computed once to check
                f0 = None if verified == "zero" else torch.func.functional_call(m, zdict, (x,))
                if verified is None:
                    y = call.saved
                    rebuilt = f0 + (f1 - f0) * w + (bias if isinstance(bias, torch.Tensor) else 0)  # type: ignore[operator]
                    tol = 1e-2 if y.dtype in (torch.float16, torch.bfloat16) else 1e-4
                    if not torch.allclose(rebuilt.float(), y.float(), rtol=tol, atol=tol):
                        raise GramError(
                            f"{type(m).__name__}: output is not elementwise-affine in its weight "
                            "(y = c(x) + w * n(x) + b); its per-sequence gradient is not supported"
                        )
                    self.forms[m] = "zero" if not bool(f0.any()) else "affine"  # type: ignore[union-attr]
        finally:
            rows.busy = False
        return f1 if f0 is None else f1 - f0

    def parts(self, call: Call, grad: Tensor, rows: SequenceRows) -> list[tuple[nn.Parameter, Part]]:
        nx = self._normalized(call, rows)
        w = call.module.weight
        out: list[tuple[nn.Parameter, Part]] = []
        for _name, p in call.params:
            contrib = grad.to(rows.dtype) * nx.to(rows.dtype) if p is w else grad
            if call.seg is None and contrib.dim() > 3:  # per-head norm: [N, ..., d] -> [N, rows, d]
                contrib = contrib.reshape(contrib.shape[0], -1, contrib.shape[-1])
            out.append((p, rows.segsum(call.seg, contrib)))
        return out
