"""Cross-example gradient inner products: <grad of the training sequences' loss share, grad logp_j> for
every training sequence s of a batch and every sequence j of a fixed probe set, from the captures of one
training step plus one activation-only pass over the probe set.

Why: to first order one SGD step on training pair i changes a held-out log-prob by
-eta * <grad l_i, grad logp_j> (the in-run attribution of Wang et al. 2024, "Data Shapley in One Training
Run", arXiv 2406.11011, Sec. 4, which computes the same cross-example products with ghost dot-products).
`preflens.grad.api` gives the Gram *within* one batch; this module gives the block *between* two batches
without building either side's per-sequence gradients of the whole model.

How, per parameter (the parts of `preflens.grad.parts`, built by the rules of `preflens.grad.rules`):
- a linear map's per-sequence gradient G_s = sum_{r in s} a_r b_r^T (a = output-gradient row, b = input
  row), so <G_s, G_j> = sum_{r in s, u in j} <a_r, a_u> <b_r, b_u> (the "ghost" form: trace products of
  the two sequences' input and output-gradient matrices), or, when cheaper, G_s and G_j are built in
  column slices and multiplied ("materialized"); one-hot parts (embeddings, tied heads) compare token ids;
- biases and norm weights are [N, d] per-sequence vectors: a plain matrix product.
A diagonal preconditioner D (Adam's denominator) gives <G_s, G_j / D>, which only the materialized form
can take (D does not factor through the ghost products).

The training side rides on the step's own backward (`CrossCapture`, like `StepGramCapture`): the
output-gradient of sequence s there is c_s times that of logp_s (c_s = dL/dlogp_s, the loss's margin
weights divided by the batch size, `preflens.losses.margin_weights`), so the products are already those
of the loss shares and nothing is divided. For a token-level loss the captured output-gradient is still
exactly the gradient of sequence s's share of the loss, so the products stay exact. The probe side
(`probe_parts`) is a standalone pass (its forward and activation-only backward pause the step's captures,
`ActiveCaptures`), run at the same weights before the step's forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from preflens.grad.capture import GramCapture, _ParamState
from preflens.grad.errors import GramError
from preflens.grad.kernels import BLOCK_ELEMS, Strategy, param_gram
from preflens.grad.parts import Outer, operand
from preflens.logprobs import sequence_logps

__all__ = ["CrossCapture", "ProbeParts", "cross_param", "objective_cross", "probe_parts", "sequence_cross"]

# A parameter's parts of one pass: (list of factored parts, per-sequence vectors [N, d] or None).
Parts = tuple[list[Outer], Tensor | None]


@dataclass
class ProbeParts:
    """The probe set's parts per parameter, its size and its summed log-probs (detached).

    Keyed by parameter name, not by the Parameter object: under FSDP2 the root module's Parameter
    objects are swapped between sharded and gathered ones (`preflens.grad.capture`), so the objects
    the probe pass and a later training step's capture select can differ while the names do not."""

    parts: dict[str, Parts]
    n: int
    logps: Tensor


class _KeepCapture(GramCapture):
    """A GramCapture that keeps each parameter's parts instead of reducing them to a Gram.

    `on_parts(st)` decides what happens to them (the default keeps them in `kept`).
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.kept: dict[int, Parts] = {}

    def _flush(self, st: _ParamState) -> None:  # noqa: D401 - overrides the engine's reduction
        if st.vector is None and not st.outers:
            return
        self.on_parts(st)
        st.outers, st.vector = [], None

    def on_parts(self, st: _ParamState) -> None:
        pid = id(st.param)
        outers, vec = self.kept.get(pid, ([], None))
        if st.vector is not None:
            vec = st.vector if vec is None else vec + st.vector
        self.kept[pid] = (outers + list(st.outers), vec)


def probe_parts(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    params: Iterable[str | nn.Parameter] | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> ProbeParts:
    """One forward and one activation-only backward of sum_j logp_j over the probe rows [Np, T]; keeps
    every selected parameter's parts (activations and output-gradients, never a weight-sized gradient)."""
    rm = response_mask.bool()
    cap = _KeepCapture(model, attention_mask, rm, params, compute_dtype=compute_dtype, anchor=True)
    with torch.enable_grad(), cap:
        logps = sequence_logps(model, input_ids, attention_mask, rm).logps
        if not rm.any():
            raise GramError("probe set: no response tokens")
        cap.check_graph(logps)
        if cap.anchor is None:
            raise GramError("the input-embedding hook did not run: cannot drive the backward")
        torch.autograd.grad(logps.sum(), cap.anchors)
    cap.finish()
    parts = {cap.states[pid].name: part for pid, part in cap.kept.items()}
    return ProbeParts(parts=parts, n=cap.n, logps=logps.detach())


