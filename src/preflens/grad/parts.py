"""The data a rule hands to the kernels: one hooked call's share of a parameter's per-sequence gradient.

A rule turns a module call plus its output-gradient into "parts", one per own parameter:

- an `Outer`: G_s = sum over the rows r of sequence s of a_r b_r^T (weights of linear maps and
  embeddings; kept factored so that the kernels can pick the ghost or the materialized inner product);
- a Tensor [N, d]: the per-sequence gradient itself (biases, norm weights: small, always materialized).

`Call` is what the hook engine remembers of one forward call until its output-gradient arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Call", "Outer", "Part", "operand"]


def operand(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Operand dtype for the Gram's matmuls: half-precision CUDA tensors stay as they are (tensor cores,
    fp32 accumulation inside the matmul; results are cast to `dtype` before anything is summed), the
    rest is cast to `dtype` (float32 by default; half-precision matmuls are slow on CPUs)."""
    if t.is_cuda and t.dtype in (torch.bfloat16, torch.float16):
        return t
    return t.to(dtype)


@dataclass
class Outer:
    """G_s = sum over rows r of sequence s of a_r b_r^T (shape [p, q]).

    Flat form: `a` [M, p] (dense) or, when `ids` is set, the one-hot rows of `ids` [M] over p
    columns; `b` [M, q]; `seg` [M] the sequence of each row. Grid form (a dense part of a call on the
    [N, T, .] token grid): `grid` = (a [N, T, p], b [N, T, q]) uncopied, where rows outside `active`
    carry a zero output-gradient; the materialized form uses it as is, the ghost form selects rows.
    """

    a: Tensor | None
    ids: Tensor | None
    b: Tensor | None
    seg: Tensor | None
    p: int
    q: int
    rows: int
    grid: tuple[Tensor, Tensor] | None = None
    active: Tensor | None = None

    def flat(self, dtype: torch.dtype) -> Outer:
        """The flat form (grid parts: only the rows that can carry gradient)."""
        if self.grid is None:
            return self
        a, b = self.grid
        act = self.active
        return Outer(
            a=operand(a[act], dtype),  # type: ignore[index]
            ids=None,
            b=operand(b[act], dtype),  # type: ignore[index]
            seg=act.nonzero(as_tuple=True)[0],  # type: ignore[union-attr]
            p=self.p,
            q=self.q,
            rows=self.rows,
        )


# A parameter's share from one call: factored (`Outer`) or the per-sequence gradients [N, d] themselves.
Part = Outer | Tensor


@dataclass
class Call:
    """One forward call of a hooked module, waiting for its output-gradient.

    `seg`: the sequence of each row for flat-row calls, None for calls on the [N, T, ...] grid.
    `saved`: what the module's rule kept from the forward (`Rule.save`), in the rule's own type.
    """

    module: nn.Module
    x: Tensor
    seg: Tensor | None
    params: list[tuple[str, nn.Parameter]]
    saved: Any = None
    done: bool = False
