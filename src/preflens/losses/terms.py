"""The inputs most losses share, read from `PairLogps` with a clear error when a field is missing.

Why here: the implicit reward and the response length are checked the same way by every family module
(margin, balanced, normalized, ...), so the check and its message live once.
"""

from __future__ import annotations

from torch import Tensor

from preflens.errors import PreflensError
from preflens.logprobs import PairLogps

__all__ = ["implicit_rewards", "response_lengths"]


def implicit_rewards(p: PairLogps, loss: str) -> tuple[Tensor, Tensor]:
    """Implicit rewards without beta: r_w = chosen - ref_chosen, r_l = rejected - ref_rejected."""
    p.require("ref_chosen", "ref_rejected", loss=loss)
    return p.chosen - p.ref_chosen, p.rejected - p.ref_rejected  # type: ignore[operator]


def response_lengths(p: PairLogps, loss: str) -> tuple[Tensor, Tensor]:
    """Response token counts n_w, n_l in the log-probs' dtype; a zero-length response is an error."""
    p.require("chosen_len", "rejected_len", loss=loss)
    n_w = p.chosen_len.to(p.chosen.dtype)  # type: ignore[union-attr]
    n_l = p.rejected_len.to(p.rejected.dtype)  # type: ignore[union-attr]
    if bool((n_w <= 0).any()) or bool((n_l <= 0).any()):
        raise PreflensError(f"loss '{loss}' needs response lengths >= 1; got a zero-length response")
    return n_w, n_l
