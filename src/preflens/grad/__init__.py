"""Exact Gram matrix of per-sequence gradients from one forward and one backward.

Why: gradient entanglement (Yuan et al. 2024, arXiv 2410.13828, "A Common Pitfall of Margin-based
Language Model Alignment: Gradient Entanglement", Sec. 3) is about the inner product <g_w, g_l> of
the gradients of the chosen and rejected summed log-probs. The paper computes it offline with one
backward per sequence and a full parameter-sized gradient each. That is too slow and too big to run
inside training. Here the whole [N, N] Gram of the per-sequence gradients

    G[s, t] = < d logp_s / d theta , d logp_t / d theta >,  logp_s = sum of s's response log-probs

comes from ONE forward and ONE backward of sum_s logp_s with module hooks, and no per-sequence
gradient of the whole model is ever built.

How. Rows (sequences) of a causal LM do not interact, so the gradient D of sum_s logp_s with
respect to a layer's output, restricted to sequence s, is exactly the output-gradient of logp_s
alone. For a linear map y = W x every per-sequence weight gradient is then an outer-product sum
G_s = sum_i a_{s,i} b_{s,i}^T (a = output-gradient row, b = input row), whose inner products the
kernels take either in "ghost" form or by materializing G_s, whichever is cheaper per parameter.

The package, in the order data flows:
- `capture`: the hook engine (`GramCapture`): forward hooks record each call of a module that has a
  rule, tensor hooks hand the call's output-gradient to the rule;
- `layout`: which rows of a call belong to which sequence;
- `rules/`: one exact rule per module kind (Linear and LoRA A/B, Conv1D, Embedding, norms),
  registered by module type; tied input/output embeddings are one parameter with parts from two
  rules, whose cross terms the kernels add;
- `kernels`: ghost vs materialized inner products;
- `api`: `sequence_gram`, `sequence_gram_and_logps`, `sequence_grad_norms`, `token_gram`,
  `StepGramCapture`.

Exactness guard: every selected parameter must be owned by a module with a rule (else `GramError`
naming it), and after the forward the autograd graph is walked to count how often each parameter is
used; a use outside the hooked modules (a weight read functionally) raises an error naming it
instead of being skipped.

Conventions (DESIGN.md): `response_mask[s, t]` marks token t as a response token whose log-prob is
log_softmax(logits[s, t-1])[input_ids[s, t]]; padding on the right; the model is causal (a position
after the last response-predicting one receives no gradient, which lets us drop those rows). The
summed log-prob is exactly `preflens.logprobs.sequence_logps` (it is what we differentiate).
"""

from __future__ import annotations

from preflens.grad.api import (
    StepGramCapture,
    sequence_grad_norms,
    sequence_gram,
    sequence_gram_and_logps,
    token_gram,
)
from preflens.grad.capture import ACTIVE_CAPTURES, ActiveCaptures, GramCapture
from preflens.grad.errors import GramError
from preflens.grad.kernels import Strategy
from preflens.grad.rules import Rule, register_rule, registered_rules, rule_for

__all__ = [
    "ACTIVE_CAPTURES",
    "ActiveCaptures",
    "GramCapture",
    "GramError",
    "Rule",
    "StepGramCapture",
    "Strategy",
    "register_rule",
    "registered_rules",
    "rule_for",
    "sequence_grad_norms",
    "sequence_gram",
    "sequence_gram_and_logps",
    "token_gram",
]
