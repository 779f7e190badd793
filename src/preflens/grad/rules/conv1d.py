"""transformers' Conv1D (GPT-2's attention and MLP maps): a Linear whose weight is stored transposed.

y = x W + b with W [d_in, d_out], so the per-sequence weight gradient is sum_{r in s} x_r dy_r^T.
"""

from __future__ import annotations

from transformers.pytorch_utils import Conv1D

from preflens.grad.rules.base import register_rule
from preflens.grad.rules.linear import LinearRule

__all__ = ["Conv1DRule"]


@register_rule(Conv1D)
class Conv1DRule(LinearRule):
    kind = "conv1d"
    supports = "transformers Conv1D"
    weight_transposed = True
