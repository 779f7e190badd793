"""Which rows of a hooked module call belong to which sequence, and the row sums rules build on.

Rows (sequences) of a causal LM do not interact, so the output-gradient of a hooked call restricted
to the rows of sequence s is exactly the output-gradient of logp_s alone (module docstring of
`preflens.grad`). A call's rows come in one of these layouts:

- the [N, T, ...] token grid (most layers; per-head norms also [N, H, T, d] or [N, T, H, d]);
- the grid flattened to [N*T, d] (OPT's fc1/fc2 and final LayerNorm);
- flat response-token rows [M, d] in row-major order, possibly in consecutive chunks (the lm_head
  as `preflens.logprobs.sequence_logps` applies it).

On the grid, a position at or after the last response token of its row receives no gradient (the
model is causal), so only the `active` positions are kept.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

from preflens.grad.errors import GramError
from preflens.grad.parts import Outer, operand

__all__ = ["SequenceRows"]


class SequenceRows:
    """The row -> sequence map of one pass over N right-padded sequences of length T.

    `busy` is set while a rule re-runs its own module (the norm rule's `functional_call`): the
    capture's hooks then ignore that call.
    """

    def __init__(self, attention_mask: Tensor, response_mask: Tensor, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.n, self.t = response_mask.shape
        rm = response_mask.bool()
        pos = torch.arange(self.t, device=rm.device)
        last = torch.where(rm, pos, torch.full_like(pos, -1)).amax(1)  # last response token, -1: none
        # A causal LM's position i receives gradient only if i < last response position.
        self.active = (pos[None, :] < last[:, None]) & attention_mask.bool()
        self.grid_seg = self.active.nonzero(as_tuple=True)[0]
        self.n_active = int(self.grid_seg.shape[0])
        # Sequence index of each response token, row-major: the order in which `sequence_logps`
        # feeds response-predicting positions to the lm_head.
        self.flat_seg = rm.nonzero(as_tuple=True)[0]
        self.cursor: dict[int, int] = defaultdict(int)  # flat rows consumed so far, per module
        self.busy = False

    def attribute(self, module: nn.Module, lead: tuple[int, ...], x: Tensor, per_head: bool) -> Tensor | None:
        """Sequence of each row of a call whose input has leading (row) dims `lead`; None: the grid.

        `per_head`: the rule accepts [N, ...] layouts beyond [N, T] (every row of sample s is s's).
        """
        n, t = self.n, self.t
        if lead == (n, t):
            return None
        if per_head and len(lead) > 2 and lead[0] == n:
            # per-head norms (Qwen3's/Gemma3's q_norm, k_norm on [N, T, H, d] or [N, H, T, d]): every row
            # of sample s belongs to sequence s; the norm rule sums them all
            return None
        if len(lead) == 1 and lead[0] == n * t and n * t > self.flat_seg.shape[0]:
            # the whole [N, T] grid flattened to [N*T, d] (OPT's fc1/fc2 and final LayerNorm); response
            # tokens alone are fewer (position 0 never is one), so the two flat layouts cannot be confused
            return torch.arange(n, device=x.device).repeat_interleave(t)
        if len(lead) == 1:
            key = id(module)
            start = self.cursor[key]
            seg = self.flat_seg[start : start + lead[0]]
            if seg.shape[0] != lead[0]:
                raise GramError(
                    f"{type(module).__name__} got {lead[0]} flat rows beyond the {self.flat_seg.shape[0]} "
                    "response tokens: its rows cannot be attributed to sequences"
                )
            self.cursor[key] = start + lead[0]
            return seg
        raise GramError(
            f"{type(module).__name__} input of shape {tuple(x.shape)}: rows cannot be attributed to the "
            f"{n} sequences (expected [{n}, {t}, ...] or response-token rows)"
        )

    # -- helpers for the rules ----------------------------------------------------------------

    def rows(self, seg: Tensor | None, t: Tensor) -> tuple[Tensor, Tensor]:
        """(rows of `t` that can carry gradient, their sequence index)."""
        if seg is None:
            return t[self.active], self.grid_seg
        return t, seg

    def segsum(self, seg: Tensor | None, t: Tensor) -> Tensor:
        """Per-sequence sum of rows [N, d] (grid calls: inactive rows hold zero gradient)."""
        if seg is None:
            return t.sum(1, dtype=self.dtype)
        return t.new_zeros(self.n, t.shape[-1], dtype=self.dtype).index_add_(0, seg, t.to(self.dtype))

    def dense(self, seg: Tensor | None, a: Tensor, b: Tensor) -> Outer:
        """The part sum_{r in s} a_r b_r^T of a dense map (grid calls stay uncopied)."""
        p, q = a.shape[-1], b.shape[-1]
        if seg is None:
            return Outer(
                a=None,
                ids=None,
                b=None,
                seg=None,
                p=p,
                q=q,
                rows=self.n_active,
                grid=(a, b),
                active=self.active,
            )
        return Outer(
            a=operand(a, self.dtype), ids=None, b=operand(b, self.dtype), seg=seg, p=p, q=q, rows=a.shape[0]
        )