# -- the kernels -----------------------------------------------------------------------------------


def _flat(outers: list[Outer], dtype: torch.dtype) -> list[Outer]:
    return [o.flat(dtype) for o in outers]


def _seg_reduce(block: Tensor, seg_r: Tensor, seg_c: Tensor, n_r: int, n_c: int) -> Tensor:
    tmp = block.new_zeros(n_r, block.shape[1]).index_add_(0, seg_r, block)
    return block.new_zeros(n_r, n_c).index_add_(1, seg_c, tmp)


def _inputs(k: Outer, m: Outer, r0: int, r1: int, dtype: torch.dtype) -> Tensor:
    """<a_r, a_u> for rows r in k[r0:r1] and all rows u of m (one-hot rows: comparison or gather)."""
    if k.ids is None and m.ids is None:
        return (k.a[r0:r1].to(dtype) @ m.a.to(dtype).T).to(dtype)  # type: ignore[index,union-attr]
    if k.ids is not None and m.ids is not None:
        return (k.ids[r0:r1, None] == m.ids[None, :]).to(dtype)
    if k.ids is not None:
        return m.a[:, k.ids[r0:r1]].T.to(dtype)  # type: ignore[index]
    return k.a[r0:r1][:, m.ids].to(dtype)  # type: ignore[index]


