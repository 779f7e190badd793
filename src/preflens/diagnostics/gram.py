"""Re-export shim: the per-sequence gradient Gram now lives in `preflens.grad` (capture, rules, kernels, api).

`preflens.diagnostics.gram.sequence_gram` is a name DESIGN.md fixes; it and every other name this
module exported keep working from here.
"""

from __future__ import annotations

from preflens.grad import (  # noqa: F401
    GramCapture,
    GramError,
    StepGramCapture,
    Strategy,
    sequence_grad_norms,
    sequence_gram,
    sequence_gram_and_logps,
    token_gram,
)

__all__ = [
    "sequence_gram",
    "sequence_gram_and_logps",
    "sequence_grad_norms",
    "token_gram",
    "GramCapture",
    "StepGramCapture",
    "GramError",
]
