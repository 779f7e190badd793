"""Exact Gram matrix of per-sequence gradients from one forward and one backward.

Why: gradient entanglement (seed 000, Yuan et al., arXiv 2410.13828, Sec. 3) is about the inner
product <g_w, g_l> of the gradients of the chosen and rejected summed log-probs. The papers compute
it offline with one backward per sequence and a full parameter-sized gradient each. That is too slow
and too big to run inside training. Here the whole [N, N] Gram of the per-sequence gradients

    G[s, t] = < d logp_s / d theta , d logp_t / d theta >,  logp_s = sum of s's response log-probs

comes from ONE forward and ONE backward of sum_s logp_s with module hooks, and no per-sequence
gradient of the whole model is ever built.

How. Rows (sequences) of a causal LM do not interact, so the gradient D of sum_s logp_s with
respect to a layer's output, restricted to sequence s, is exactly the output-gradient of logp_s
alone. For a linear map y = W x every per-sequence weight gradient is then an outer-product sum
G_s = sum_i a_{s,i} b_{s,i}^T (a = output-gradient row, b = input row) and

    <G_s, G_t> = sum_{i,j} <a_{s,i}, a_{t,j}> <b_{s,i}, b_{t,j}>      ("ghost" form, DP-SGD: Goodfellow
                 2015; Li et al. 2022 "Large language models can be strong differentially private
                 learners", Sec. 4; Bu et al. 2023 "mixed ghost clipping")

costs O((N T)^2 (d_in + d_out)), while materializing G_s costs O(N T d_in d_out + N^2 d_in d_out).
We pick the cheaper per parameter. The cases beyond a plain Linear:

- Embedding: an Embedding is a Linear whose input rows are one-hot token ids, so a = one-hot(id),
  <a_s,i, a_t,j> = [id_s,i == id_t,j] (a comparison, not a product), b = output-gradient row.
- Tied input/output embeddings: one parameter gets an embedding part E_s and an lm_head part H_s;
  the per-sequence gradient is E_s + H_s and the Gram needs the cross terms <E_s, H_t> + <H_s, E_t>.
  With a = one-hot for E and a = dlogits row for H, <a, a'> = dlogits[j, id_i] (a gather), so the
  same ghost formula covers the cross terms; the materialized form scatters E into H's rows.
- Biases, RMSNorm/LayerNorm weights: the per-sequence gradient is a d-vector (sum over tokens of
  dy, resp. dy * x_normalized): always materialized, [N, d].
- LoRA: peft's lora_A / lora_B are nn.Linear, hooked like any other; frozen base weights are skipped.
- transformers' Conv1D (GPT-2): a Linear with the weight transposed.

Exactness guard: every selected parameter must be owned by a supported module, and after the forward
the autograd graph is walked to count how often each parameter is used; a use outside the hooked
modules (a weight read functionally) raises an error naming it instead of being skipped.

Conventions (DESIGN.md): `response_mask[s, t]` marks token t as a response token whose log-prob is
log_softmax(logits[s, t-1])[input_ids[s, t]]; padding on the right; the model is causal (a position
after the last response-predicting one receives no gradient, which lets us drop those rows). The
summed log-prob is exactly `preflens.logprobs.sequence_logps` (it is what we differentiate).

Two drivers share the hook machinery (`GramCapture`):
- `sequence_gram` runs its own forward and an activation-only backward (autograd is asked for the
  gradient of a zero "anchor" added to the input embeddings, so no weight gradient is computed);
- `StepGramCapture` rides on a training step's own forward and backward: there the output-gradient
  of sequence s is c_s times that of logp_s, c_s = dL/dlogp_s (read from a hook on the log-probs),
  so the log-prob Gram is Gram_L[s, t] / (c_s c_t) (see `StepGramCapture`).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from preflens.errors import PreflensError

__all__ = [
    "sequence_gram",
    "sequence_gram_and_logps",
    "sequence_grad_norms",
    "token_gram",
    "GramCapture",
    "StepGramCapture",
    "GramError",
]

Strategy = Literal["auto", "ghost", "materialize"]

# >0 while `sequence_gram` runs its own forward/backward: a `StepGramCapture` around a training
# step then ignores that pass (e.g. the gradient norms of the `normalized` loss inside the step).
_STANDALONE = [0]

# Norm modules already checked to be elementwise-affine in their weight ("zero": f(x; w=0, b=0) = 0).
_NORM_FORM: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()

# Parameters whose requires_grad a fused capture has switched off for the current step (id -> param).
_FUSED_OFF: dict[int, nn.Parameter] = {}

# Largest intermediate (elements) built at once: ghost [rows_s, rows_t] blocks and materialized
# [N, chunk, q] per-sequence gradient slices. 2^24 fp32 elements = 64 MiB.
_BLOCK_ELEMS = 1 << 24


class GramError(PreflensError):
    """A parameter whose per-sequence gradient cannot be computed exactly by the hooks."""


# ---------------------------------------------------------------------------------------------
# module kinds


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except Exception:  # pragma: no cover - transformers always present in preflens
        return None


_CONV1D = _conv1d_type()


def _embedding_scale(m: nn.Module, ids: Tensor, out: Tensor) -> float:
    """c such that an nn.Embedding subclass's output is c * E[ids] (1.0 for nn.Embedding itself).

    Gemma's `*ScaledWordEmbedding` returns E[ids] * sqrt(d) from the embedding module itself, so the
    weight gradient is c * onehot^T dy, not onehot^T dy: ignoring c made Gemma's Gram 20-50% off. A
    subclass whose output is not a constant multiple of the lookup is refused.
    """
    if type(m).forward is nn.Embedding.forward:
        return 1.0
    with torch.no_grad():
        base = torch.nn.functional.embedding(ids, m.weight, m.padding_idx).float()  # type: ignore[arg-type]
        o = out.detach().float()
        denom = (base * base).sum()
        c = float((o * base).sum() / denom) if bool(denom > 0) else 1.0
        tol = 1e-2 if out.dtype in (torch.float16, torch.bfloat16) else 1e-4
        if not torch.allclose(o, c * base, rtol=tol, atol=tol * float(o.abs().max().clamp_min(1e-30))):
            raise GramError(
                f"{type(m).__name__}: an nn.Embedding whose output is not a constant multiple of its "
                "lookup E[ids]; its per-sequence gradient is not supported"
            )
    return c


def _module_kind(m: nn.Module) -> str | None:
    """Which exact per-sequence gradient rule applies to a module's own parameters (None: none)."""
    if isinstance(m, nn.Embedding):
        return "embedding"
    if isinstance(m, nn.Linear):
        return "linear"
    if _CONV1D is not None and isinstance(m, _CONV1D):
        return "conv1d"
    name = type(m).__name__
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or name.endswith(("RMSNorm", "LayerNorm")):
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() == 1:
            return "norm"
    return None