def _ghost_cross(ta: list[Outer], pb: list[Outer], nt: int, np_: int, dtype: torch.dtype) -> Tensor:
    out = torch.zeros(nt, np_, dtype=dtype, device=ta[0].b.device)  # type: ignore[union-attr]
    for k in ta:
        for m in pb:
            step = max(1, BLOCK_ELEMS // max(1, m.rows))
            for r0 in range(0, k.rows, step):
                r1 = min(k.rows, r0 + step)
                bb = (k.b[r0:r1].to(dtype) @ m.b.to(dtype).T).to(dtype)  # type: ignore[index,union-attr]
                out += _seg_reduce(_inputs(k, m, r0, r1, dtype) * bb, k.seg[r0:r1], m.seg, nt, np_)  # type: ignore[index,arg-type]
    return out


def _slabs(
    outers: list[Outer], n: int, dtype: torch.dtype
) -> list[tuple[str, Tensor, Tensor, Tensor | None]]:
    """Each part as ("bmm", a [n, L, p], b [n, L, q], None), rows of a sequence stacked (grid parts as
    they are, flat dense parts padded per sequence), or ("hot", ids, b, seg) for one-hot parts."""
    out: list[tuple[str, Tensor, Tensor, Tensor | None]] = []
    for o in outers:
        if o.grid is not None:
            out.append(("bmm", o.grid[0], o.grid[1], None))  # inactive rows: zero output-gradient
        elif o.ids is not None:
            out.append(("hot", o.ids, o.b, o.seg))  # type: ignore[arg-type]
        else:
            out.append(("bmm", *_padded(o, n), None))
    return out


def _padded(o: Outer, n: int) -> tuple[Tensor, Tensor]:
    """A flat dense part's rows stacked per sequence: a [n, L, p], b [n, L, q], zero rows after a
    sequence's own (L: the longest sequence's row count).

    Rows already in sequence order with equal counts (e.g. a lean head's response rows of equal-length
    responses) are a view; otherwise one scatter into an uninitialised buffer whose padding rows alone
    are zeroed (a full zero fill plus a sorted copy of a [rows, V] head part cost as much as its bmm)."""
    seg: Tensor = o.seg  # type: ignore[assignment]
    a: Tensor = o.a  # type: ignore[assignment]
    b: Tensor = o.b  # type: ignore[assignment]
    counts = torch.bincount(seg, minlength=n)
    longest = int(counts.max()) if o.rows else 0
    ordered = o.rows == 0 or bool((seg[1:] >= seg[:-1]).all())
    if ordered and o.rows == n * longest and bool((counts == longest).all()):
        return a.reshape(n, longest, o.p), b.reshape(n, longest, o.q)
    if not ordered:
        idx = torch.argsort(seg, stable=True)
        seg, a, b = seg[idx], a[idx], b[idx]
    pos = torch.arange(o.rows, device=seg.device) - (torch.cumsum(counts, 0) - counts)[seg]
    out = []
    for x, width in ((a, o.p), (b, o.q)):
        buf = x.new_empty(n, longest, width)
        buf.index_put_((seg, pos), x)
        for s, c in enumerate(counts.tolist()):
            if c < longest:
                buf[s, c:].zero_()
        out.append(buf)
    return out[0], out[1]


def _dense_slice(
    slabs: list[tuple[str, Tensor, Tensor, Tensor | None]],
    n: int,
    q: int,
    c0: int,
    c1: int,
    dtype: torch.dtype,
) -> Tensor:
    """Per-sequence gradients restricted to rows c0:c1 of the [p, q] weight: [n, c1 - c0, q].

    The first dense part's bmm writes the slice itself (no zero-filled buffer to add it into: on one CPU
    thread the fill and the extra pass cost 40% of the bmm, BENCHMARKS.md), later ones accumulate in
    place; a one-hot part alone starts from zeros."""
    g: Tensor | None = None
    for kind, x, b, _seg in slabs:
        if kind != "bmm":
            continue
        xa, xb = operand(x[:, :, c0:c1], dtype).transpose(1, 2), operand(b, dtype)
        if g is None:
            g = torch.bmm(xa, xb).to(dtype)
        elif xa.dtype == g.dtype and xb.dtype == g.dtype:
            g.baddbmm_(xa, xb)
        else:  # half-precision CUDA operands into a float32 slice
            g += torch.bmm(xa, xb).to(dtype)
    if g is None:
        g = torch.zeros(n, c1 - c0, q, dtype=dtype, device=slabs[0][2].device)
    for kind, x, b, seg in slabs:
        if kind == "bmm":
            continue
        sel = (x >= c0) & (x < c1)
        if bool(sel.any()):
            flat = seg[sel] * (c1 - c0) + (x[sel] - c0)  # type: ignore[index]
            g.view(n * (c1 - c0), q).index_add_(0, flat, b[sel].to(dtype))
    return g


def _materialized_cross(
    ta: list[Outer], pb: list[Outer], nt: int, np_: int, dtype: torch.dtype, denom: Tensor | None
) -> Tensor:
    p, q = ta[0].p, ta[0].q
    st, sp = _slabs(ta, nt, dtype), _slabs(pb, np_, dtype)
    out = torch.zeros(nt, np_, dtype=torch.float64, device=st[0][2].device)
    step = max(1, BLOCK_ELEMS // max(1, (nt + np_) * q))
    for c0 in range(0, p, step):
        c1 = min(p, c0 + step)
        gt = _dense_slice(st, nt, q, c0, c1, dtype)
        gp = _dense_slice(sp, np_, q, c0, c1, dtype)
        if denom is not None:
            gp = gp / denom[c0:c1].to(dtype)
        out += (gt.reshape(nt, -1) @ gp.reshape(np_, -1).T).double()
    return out.to(dtype)


def _ghost_cost(ta: list[Outer], pb: list[Outer]) -> float:
    q = ta[0].q
    return sum(
        float(k.rows) * m.rows * ((k.p if k.ids is None and m.ids is None else 1) + q) for k in ta for m in pb
    )


def _materialize_cost(ta: list[Outer], pb: list[Outer], nt: int, np_: int) -> float:
    p, q = ta[0].p, ta[0].q
    build = sum(float(o.rows) * (p * q if o.ids is None else q) for o in ta + pb)
    return build + float(nt) * np_ * p * q


def cross_param(
    name: str,
    train: Parts,
    probe: Parts,
    nt: int,
    np_: int,
    *,
    strategy: Strategy = "auto",
    dtype: torch.dtype = torch.float32,
    denom: Tensor | None = None,
) -> Tensor:
    """[Nt, Np] inner products of one parameter's per-sequence gradients between two passes.

    `denom` (the parameter's shape): a diagonal preconditioner, <G_s, G_j / denom> (materialized form).
    """
    t_outers, t_vec = train
    p_outers, p_vec = probe
    if (t_vec is not None and t_outers) or (p_vec is not None and p_outers):
        raise GramError(f"parameter '{name}' is shared between a norm/bias and a matrix use")
    if t_vec is not None or p_vec is not None:
        if t_vec is None or p_vec is None:
            raise GramError(f"parameter '{name}': its parts differ in kind between the two passes")
        pv = p_vec.to(dtype)
        if denom is not None:
            pv = pv / denom.reshape(1, -1).to(dtype)
        return (t_vec.to(dtype) @ pv.T).to(dtype)
    if not t_outers or not p_outers:  # used in one pass only (e.g. no response token reached it)
        return torch.zeros(nt, np_, dtype=dtype)
    ghost = strategy == "ghost" or (
        strategy == "auto"
        and _ghost_cost(t_outers, p_outers) < _materialize_cost(t_outers, p_outers, nt, np_)
    )
    if denom is not None:
        ghost = False  # a preconditioner does not factor through the ghost products
    if ghost:
        return _ghost_cross(_flat(t_outers, dtype), _flat(p_outers, dtype), nt, np_, dtype)
    d = denom.reshape(t_outers[0].p, t_outers[0].q) if denom is not None else None
    return _materialized_cross(t_outers, p_outers, nt, np_, dtype, d)


# -- the training side -----------------------------------------------------------------------------


class CrossCapture(_KeepCapture):
    """Rides on a training step's forward and backward (like `StepGramCapture`) and reduces each
    parameter's parts against the probe set's as soon as the parameter's gradient is complete.

        probe = probe_parts(model, probe_ids, probe_att, probe_rm)       # same weights, before the step
        cap = CrossCapture(model, batch["attention_mask"], batch["response_mask"], probe)
        with cap:
            seq = sequence_logps(model, ...); cap.watch(seq.logps)
            loss = ...; loss.backward()
        cross = cap.result()   # [Nt, Np]: <grad of sequence s's share of the loss, grad logp_j>

    `keep=True` also keeps the parts (memory: the step's activations) for `preconditioned(denoms)`,
    the same products through a diagonal preconditioner known only after the optimizer step (Adam).
    """

    def __init__(
        self,
        model: nn.Module,
        attention_mask: Tensor,
        response_mask: Tensor,
        probe: ProbeParts,
        params: Iterable[str | nn.Parameter] | None = None,
        *,
        strategy: Strategy = "auto",
        compute_dtype: torch.dtype = torch.float32,
        keep: bool = False,
        check_graph: bool = True,
        anchor: bool = False,
        with_gram: bool = False,
    ) -> None:
        super().__init__(model, attention_mask, response_mask.bool(), params, strategy=strategy,
                         compute_dtype=compute_dtype, anchor=anchor)  # fmt: skip
        self.probe = probe
        self.keep = keep
        self._by_name = {st.name: pid for pid, st in self.states.items()}
        self._check = check_graph
        missing = [st.name for st in self.states.values() if st.name not in probe.parts]
        if missing:
            raise GramError(
                "the probe pass has no parts for these parameters (another parameter selection?): "
                + ", ".join(missing[:5])
            )
        self.cross = torch.zeros(self.n, probe.n, dtype=compute_dtype, device=response_mask.device)
        self.watched = False
        self.with_gram = with_gram  # also the training batch's own Gram (of the loss shares), self.gram
        self.c: Tensor | None = None  # dL/dlogp of the watched log-probs (read in the backward)

    def on_parts(self, st: _ParamState) -> None:
        part: Parts = (list(st.outers), st.vector)
        c = cross_param(
            st.name, part, self.probe.parts[st.name], self.n, self.probe.n,
            strategy=self.strategy, dtype=self.dtype,
        )  # fmt: skip
        self.cross += c.to(self.cross.device)
        if self.with_gram:
            self.gram += param_gram(st.name, st.outers, st.vector, self.n, self.strategy, self.dtype)
        if self.keep:
            super().on_parts(st)

    def watch(self, logps: Tensor) -> None:
        """Check the graph once (every use of every selected parameter is hooked)."""
        if self._check:
            self.check_graph(logps)
        self.watched = True

        def grab(g: Tensor) -> None:
            self.c = g.detach().to(self.dtype)

        if logps.requires_grad:
            logps.register_hook(grab)

    def logp_cosines(self) -> Tensor:
        """[B] cosine of the chosen and rejected log-prob gradients of each pair (rows: chosen, then
        rejected), from the loss-share Gram (`with_gram=True`): Gram_L[s, t] = c_s c_t G[s, t], so the
        cosine is Gram_L's times sign(c_w c_l); NaN where a weight is 0."""
        if not self.with_gram or self.c is None:
            raise GramError("CrossCapture.logp_cosines needs with_gram=True and a watched backward")
        b = self.n // 2
        g = self.gram
        idx = torch.arange(b, device=g.device)
        inner = g[idx, idx + b]
        norms = (g.diagonal()[:b].clamp_min(0) * g.diagonal()[b:].clamp_min(0)).sqrt()
        sign = torch.sign(self.c[:b] * self.c[b:]).to(g.device)
        cos = inner / norms * sign
        return torch.where((norms > 0) & (sign != 0), cos, torch.full_like(cos, float("nan")))

    def result(self) -> Tensor:
        """[Nt, Np] cross products of this micro-batch (parameters whose calls got no gradient: zero)."""
        self.remove()
        self.finish()
        return self.cross

    def preconditioned(self, denoms: dict[int, Tensor]) -> Tensor:
        """[Nt, Np] <G_s, G_j / D> with D = `denoms[id(param)]` (needs `keep=True`); parameters
        without a denominator are left out (the caller says which)."""
        if not self.keep:
            raise GramError("CrossCapture.preconditioned needs keep=True")
        out = torch.zeros_like(self.cross)
        for pid in self.kept:
            if pid in denoms:
                out += self.preconditioned_param(self.states[pid].name, denoms[pid])
        return out

    def preconditioned_param(self, name: str, denom: Tensor) -> Tensor:
        """[Nt, Np] <G_s, G_j / D> of one parameter (by name; zero when this pass kept no parts of it):
        the unit a caller loops over when D arrives one parameter at a time (FSDP2 gathers each D from
        its shards, `training.attribution`)."""
        if not self.keep:
            raise GramError("CrossCapture.preconditioned needs keep=True")
        pid = self._by_name.get(name)
        part = self.kept.get(pid) if pid is not None else None
        if part is None:
            return torch.zeros_like(self.cross)
        return cross_param(
            name, part, self.probe.parts[name], self.n, self.probe.n, dtype=self.dtype, denom=denom
        ).to(self.cross.device)


def sequence_cross(
    model: nn.Module,
    batch: tuple[Tensor, Tensor, Tensor],
    weights: Tensor | Callable[[Tensor], Tensor],
    probe: ProbeParts,
    params: Iterable[str | nn.Parameter] | None = None,
    *,
    strategy: Strategy = "auto",
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Standalone: [Nt, Np] <w_s grad logp_s, grad logp_j> for the rows of `batch` (ids, attention,
    response mask) and per-sequence weights w [Nt], from one forward and an activation-only backward of
    sum_s w_s logp_s; also returns the batch's log-probs (detached).

    `weights` may be a function of the (detached) log-probs [Nt] (the margin weights of a loss at the
    current model), evaluated between the forward and the backward.
    """
    ids, att, rm = batch
    rm = rm.bool()
    cap = CrossCapture(
        model, att, rm, probe, params, strategy=strategy, compute_dtype=compute_dtype, anchor=True
    )
    with torch.enable_grad(), cap:
        logps = sequence_logps(model, ids, att, rm).logps
        cap.check_graph(logps)
        if cap.anchor is None:
            raise GramError("the input-embedding hook did not run: cannot drive the backward")
        w = weights(logps.detach()) if callable(weights) else weights
        torch.autograd.grad((logps * w.to(logps.dtype).detach()).sum(), cap.anchors)
    return cap.result(), logps.detach()


def objective_cross(
    model: nn.Module,
    batch: tuple[Tensor, Tensor, Tensor],
    objective: Callable[[Any], Tensor],
    probe: ProbeParts,
    params: Iterable[str | nn.Parameter] | None = None,
    *,
    return_tokens: bool = False,
    strategy: Strategy = "auto",
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Any]:
    """Standalone: [Nt, Np] <grad of sequence s's share of `objective(seq)`, grad logp_j>, where `seq` is
    the batch's `SequenceLogps` (per-token log-probs with `return_tokens`), from one forward and an
    activation-only backward of the scalar objective (e.g. the sum of a loss's per-pair values: exact for
    token-level losses too). Returns the products and the detached `SequenceLogps`."""
    ids, att, rm = batch
    rm = rm.bool()
    cap = CrossCapture(
        model, att, rm, probe, params, strategy=strategy, compute_dtype=compute_dtype, anchor=True
    )
    with torch.enable_grad(), cap:
        seq = sequence_logps(model, ids, att, rm, return_tokens=return_tokens)
        cap.check_graph(seq.logps)
        if cap.anchor is None:
            raise GramError("the input-embedding hook did not run: cannot drive the backward")
        value = objective(seq)
        if value.requires_grad:
            torch.autograd.grad(value, cap.anchors, allow_unused=True)
    for k, v in vars(seq).items():
        if isinstance(v, Tensor):
            setattr(seq, k, v.detach())
    return cap.result(), seq
