"""One exact per-sequence gradient rule per module kind, registered by module type (`base.register_rule`).

- `linear`: nn.Linear, LoRA's lora_A / lora_B included (peft builds them as nn.Linear; frozen base
  weights are simply not selected);
- `conv1d`: transformers' Conv1D (GPT-2), a Linear with the weight transposed;
- `embedding`: nn.Embedding (one-hot inputs), Gemma's scaled embedding included;
- `norm`: RMSNorm / LayerNorm weights and biases.

Tied input/output embeddings need no rule of their own: the one parameter collects a one-hot part
from the embedding rule and a dense part from the linear rule, and the kernels add the cross terms.
Importing this package registers every rule.
"""

from __future__ import annotations

from preflens.grad.rules.base import Rule, register_rule, registered_rules, rule_for
from preflens.grad.rules.conv1d import Conv1DRule
from preflens.grad.rules.embedding import EmbeddingRule, embedding_scale
from preflens.grad.rules.linear import LinearRule
from preflens.grad.rules.norm import NormRule

__all__ = [
    "Conv1DRule",
    "EmbeddingRule",
    "LinearRule",
    "NormRule",
    "Rule",
    "embedding_scale",
    "register_rule",
    "registered_rules",
    "rule_for",
]