# ---------------------------------------------------------------------------------------------
# per-sequence gradient "parts"


@dataclass
class _Outer:
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

    def flat(self, dtype: torch.dtype) -> _Outer:
        if self.grid is None:
            return self
        a, b = self.grid
        act = self.active
        return _Outer(
            a=_mm(a[act], dtype),  # type: ignore[index]
            ids=None,
            b=_mm(b[act], dtype),  # type: ignore[index]
            seg=act.nonzero(as_tuple=True)[0],  # type: ignore[union-attr]
            p=self.p,
            q=self.q,
            rows=self.rows,
        )


@dataclass
class _Call:
    """One forward call of a hooked module, waiting for its output-gradient."""

    module: nn.Module
    kind: str
    x: Tensor
    y: Tensor | None
    seg: Tensor | None  # flat-row calls: sequence of each row; None for [N, T, ...] grid calls
    params: list[tuple[str, nn.Parameter]]
    done: bool = False
    scale: float = 1.0  # embedding subclasses returning c * E[ids] (Gemma's sqrt(d) scaling)


@dataclass
class _ParamState:
    name: str
    param: nn.Parameter
    pending: int = 0
    outers: list[_Outer] = field(default_factory=list)
    vector: Tensor | None = None


# ---------------------------------------------------------------------------------------------
# Gram of one parameter from its parts


