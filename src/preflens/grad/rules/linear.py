"""nn.Linear (also peft's LoRA lora_A / lora_B, which are nn.Linear): y = x W^T + b.

The per-sequence weight gradient is sum_{r in s} dy_r x_r^T: a dense `Outer` with a = the
output-gradient row, b = the input row. The bias gradient is sum_{r in s} dy_r.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from preflens.grad.layout import SequenceRows
from preflens.grad.parts import Call, Part
from preflens.grad.rules.base import Rule, register_rule

__all__ = ["LinearRule"]


@register_rule(nn.Linear)
class LinearRule(Rule):
    kind = "linear"
    supports = "nn.Linear (incl. LoRA A/B)"
    # transformers' Conv1D stores the weight as [d_in, d_out] (the transpose of nn.Linear's).
    weight_transposed: ClassVar[bool] = False

    def parts(self, call: Call, grad: Tensor, rows: SequenceRows) -> list[tuple[nn.Parameter, Part]]:
        out: list[tuple[nn.Parameter, Part]] = []
        for _name, p in call.params:
            if p is call.module.weight:
                a, b = (call.x, grad) if self.weight_transposed else (grad, call.x)
                out.append((p, rows.dense(call.seg, a, b)))
            else:  # bias
                out.append((p, rows.segsum(call.seg, grad)))
        return out
