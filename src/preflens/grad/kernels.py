"""Inner products of per-sequence gradients from their parts: ghost or materialized, per parameter.

For a weight whose per-sequence gradient is G_s = sum_{i in s} a_i b_i^T (an `Outer`),

    <G_s, G_t> = sum_{i in s, j in t} <a_i, a_j> <b_i, b_j>        ("ghost" form, DP-SGD: Goodfellow
                 2015; Li et al. 2022 "Large language models can be strong differentially private
                 learners", Sec. 4; Bu et al. 2023 "mixed ghost clipping")

costs O((N T)^2 (d_in + d_out)), while materializing G_s costs O(N T d_in d_out + N^2 d_in d_out):
`param_gram` takes the cheaper one per parameter (`Strategy` "auto"). One-hot parts (embeddings)
make <a_i, a_j> a comparison of token ids, and a one-hot part against a dense one (a tied
embedding's lookup against its lm_head use: the cross terms <E_s, H_t> + <H_s, E_t>) a gather; the
materialized form scatters the one-hot rows into the dense ones. Vectors (biases, norm weights) are
always materialized.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

from preflens.grad.errors import GramError
from preflens.grad.parts import Outer, operand

__all__ = ["BLOCK_ELEMS", "STRATEGIES", "Strategy", "layer_forms", "param_gram", "row_gram"]

Strategy = Literal["auto", "ghost", "materialize"]
STRATEGIES: tuple[str, ...] = ("auto", "ghost", "materialize")

# Largest intermediate (elements) built at once: ghost [rows_s, rows_t] blocks and materialized
# [N, chunk, q] per-sequence gradient slices. 2^24 fp32 elements = 64 MiB.
BLOCK_ELEMS = 1 << 24

# Per-parameter forms chosen under a memory budget (`grad.memory.choose_forms`): name -> "ghost" /
# "materialize" / "skip"; read by `param_gram` when its strategy is "auto".
_FORMS: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "preflens_layer_forms", default=None
)


@contextlib.contextmanager
def layer_forms(forms: dict[str, str] | None) -> Iterator[None]:
    """Within the block, `param_gram` with strategy "auto" uses these per-parameter forms: "ghost" or
    "materialize" where the memory budget allows only that one, "skip" to leave the parameter out of the
    Gram (inexact; the caller reports it). Parameters not named keep the compute-cheaper form."""
    token = _FORMS.set(dict(forms or {}))
    try:
        yield
    finally:
        _FORMS.reset(token)


def _matmul_t(x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    """x y^T in `dtype` (operands of different dtypes, e.g. a tied embedding's float32 part and a
    bfloat16 head part, are both cast)."""
    if x.dtype != y.dtype:
        x, y = x.to(dtype), y.to(dtype)
    return (x @ y.T).to(dtype)


def _concat(parts: list[Outer], dtype: torch.dtype) -> Outer:
    if len(parts) == 1:
        return parts[0]
    parts = [p.flat(dtype) for p in parts]
    onehot = parts[0].ids is not None
    return Outer(
        a=None if onehot else torch.cat([p.a for p in parts]),  # type: ignore[misc]
        ids=torch.cat([p.ids for p in parts]) if onehot else None,  # type: ignore[misc]
        b=torch.cat([p.b for p in parts]),  # type: ignore[misc]
        seg=torch.cat([p.seg for p in parts]),  # type: ignore[misc]
        p=parts[0].p,
        q=parts[0].q,
        rows=sum(p.rows for p in parts),
    )


def _group(outers: list[Outer], dtype: torch.dtype) -> list[Outer]:
    """Merge parts of the same form (dense / one-hot): their rows simply add up per sequence."""
    dense = [o for o in outers if o.ids is None]
    hot = [o for o in outers if o.ids is not None]
    return [_concat(g, dtype) for g in (dense, hot) if g]


def _ghost_cost(groups: list[Outer], q: int) -> float:
    cost = 0.0
    for k in groups:
        for m in groups:
            a_cost = k.p if (k.ids is None and m.ids is None) else 1
            cost += float(k.rows) * m.rows * (a_cost + q)
    return cost


def _materialize_cost(groups: list[Outer], q: int, n: int) -> float:
    p = groups[0].p
    build = sum(float(g.rows) * (p * q if g.ids is None else q) for g in groups)
    return build + float(n) * n * p * q


def _seg_reduce(block: Tensor, seg_r: Tensor, seg_c: Tensor, n: int) -> Tensor:
    """S_r block S_c^T: sum the [rows_r, rows_c] block into [N, N] by sequence."""
    tmp = block.new_zeros(n, block.shape[1]).index_add_(0, seg_r, block)
    return block.new_zeros(n, n).index_add_(1, seg_c, tmp)


def _input_products(k: Outer, m: Outer, r0: int, r1: int, dtype: torch.dtype) -> Tensor:
    """<a_i, a_j> for rows i in k[r0:r1] and all rows j of m (one-hot rows: comparison or gather)."""
    if k.ids is None and m.ids is None:
        return _matmul_t(k.a[r0:r1], m.a, dtype)  # type: ignore[index,arg-type]
    if k.ids is not None and m.ids is not None:
        return (k.ids[r0:r1, None] == m.ids[None, :]).to(dtype)
    if k.ids is not None:  # <onehot(id_i), a_j> = a_j[id_i]
        return m.a[:, k.ids[r0:r1]].T.to(dtype)  # type: ignore[index]
    return k.a[r0:r1][:, m.ids].to(dtype)  # type: ignore[index]


def ghost(groups: list[Outer], n: int, dtype: torch.dtype) -> Tensor:
    """sum_{k,l} sum_{i in k, j in l} <a_i, a_j> <b_i, b_j>, reduced by sequence (all pairs s, t)."""
    groups = [g.flat(dtype) for g in groups]
    out = torch.zeros(n, n, dtype=dtype, device=groups[0].b.device)  # type: ignore[union-attr]
    for k in groups:
        for m in groups:
            step = max(1, BLOCK_ELEMS // max(1, m.rows))
            for r0 in range(0, k.rows, step):
                r1 = min(k.rows, r0 + step)
                bb = _matmul_t(k.b[r0:r1], m.b, dtype)  # type: ignore[index,arg-type]
                aa = _input_products(k, m, r0, r1, dtype)
                out += _seg_reduce(aa * bb, k.seg[r0:r1], m.seg, n)  # type: ignore[index,arg-type]
    return out


def _pad(o: Outer, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A dense part as [N, L, p], [N, L, q] tensors (rows of a sequence stacked, zeros after)."""
    if o.grid is not None:
        a, b = o.grid
        cols = o.active.any(0).nonzero()  # type: ignore[union-attr]
        t = int(cols.max()) + 1 if cols.numel() else 0  # later positions carry no gradient
        return operand(a[:, :t], dtype), operand(b[:, :t], dtype)
    seg = o.seg
    if o.rows > 1 and not bool((seg[1:] >= seg[:-1]).all()):  # type: ignore[index]
        idx = torch.argsort(seg, stable=True)  # type: ignore[arg-type]
        o = Outer(a=o.a[idx], ids=None, b=o.b[idx], seg=seg[idx], p=o.p, q=o.q, rows=o.rows)  # type: ignore[index]
        seg = o.seg
    counts = torch.bincount(seg, minlength=n)  # type: ignore[arg-type]
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(o.rows, device=seg.device) - starts[seg]  # type: ignore[union-attr,index]
    longest = int(counts.max()) if o.rows else 0
    a_pad = o.b.new_zeros(n, longest, o.p, dtype=o.a.dtype).index_put_((seg, pos), o.a)  # type: ignore[union-attr,arg-type]
    b_pad = o.b.new_zeros(n, longest, o.q, dtype=o.b.dtype).index_put_((seg, pos), o.b)  # type: ignore[union-attr,arg-type]
    return a_pad, b_pad