def _mm(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Operand dtype for the Gram's matmuls: half-precision CUDA tensors stay as they are (tensor cores,
    fp32 accumulation inside the matmul; results are cast to `dtype` before anything is summed), the
    rest is cast to `dtype` (float32 by default; half-precision matmuls are slow on CPUs)."""
    if t.is_cuda and t.dtype in (torch.bfloat16, torch.float16):
        return t
    return t.to(dtype)


def _matmul_t(x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    """x y^T in `dtype` (operands of different dtypes, e.g. a tied embedding's float32 part and a
    bfloat16 head part, are both cast)."""
    if x.dtype != y.dtype:
        x, y = x.to(dtype), y.to(dtype)
    return (x @ y.T).to(dtype)


def _concat(parts: list[_Outer], dtype: torch.dtype) -> _Outer:
    if len(parts) == 1:
        return parts[0]
    parts = [p.flat(dtype) for p in parts]
    onehot = parts[0].ids is not None
    return _Outer(
        a=None if onehot else torch.cat([p.a for p in parts]),  # type: ignore[misc]
        ids=torch.cat([p.ids for p in parts]) if onehot else None,  # type: ignore[misc]
        b=torch.cat([p.b for p in parts]),  # type: ignore[misc]
        seg=torch.cat([p.seg for p in parts]),  # type: ignore[misc]
        p=parts[0].p,
        q=parts[0].q,
        rows=sum(p.rows for p in parts),
    )


def _group(outers: list[_Outer], dtype: torch.dtype) -> list[_Outer]:
    """Merge parts of the same form (dense / one-hot): their rows simply add up per sequence."""
    dense = [o for o in outers if o.ids is None]
    hot = [o for o in outers if o.ids is not None]
    return [_concat(g, dtype) for g in (dense, hot) if g]


def _ghost_cost(groups: list[_Outer], q: int) -> float:
    cost = 0.0
    for k in groups:
        for m in groups:
            a_cost = k.p if (k.ids is None and m.ids is None) else 1
            cost += float(k.rows) * m.rows * (a_cost + q)
    return cost


def _materialize_cost(groups: list[_Outer], q: int, n: int) -> float:
    p = groups[0].p
    build = sum(float(g.rows) * (p * q if g.ids is None else q) for g in groups)
    return build + float(n) * n * p * q


def _seg_reduce(block: Tensor, seg_r: Tensor, seg_c: Tensor, n: int) -> Tensor:
    """S_r block S_c^T: sum the [rows_r, rows_c] block into [N, N] by sequence."""
    tmp = block.new_zeros(n, block.shape[1]).index_add_(0, seg_r, block)
    return block.new_zeros(n, n).index_add_(1, seg_c, tmp)


def _ghost(groups: list[_Outer], n: int, dtype: torch.dtype) -> Tensor:
    """sum_{k,l} sum_{i in k, j in l} <a_i, a_j> <b_i, b_j>, reduced by sequence (all pairs s, t)."""
    groups = [g.flat(dtype) for g in groups]
    out = torch.zeros(n, n, dtype=dtype, device=groups[0].b.device)  # type: ignore[union-attr]
    for k in groups:
        for m in groups:
            step = max(1, _BLOCK_ELEMS // max(1, m.rows))
            for r0 in range(0, k.rows, step):
                r1 = min(k.rows, r0 + step)
                bb = _matmul_t(k.b[r0:r1], m.b, dtype)  # type: ignore[index,arg-type]
                if k.ids is None and m.ids is None:
                    aa = _matmul_t(k.a[r0:r1], m.a, dtype)  # type: ignore[index,arg-type]
                elif k.ids is not None and m.ids is not None:
                    aa = (k.ids[r0:r1, None] == m.ids[None, :]).to(dtype)
                elif k.ids is not None:  # <onehot(id_i), a_j> = a_j[id_i]
                    aa = m.a[:, k.ids[r0:r1]].T.to(dtype)  # type: ignore[index]
                else:
                    aa = k.a[r0:r1][:, m.ids].to(dtype)  # type: ignore[index]
                out += _seg_reduce(aa * bb, k.seg[r0:r1], m.seg, n)  # type: ignore[index,arg-type]
    return out


def _pad(o: _Outer, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A dense part as [N, L, p], [N, L, q] tensors (rows of a sequence stacked, zeros after)."""
    if o.grid is not None:
        a, b = o.grid
        cols = o.active.any(0).nonzero()  # type: ignore[union-attr]
        t = int(cols.max()) + 1 if cols.numel() else 0  # later positions carry no gradient
        return _mm(a[:, :t], dtype), _mm(b[:, :t], dtype)
    seg = o.seg
    if o.rows > 1 and not bool((seg[1:] >= seg[:-1]).all()):  # type: ignore[index]
        idx = torch.argsort(seg, stable=True)  # type: ignore[arg-type]
        o = _Outer(a=o.a[idx], ids=None, b=o.b[idx], seg=seg[idx], p=o.p, q=o.q, rows=o.rows)  # type: ignore[index]
        seg = o.seg
    counts = torch.bincount(seg, minlength=n)  # type: ignore[arg-type]
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(o.rows, device=seg.device) - starts[seg]  # type: ignore[union-attr,index]
    longest = int(counts.max()) if o.rows else 0
    a_pad = o.b.new_zeros(n, longest, o.p, dtype=o.a.dtype).index_put_((seg, pos), o.a)  # type: ignore[union-attr,arg-type]
    b_pad = o.b.new_zeros(n, longest, o.q, dtype=o.b.dtype).index_put_((seg, pos), o.b)  # type: ignore[union-attr,arg-type]
    return a_pad, b_pad