def materialize(groups: list[Outer], n: int, dtype: torch.dtype, grad: Tensor | None = None) -> Tensor:
    """Build the per-sequence gradients [N, p, q] in slices of p rows and accumulate their Gram.

    With `grad` ([p, q]), also add their sum over sequences to it: the ordinary weight gradient.
    """
    p, q = groups[0].p, groups[0].q
    hot = [g.flat(dtype) for g in groups if g.ids is not None]
    padded = [_pad(g, n, dtype) for g in groups if g.ids is None]
    dev = (padded[0][0] if padded else hot[0].b).device  # type: ignore[union-attr]
    out = torch.zeros(n, n, dtype=dtype, device=dev)
    step = max(1, BLOCK_ELEMS // max(1, n * q))
    for c0 in range(0, p, step):
        c1 = min(p, c0 + step)
        if padded:
            a_pad, b_pad = padded[0]
            gc = torch.bmm(a_pad[:, :, c0:c1].transpose(1, 2), b_pad).to(dtype)
            for a_pad, b_pad in padded[1:]:
                gc += torch.bmm(a_pad[:, :, c0:c1].transpose(1, 2), b_pad).to(dtype)
        else:
            gc = torch.zeros(n, c1 - c0, q, dtype=dtype, device=dev)
        for g in hot:
            ids = g.ids
            sel = (ids >= c0) & (ids < c1)  # type: ignore[operator]
            if bool(sel.any()):
                flat = g.seg[sel] * (c1 - c0) + (ids[sel] - c0)  # type: ignore[index]
                gc.view(n * (c1 - c0), q).index_add_(0, flat, g.b[sel].to(dtype))  # type: ignore[index]
        out += row_gram(gc.reshape(n, -1)).to(dtype)
        if grad is not None:
            grad[c0:c1] += gc.sum(0).to(grad.dtype)
    return out


def row_gram(g: Tensor, chunk: int = 16384) -> Tensor:
    """g g^T for [N, K] rows with K up to billions: one fp32 reduction over all of K loses ~1e-4
    relative accuracy (sqrt(K) eps), so K is cut into chunks reduced in g's dtype and summed in fp64."""
    n, k = g.shape
    main = (k // chunk) * chunk
    out = torch.zeros(n, n, dtype=torch.float64, device=g.device)
    if main:
        blocks = g[:, :main].reshape(n, main // chunk, chunk).transpose(0, 1)  # [K/c, N, c]
        out += torch.bmm(blocks, blocks.transpose(1, 2)).sum(0, dtype=torch.float64)
    if main < k:
        rest = g[:, main:]
        out += (rest @ rest.T).double()
    return out


def _summed_grad(groups: list[Outer], grad: Tensor, dtype: torch.dtype) -> None:
    """grad += sum over all rows of a_r b_r^T (the ordinary weight gradient), no per-sequence split."""
    for g in groups:
        if g.ids is not None:
            grad.index_add_(0, g.ids, g.b.to(grad.dtype))  # type: ignore[arg-type,union-attr]
        elif g.grid is not None:
            a, b = g.grid
            grad += (a.reshape(-1, g.p).to(dtype).T @ b.reshape(-1, g.q).to(dtype)).to(grad.dtype)
        else:
            grad += (g.a.T @ g.b).to(grad.dtype)  # type: ignore[union-attr]


def prefers_ghost(groups: list[Outer], n: int, strategy: Strategy) -> bool:
    """Whether the ghost form is used for these parts: forced by `strategy`, else the cheaper one."""
    if strategy == "ghost":
        return True
    if strategy == "materialize":
        return False
    q = groups[0].q
    return _ghost_cost(groups, q) < _materialize_cost(groups, q, n)


def param_gram(
    name: str,
    outers: list[Outer],
    vector: Tensor | None,
    n: int,
    strategy: Strategy,
    dtype: torch.dtype,
    grad: Tensor | None = None,
) -> Tensor:
    """[N, N] Gram of one parameter's per-sequence gradients from all its parts of one pass.

    With `grad` (the parameter's shape), also add the ordinary gradient sum_s G_s to it (fused steps).
    """
    if vector is not None and outers:
        raise GramError(
            f"parameter '{name}' is shared between a norm/bias and a matrix use; "
            "sequence_gram does not handle this sharing"
        )
    form = (_FORMS.get() or {}).get(name) if strategy == "auto" else None
    if form == "skip":  # left out under the memory budget: no Gram term (the ordinary gradient stays exact)
        if grad is not None:
            if vector is not None:
                grad += vector.sum(0).reshape(grad.shape).to(grad.dtype)
            else:
                _summed_grad(_group(outers, dtype), grad, dtype)
        o = outers[0] if outers else None
        src = vector if vector is not None else (o.b if o.b is not None else o.grid[1])  # type: ignore[union-attr,index]
        dev = src.device
        return torch.zeros(n, n, dtype=dtype, device=dev)
    if vector is not None:
        if grad is not None:
            grad += vector.sum(0).reshape(grad.shape).to(grad.dtype)
        return row_gram(vector).to(dtype)
    groups = _group(outers, dtype)
    if form in ("ghost", "materialize"):
        strategy = form  # type: ignore[assignment]
    if prefers_ghost(groups, n, strategy):
        if grad is not None:
            _summed_grad(groups, grad, dtype)
        return ghost(groups, n, dtype)
    return materialize(groups, n, dtype, grad.view(groups[0].p, groups[0].q) if grad is not None else None)