def _materialize(groups: list[_Outer], n: int, dtype: torch.dtype, grad: Tensor | None = None) -> Tensor:
    """Build the per-sequence gradients [N, p, q] in slices of p rows and accumulate their Gram.

    With `grad` ([p, q]), also add their sum over sequences to it: the ordinary weight gradient.
    """
    p, q = groups[0].p, groups[0].q
    hot = [g.flat(dtype) for g in groups if g.ids is not None]
    padded = [_pad(g, n, dtype) for g in groups if g.ids is None]
    dev = (padded[0][0] if padded else hot[0].b).device  # type: ignore[union-attr]
    out = torch.zeros(n, n, dtype=dtype, device=dev)
    step = max(1, _BLOCK_ELEMS // max(1, n * q))
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
        out += _row_gram(gc.reshape(n, -1)).to(dtype)
        if grad is not None:
            grad[c0:c1] += gc.sum(0).to(grad.dtype)
    return out


def _row_gram(g: Tensor, chunk: int = 16384) -> Tensor:
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


def _summed_grad(groups: list[_Outer], grad: Tensor, dtype: torch.dtype) -> None:
    """grad += sum over all rows of a_r b_r^T (the ordinary weight gradient), no per-sequence split."""
    for g in groups:
        if g.ids is not None:
            grad.index_add_(0, g.ids, g.b.to(grad.dtype))  # type: ignore[arg-type,union-attr]
        elif g.grid is not None:
            a, b = g.grid
            grad += (a.reshape(-1, g.p).to(dtype).T @ b.reshape(-1, g.q).to(dtype)).to(grad.dtype)
        else:
            grad += (g.a.T @ g.b).to(grad.dtype)  # type: ignore[union-attr]


def _param_gram(
    st: _ParamState, n: int, strategy: Strategy, dtype: torch.dtype, grad: Tensor | None = None
) -> Tensor:
    if st.vector is not None and st.outers:
        raise GramError(
            f"parameter '{st.name}' is shared between a norm/bias and a matrix use; "
            "sequence_gram does not handle this sharing"
        )
    if st.vector is not None:
        if grad is not None:
            grad += st.vector.sum(0).reshape(grad.shape).to(grad.dtype)
        return _row_gram(st.vector).to(dtype)
    groups = _group(st.outers, dtype)
    q = groups[0].q
    if strategy == "ghost":
        use_ghost = True
    elif strategy == "materialize":
        use_ghost = False
    else:
        use_ghost = _ghost_cost(groups, q) < _materialize_cost(groups, q, n)
    if use_ghost:
        if grad is not None:
            _summed_grad(groups, grad, dtype)
        return _ghost(groups, n, dtype)
    return _materialize(groups, n, dtype, grad.view(groups[0].p, q) if grad is not None else None)


# ---------------------------------------------------------------------------------------------
# the hook machinery


def _select_params(
    model: nn.Module, params: Iterable[str | nn.Parameter] | None
) -> dict[int, tuple[str, nn.Parameter]]:
    named = list(model.named_parameters())  # deduplicates tied parameters (first name kept)
    if params is None:
        # parameters a fused StepGramCapture switched off for this step still count as trainable
        chosen = [(n, p) for n, p in named if p.requires_grad or id(p) in _FUSED_OFF]
        if not chosen:
            raise GramError("the model has no trainable parameters (requires_grad): nothing to differentiate")
    else:
        by_name = dict(named)
        by_id = {id(p): n for n, p in named}
        chosen = []
        for item in params:
            if isinstance(item, str):
                if item not in by_name:
                    raise GramError(f"params: '{item}' is not a parameter name of the model")
                chosen.append((item, by_name[item]))
            elif isinstance(item, torch.Tensor):
                if id(item) not in by_id:
                    raise GramError("params: a tensor that is not a parameter of the model was passed")
                chosen.append((by_id[id(item)], item))  # type: ignore[arg-type]
            else:
                raise GramError(f"params: expected parameter names or Parameters, got {type(item).__name__}")
        if not chosen:
            raise GramError("params is empty: nothing to differentiate")
    return {id(p): (n, p) for n, p in chosen}


def _flat_rows(response_mask: Tensor) -> Tensor:
    """Sequence index of each response token, row-major: the order in which
    `preflens.logprobs.sequence_logps` feeds response-predicting positions to the lm_head."""
    return response_mask.bool().nonzero(as_tuple=True)[0]


class GramCapture:
    """Forward/backward hooks that accumulate the per-sequence-gradient Gram of the selected parameters.

    Usage (what `sequence_gram` and `StepGramCapture` do):

        cap = GramCapture(model, attention_mask, response_mask, params)
        with cap:                       # hooks installed
            logps = sequence_logps(model, ...).logps
            cap.check_graph(logps)      # every use of every selected parameter is hooked
            <backward of sum_s c_s logp_s>
        gram = cap.finish()             # [N, N] Gram of the per-sequence gradients of sum_s c_s logp_s

    The module's rows must be the N sequences: a hooked call's input is either the [N, T, ...] token
    grid, or flat rows [M, ...] fed in the row-major order of the response tokens (the lm_head as
    `sequence_logps` applies it, possibly in consecutive chunks).
    """

    def __init__(
        self,
        model: nn.Module,
        attention_mask: Tensor,
        response_mask: Tensor,
        params: Iterable[str | nn.Parameter] | None = None,
        *,
        strategy: Strategy = "auto",
        compute_dtype: torch.dtype = torch.float32,
        anchor: bool = False,
        fuse_grads: bool = False,
    ) -> None:
        if strategy not in ("auto", "ghost", "materialize"):
            raise GramError(f"strategy must be 'auto', 'ghost' or 'materialize', got {strategy!r}")
        self.model = model
        self.strategy: Strategy = strategy
        self.dtype = compute_dtype
        self.n, self.t = response_mask.shape
        rm = response_mask.bool()
        pos = torch.arange(self.t, device=rm.device)
        last = torch.where(rm, pos, torch.full_like(pos, -1)).amax(1)  # last response token, -1: none
        # A causal LM's position i receives gradient only if i < last response position.
        self.active = (pos[None, :] < last[:, None]) & attention_mask.bool()
        self.grid_seg = self.active.nonzero(as_tuple=True)[0]
        self.n_active = int(self.grid_seg.shape[0])
        self.flat_seg = _flat_rows(rm)
        self.selected = _select_params(model, params)
        self.states = {pid: _ParamState(name, p) for pid, (name, p) in self.selected.items()}
        self.gram = torch.zeros(self.n, self.n, dtype=compute_dtype, device=response_mask.device)
        self.calls: list[_Call] = []
        self.cursor: dict[int, int] = defaultdict(int)
        self.handles: list[Any] = []
        self.uses: dict[int, int] = defaultdict(int)
        self._busy = False
        self.anchor = None
        self.anchors: list[Tensor] = []
        self.use_anchor = anchor  # standalone: this capture drives its own activation-only backward
        self.fuse_grads = fuse_grads
        self._saved_rg: list[tuple[nn.Parameter, bool]] = []
        self._plan()

    # -- set-up ------------------------------------------------------------------------------

    def _plan(self) -> None:
        """Which modules to hook; refuse parameters that no exact rule covers."""
        owners: dict[int, list[str]] = defaultdict(list)
        self.hooked: list[tuple[nn.Module, str, list[tuple[str, nn.Parameter]]]] = []
        unsupported: list[str] = []
        for mname, m in self.model.named_modules():
            own = [(pn, p) for pn, p in m._parameters.items() if p is not None and id(p) in self.selected]
            if not own:
                continue
            kind = _module_kind(m)
            label = f"{mname}.{own[0][0]}" if mname else own[0][0]
            if kind is None:
                unsupported += [f"{mname}.{pn} ({type(m).__name__})" for pn, _ in own]
                continue
            if kind == "embedding" and (m.max_norm is not None or m.scale_grad_by_freq):  # type: ignore[union-attr]
                unsupported.append(f"{label} (Embedding with max_norm/scale_grad_by_freq)")
                continue
            for _, p in own:
                owners[id(p)].append(mname)
            self.hooked.append((m, kind, [(self.selected[id(p)][0], p) for _, p in own]))
        if unsupported:
            raise GramError(
                "sequence_gram cannot compute exact per-sequence gradients for these parameters: "
                + ", ".join(unsupported)
                + ". Supported: nn.Linear (incl. LoRA A/B), nn.Embedding, transformers Conv1D, RMSNorm/"
                "LayerNorm weights and biases. Exclude them with `params=` (names of the others)."
            )

    def __enter__(self) -> GramCapture:
        if self.fuse_grads:
            # Autograd computes no weight gradient for these; the hooks write it (the sum of the
            # per-sequence gradients they build anyway). The anchor keeps activations differentiable.
            self._saved_rg = [(p, p.requires_grad) for _, p in self.selected.values()]
            for p, _ in self._saved_rg:
                p.requires_grad_(False)
                _FUSED_OFF[id(p)] = p
        if self.use_anchor or self.fuse_grads:
            emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
            if emb is None:
                raise GramError("sequence_gram needs a model with get_input_embeddings() (a causal LM)")
            self.handles.append(emb.register_forward_hook(self._anchor_hook, prepend=True))
        for m, kind, own in self.hooked:
            self.handles.append(
                m.register_forward_hook(
                    lambda mod, args, out, _k=kind, _o=own: self._fwd(mod, _k, _o, args, out)
                )
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for p, rg in self._saved_rg:
            p.requires_grad_(rg)
            _FUSED_OFF.pop(id(p), None)
        self._saved_rg = []

    # -- forward -----------------------------------------------------------------------------

    @staticmethod
    def _in_backward() -> bool:
        """True while the autograd engine runs: a forward call then is checkpoint recomputation."""
        return torch._C._current_graph_task_id() != -1

    def _anchor_hook(self, module: nn.Module, args: Any, out: Tensor) -> Tensor | None:
        if self._busy or self._in_backward() or not torch.is_grad_enabled():
            return None
        if not self.use_anchor and _STANDALONE[0] > 0:
            return None
        self.anchor = torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
        self.anchors.append(self.anchor)
        return out + self.anchor

    def _fwd(
        self, module: nn.Module, kind: str, own: list[tuple[str, nn.Parameter]], args: Any, out: Any
    ) -> Tensor | None:
        if self._busy or self._in_backward() or not torch.is_grad_enabled():
            return
        if not self.use_anchor and _STANDALONE[0] > 0:  # a sequence_gram pass inside a training step
            return
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
            raise GramError(f"{type(module).__name__}: expected a tensor positional input and output")
        x = args[0]
        replaced = None
        scale = _embedding_scale(module, x, out) if kind == "embedding" else 1.0
        if kind == "embedding" and (self.use_anchor or self.fuse_grads):
            # Every embedding output gets a zero anchor: a branch that does not depend on the input
            # embeddings (position embeddings) must lie on the path the activation-only backward takes
            # (and be differentiable when autograd skips the weight gradients).
            a = torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
            self.anchors.append(a)
            out = replaced = out + a
        if not out.requires_grad:
            raise GramError(
                f"{type(module).__name__} output does not require grad although its parameters are selected: "
                "is reentrant gradient checkpointing on? Use gradient_checkpointing_kwargs="
                "{'use_reentrant': False} or disable it for sequence_gram"
            )
        lead = tuple(x.shape) if kind == "embedding" else tuple(x.shape[:-1])
        if kind == "embedding" and lead == (1, self.t) and self.n > 1:
            # Position ids shared by all rows (GPT-2's wpe): the [1, T, d] output is broadcast into
            # every sequence, so its gradient would be summed over them. Expanded to [N, T, d] (a view,
            # same values downstream) its gradient keeps the per-sequence rows.
            x = x.expand(self.n, self.t)
            out = replaced = out.expand(self.n, *out.shape[1:])
            lead = (self.n, self.t)
        if lead == (self.n, self.t):
            seg = None
        elif kind == "norm" and len(lead) > 2 and lead[0] == self.n:
            # per-head norms (Qwen3's/Gemma3's q_norm, k_norm on [N, T, H, d] or [N, H, T, d]): every row
            # of sample s belongs to sequence s; `_norm_parts` sums them all
            seg = None
        elif len(lead) == 1 and lead[0] == self.n * self.t and self.n * self.t > self.flat_seg.shape[0]:
            # the whole [N, T] grid flattened to [N*T, d] (OPT's fc1/fc2 and final LayerNorm); response
            # tokens alone are fewer (position 0 never is one), so the two flat layouts cannot be confused
            seg = torch.arange(self.n, device=x.device).repeat_interleave(self.t)
        elif len(lead) == 1:
            key = id(module)
            start = self.cursor[key]
            seg = self.flat_seg[start : start + lead[0]]
            if seg.shape[0] != lead[0]:
                raise GramError(
                    f"{type(module).__name__} got {lead[0]} flat rows beyond the {self.flat_seg.shape[0]} "
                    "response tokens: its rows cannot be attributed to sequences"
                )
            self.cursor[key] = start + lead[0]
        else:
            raise GramError(
                f"{type(module).__name__} input of shape {tuple(x.shape)}: rows cannot be attributed to the "
                f"{self.n} sequences (expected [{self.n}, {self.t}, ...] or response-token rows)"
            )
        call = _Call(
            module, kind, x.detach(), out.detach() if kind == "norm" else None, seg, own, scale=scale
        )
        for _, p in own:
            self.states[id(p)].pending += 1
            self.uses[id(p)] += 1
        self.calls.append(call)
        out.register_hook(lambda g, _c=call: self._on_grad(_c, g))
        return replaced

    def check_graph(self, root: Tensor) -> None:
        """Walk the autograd graph of `root` and refuse parameters used outside the hooked calls.

        Each use of a parameter adds one edge into its AccumulateGrad node; more edges than hooked
        calls means a functional use (e.g. `F.linear(h, embed.weight)`) that the hooks do not see.
        """
        if root.grad_fn is None:
            raise GramError("the log-probs do not depend on any parameter (no autograd graph)")
        edges: dict[int, int] = defaultdict(int)
        seen: set[int] = set()
        stack = [root.grad_fn]
        while stack:
            node = stack.pop()
            for nxt, _ in node.next_functions:
                if nxt is None:
                    continue
                var = getattr(nxt, "variable", None)
                if var is not None:
                    edges[id(var)] += 1
                elif id(nxt) not in seen:
                    seen.add(id(nxt))
                    stack.append(nxt)
        missed = [st.name for pid, st in self.states.items() if edges.get(pid, 0) > self.uses.get(pid, 0)]
        if missed:
            raise GramError(
                "these parameters are used outside the modules sequence_gram hooks (a functional use), "
                "so their per-sequence gradients would be incomplete: " + ", ".join(missed)
            )

    # -- backward ----------------------------------------------------------------------------

    def _rows(self, call: _Call, t: Tensor) -> tuple[Tensor, Tensor]:
        """(rows that can carry gradient, their sequence index)."""
        if call.seg is None:
            return t[self.active], self.grid_seg
        return t, call.seg

    def _segsum(self, call: _Call, t: Tensor) -> Tensor:
        """Per-sequence sum of rows [N, d] (grid calls: inactive rows hold zero gradient)."""
        if call.seg is None:
            return t.sum(1, dtype=self.dtype)
        return t.new_zeros(self.n, t.shape[-1], dtype=self.dtype).index_add_(0, call.seg, t.to(self.dtype))

    def _on_grad(self, call: _Call, grad: Tensor) -> None:
        if call.done:  # a tensor hook can fire again if the graph is reused (retain_graph)
            return
        call.done = True
        dt = self.dtype
        if call.kind in ("linear", "conv1d"):
            for _name, p in call.params:
                st = self.states[id(p)]
                if p is call.module.weight:
                    a, b = (grad, call.x) if call.kind == "linear" else (call.x, grad)
                    st.outers.append(self._dense_part(call, a, b))
                else:  # bias
                    self._add_vector(st, self._segsum(call, grad))
        elif call.kind == "embedding":
            ids, seg = self._rows(call, call.x)
            d, _ = self._rows(call, grad)
            pad = call.module.padding_idx  # type: ignore[union-attr]
            if pad is not None:  # torch gives the padding row no gradient
                keep = ids != pad
                ids, d, seg = ids[keep], d[keep], seg[keep]
            name, p = call.params[0]
            b = d.to(dt) if call.scale == 1.0 else d.to(dt) * call.scale
            self.states[id(p)].outers.append(
                _Outer(a=None, ids=ids, b=b, seg=seg, p=p.shape[0], q=d.shape[-1], rows=ids.shape[0])
            )
        elif call.kind == "norm":
            self._norm_parts(call, grad)
        for _, p in call.params:
            st = self.states[id(p)]
            st.pending -= 1
            if st.pending == 0:
                self._flush(st)
        call.x = call.y = None  # type: ignore[assignment]

    def _dense_part(self, call: _Call, a: Tensor, b: Tensor) -> _Outer:
        p, q = a.shape[-1], b.shape[-1]
        if call.seg is None:
            return _Outer(
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
        return _Outer(
            a=_mm(a, self.dtype), ids=None, b=_mm(b, self.dtype), seg=call.seg, p=p, q=q, rows=a.shape[0]
        )

    def _add_vector(self, st: _ParamState, v: Tensor) -> None:
        st.vector = v if st.vector is None else st.vector + v

    def _norm_parts(self, call: _Call, d: Tensor) -> None:
        """Elementwise-affine norm y = c(x) + w * n(x) (+ b): per-sequence grads sum_t dy*n and sum_t dy.

        n(x) is obtained without knowing the norm's formula: n = f(x; w=1, b=0) - f(x; w=0, b=0)
        (this also covers Gemma's (1 + w) scaling). That y is affine in w is verified on the first call.
        """
        m = call.module
        x = call.x
        w = m.weight
        bias = getattr(m, "bias", None)
        pdict = {"weight": torch.ones_like(w)}
        zdict = {"weight": torch.zeros_like(w)}
        if isinstance(bias, torch.Tensor):
            pdict["bias"] = torch.zeros_like(bias)
            zdict["bias"] = torch.zeros_like(bias)
        verified = _NORM_FORM.get(m)
        self._busy = True
        try:
            with torch.no_grad():
                f1 = torch.func.functional_call(m, pdict, (x,))
                # f0 = f(x; w=0, b=0) is 0 for Llama/LayerNorm-style norms: computed once to check
                f0 = None if verified == "zero" else torch.func.functional_call(m, zdict, (x,))
                if verified is None:
                    y = call.y
                    rebuilt = f0 + (f1 - f0) * w + (bias if isinstance(bias, torch.Tensor) else 0)  # type: ignore[operator]
                    tol = 1e-2 if y.dtype in (torch.float16, torch.bfloat16) else 1e-4  # type: ignore[union-attr]
                    if not torch.allclose(rebuilt.float(), y.float(), rtol=tol, atol=tol):  # type: ignore[union-attr]
                        raise GramError(
                            f"{type(m).__name__}: output is not elementwise-affine in its weight "
                            "(y = c(x) + w * n(x) + b); its per-sequence gradient is not supported"
                        )
                    _NORM_FORM[m] = "zero" if not bool(f0.any()) else "affine"  # type: ignore[union-attr]
        finally:
            self._busy = False
        nx = f1 if f0 is None else f1 - f0
        for _, p in call.params:
            st = self.states[id(p)]
            contrib = d.to(self.dtype) * nx.to(self.dtype) if p is w else d
            if call.seg is None and contrib.dim() > 3:  # per-head norm: [N, ..., d] -> [N, rows, d]
                contrib = contrib.reshape(contrib.shape[0], -1, contrib.shape[-1])
            self._add_vector(st, self._segsum(call, contrib))

    def _flush(self, st: _ParamState) -> None:
        if st.vector is None and not st.outers:
            return
        grad = (
            torch.zeros(st.param.shape, dtype=self.dtype, device=st.param.device) if self.fuse_grads else None
        )
        self.gram += _param_gram(st, self.n, self.strategy, self.dtype, grad)
        st.outers, st.vector = [], None
        if grad is not None:
            p = st.param
            g = grad.to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g

    def finish(self) -> Tensor:
        """Process parameters whose calls did not all receive a gradient (their other uses had none)."""
        for st in self.states.values():
            self._flush(st)
            st.pending = 0
        self.calls.clear()
        return self.gram


# ---------------------------------------------------------------------------------------------
# public entry points


def sequence_gram_and_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    params: Iterable[str | nn.Parameter] | None = None,
    *,
    strategy: Strategy = "auto",
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """`sequence_gram` plus the summed log-probs [N] it differentiated (detached), from the same forward."""
    from preflens.logprobs import sequence_logps

    shapes = [tuple(t.shape) for t in (input_ids, attention_mask, response_mask)]
    if input_ids.dim() != 2 or len(set(shapes)) != 1:
        raise GramError(
            "input_ids, attention_mask and response_mask must be [N, T] tensors of one shape; got "
            + ", ".join(str(s) for s in shapes)
        )
    rm = response_mask.bool()
    cap = GramCapture(
        model, attention_mask, rm, params, strategy=strategy, compute_dtype=compute_dtype, anchor=True
    )
    _STANDALONE[0] += 1
    try:
        with torch.enable_grad(), cap:
            logps = sequence_logps(model, input_ids, attention_mask, rm).logps
            if not rm.any():
                return torch.zeros(cap.n, cap.n, dtype=compute_dtype), logps.detach()
            cap.check_graph(logps)
            if cap.anchor is None:
                raise GramError("the input-embedding hook did not run: cannot drive the backward")
            # Activation-only backward: asking for the anchor's gradient makes autograd skip every
            # weight gradient (they are what the hooks replace).
            torch.autograd.grad(logps.sum(), cap.anchors)
    finally:
        _STANDALONE[0] -= 1
    return cap.finish(), logps.detach()


def sequence_gram(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    params: Iterable[str | nn.Parameter] | None = None,
    *,
    strategy: Strategy = "auto",
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """[N, N] Gram matrix of the per-sequence gradients of the summed response log-probs.

    G[s, t] = <grad logp_s, grad logp_t> over the trainable parameters (full model or LoRA adapters),
    or over `params` (names from `model.named_parameters()` or the Parameters themselves).
    Exact, from one forward and one activation-only backward (module docstring). Dropout follows the
    model's mode: call `model.eval()` first for the deterministic gradient the papers analyse.
    `strategy` forces the ghost or materialized form everywhere (default: cheaper per parameter).
    """
    return sequence_gram_and_logps(
        model,
        input_ids,
        attention_mask,
        response_mask,
        params,
        strategy=strategy,
        compute_dtype=compute_dtype,
    )[0]


def sequence_grad_norms(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    params: Iterable[str | nn.Parameter] | None = None,
) -> Tensor:
    """|grad logp_s| per sequence [N] (normalized PO, seed 000 Sec. 5.1, needs them per step)."""
    g = sequence_gram(model, input_ids, attention_mask, response_mask, params)
    return g.diagonal().clamp_min(0).sqrt()


def token_gram(
    model: nn.Module,
    input_ids: Tensor,
    response_mask: Tensor,
    params: Iterable[str | nn.Parameter] | None = None,
    *,
    max_tokens: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Gram of per-*token* gradients of the response tokens of a few sequences.

    `input_ids`, `response_mask` are [S, T] (right-padded rows, e.g. one chosen and one rejected).
    Each response token t of row s becomes its own sequence (the row truncated after t, with only t
    marked), so the sequence Gram of that batch is the token Gram. Returns (gram [K, K], owner [K, 2]
    = (row, response index)) with K the response tokens in row-major order (at most `max_tokens` per
    row, the first ones). Costs K forward rows: for a probe pair, not for training.
    """
    rows = []
    owner = []
    for s in range(input_ids.shape[0]):
        pos = response_mask[s].bool().nonzero(as_tuple=True)[0]
        if max_tokens is not None:
            pos = pos[:max_tokens]
        for j, t in enumerate(pos.tolist()):
            rows.append((s, t))
            owner.append((s, j))
    if not rows:
        raise GramError("token_gram: no response tokens")
    longest = max(t for _, t in rows) + 1
    k = len(rows)
    ids = input_ids.new_zeros(k, longest)
    att = torch.zeros(k, longest, dtype=torch.long, device=input_ids.device)
    rm = torch.zeros(k, longest, dtype=torch.bool, device=input_ids.device)
    for i, (s, t) in enumerate(rows):
        ids[i, : t + 1] = input_ids[s, : t + 1]
        att[i, : t + 1] = 1
        rm[i, t] = True
    g = sequence_gram(model, ids, att, rm, params)
    return g, torch.tensor(owner, dtype=torch.long)


class StepGramCapture:
    """Entanglement statistics from a training step's own backward (DESIGN.md's target: <= 1.3x a plain step;
    measured 1.35x on a CPU, 1.08x with LoRA: BENCHMARKS.md).

    In a step with loss L(logp_1..logp_N), the output-gradient a layer sees for sequence s is
    c_s = dL/dlogp_s times the output-gradient of logp_s alone, so the hooks accumulate
    Gram_L[s, t] = c_s c_t G[s, t] and G[s, t] = Gram_L[s, t] / (c_s c_t). Pairs with c_s = 0 (a
    saturated hinge) give NaN rows: nothing can be learned about them from this step.

        cap = StepGramCapture(model, batch["attention_mask"], batch["response_mask"])
        with cap:
            seq = sequence_logps(model, ...)
            cap.watch(seq.logps)          # graph check + hook for c = dL/dlogp
            loss = ...; loss.backward()   # the trainer's ordinary backward (weight grads as usual)
        gram = cap.result()               # [N, N] Gram of the log-prob gradients

    `fuse_grads=True`: autograd skips the weight gradients of the selected parameters and the hooks
    write them (p.grad += sum_s G_s, exactly the ordinary gradient), so the per-sequence gradients
    the statistics need replace that work instead of adding to it. DDP's gradient synchronisation
    hooks on autograd's weight gradients, so under DDP the caller keeps DDP out (`no_sync`) and
    all-reduces the gradients itself (the trainer: `manual_grad_sync`); not for FSDP/DeepSpeed.
    """

    def __init__(
        self,
        model: nn.Module,
        attention_mask: Tensor,
        response_mask: Tensor,
        params: Iterable[str | nn.Parameter] | None = None,
        *,
        check_graph: bool = True,
        fuse_grads: bool = False,
    ) -> None:
        self.cap = GramCapture(model, attention_mask, response_mask.bool(), params, fuse_grads=fuse_grads)
        self.c: Tensor | None = None
        self._check = check_graph

    def __enter__(self) -> StepGramCapture:
        self.cap.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cap.remove()

    def watch(self, logps: Tensor) -> None:
        if self._check:
            self.cap.check_graph(logps)

        def grab(g: Tensor) -> None:
            self.c = g.detach().to(self.cap.dtype)

        logps.register_hook(grab)

    def result(self) -> Tensor:
        self.cap.remove()
        gram_l = self.cap.finish()
        if self.c is None:
            raise GramError("StepGramCapture: the watched log-probs received no gradient (no backward?)")
        scale = torch.outer(self.c, self.c)
        return torch.where(scale != 0, gram_l / scale, torch.full_like(gram_l, float("nan")))
