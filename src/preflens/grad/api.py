"""Entry points: the Gram of per-sequence gradients of a batch, its diagonal, per-token Grams, and the
capture that reads them off a training step's own backward.

- `sequence_gram` / `sequence_gram_and_logps` run their own forward and an activation-only backward
  (autograd is asked for the gradient of zero "anchors" added to the embedding outputs, so no weight
  gradient is computed);
- `StepGramCapture` rides on a training step's forward and backward: there the output-gradient of
  sequence s is c_s times that of logp_s, c_s = dL/dlogp_s (read from a hook on the log-probs), so
  the log-prob Gram is Gram_L[s, t] / (c_s c_t).
A standalone pass inside a step (the `normalized` loss's gradient norms) pauses the step's capture
through `preflens.grad.capture.ActiveCaptures`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from preflens.grad.capture import GramCapture
from preflens.grad.errors import GramError
from preflens.grad.kernels import Strategy, layer_forms
from preflens.grad.memory import (
    MAX_PASSES,
    MemoryBudgetError,
    MemoryEstimate,
    choose_forms,
    estimate_gram_memory,
    human,
    plan_rows,
    resolve_budget,
    skip_layers_allowed,
)
from preflens.logprobs import sequence_logps

__all__ = [
    "StepGramCapture",
    "agree_rows",
    "gram_rows_per_run",
    "row_lengths",
    "sequence_grad_norms",
    "sequence_gram",
    "sequence_gram_and_logps",
    "token_gram",
]


def row_lengths(attention_mask: Tensor, response_mask: Tensor) -> list[int]:
    """Per row, the tokens a Gram pass runs over: up to the last attended or response position (right
    padding), at least 1."""
    t = attention_mask.shape[1]
    pos = torch.arange(1, t + 1, device=attention_mask.device)
    used = ((attention_mask != 0) | response_mask.bool()) * pos
    return [max(1, int(x)) for x in used.max(1).values.tolist()] if t else [1] * attention_mask.shape[0]


def gram_rows_per_run(
    model: nn.Module,
    lengths: list[int],
    params: Iterable[str | nn.Parameter] | None = None,
    *,
    max_memory: int | str | None = "auto",
    compute_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    what: str = "sequence_gram",
) -> tuple[int, MemoryEstimate]:
    """How many of these rows one Gram pass may take under the budget, and the estimate of such a pass
    (its longest rows: the worst chunk). Raises `MemoryBudgetError` (one line: layer, shape, bytes) when
    even two rows (one pair's chosen and rejected; one row if there is only one) cannot fit."""
    budget = resolve_budget(max_memory, device)
    sel = None if params is None else list(params)
    worst = sorted(lengths, reverse=True)
    fixed: dict[str, str] = {}

    def est(k: int) -> MemoryEstimate:
        # per layer, the form that fits the budget (issue 14 item 3: grad.memory.choose_forms)
        forms = choose_forms(model, worst[:k], budget, sel, compute_dtype=compute_dtype, fixed=fixed)
        return estimate_gram_memory(model, worst[:k], params=sel, compute_dtype=compute_dtype, forms=forms)

    n = len(lengths)
    try:
        rows = plan_rows(est, n, budget, min_rows=min(2, n), what=what)
    except MemoryBudgetError:
        if not skip_layers_allowed():
            raise
        # --skip-oversize-layers: leave out the layers that cannot fit even for the smallest chunk
        small = choose_forms(model, worst[: min(2, n)], budget, sel, compute_dtype=compute_dtype, skip=True)
        fixed.update({k: v for k, v in small.items() if v == "skip"})
        rows = plan_rows(est, n, budget, min_rows=min(2, n), what=what)
    if rows < n:
        m = -(-n // max(1, rows // 2))
        passes = m * (m - 1) // 2
        if passes > MAX_PASSES:
            full = est(n)
            raise MemoryBudgetError(
                f"{what}: {n} rows of up to {worst[0]} tokens need {human(full.total)} at once "
                f"({full.describe()}); under the memory budget of {human(budget)} that is {passes} passes of "
                f"{rows} rows ({m - 1}x the compute), more than {MAX_PASSES}: refused. Lower --max-length, "
                "--token-level or --batch-size, or raise --max-memory"
            )
    return rows, est(rows)


def _must_agree(model: nn.Module) -> bool:
    """A pass whose forwards are collectives: FSDP2-sharded model under a process group of > 1 rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def agree_rows(
    model: nn.Module, rows: int, n: int, device: torch.device, refused: BaseException | None = None
) -> int:
    """The rows per pass every rank uses: the fewest any rank can afford (so the most chunks), from one
    all-reduce (MAX) of [-rows, n, -n].

    Why: each rank sizes its chunks from its own budget (free memory differs per rank) and its own
    micro-batch's lengths. Under FSDP2 every forward all-gathers parameters, so if one rank ran a single
    pass and another three, the collectives would no longer pair up and the job would hang. `refused`: this
    rank's `MemoryBudgetError` (it cannot fit even two rows); every rank then raises instead of one rank
    raising and the others waiting forever. A no-op outside a process group or without FSDP2 (a DDP rank's
    standalone pass runs on the bare model: no collective to pair up). Every rank holds the same number of
    rows in the trainer and the callbacks; if they differ and a pass is chunked, the pass counts could
    still differ, so that is refused too."""
    if not _must_agree(model):
        if refused is not None:
            raise refused
        return rows
    mine = -1 if refused is not None else rows
    t = torch.tensor([-mine, n, -n], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    agreed, n_max, n_min = -int(t[0]), int(t[1]), -int(t[2])
    if refused is not None:
        raise refused
    if agreed < 0:
        raise MemoryBudgetError(
            f"rank {dist.get_rank()}: another rank cannot fit even two rows of this Gram pass under its memory "
            "budget (its error names the layer and the bytes); every rank stops so that none waits forever"
        )
    if agreed < n_max and n_max != n_min:
        raise GramError(
            f"rank {dist.get_rank()}: a memory-chunked Gram pass under FSDP2 needs the same number of rows on "
            f"every rank; got {n_min} to {n_max} rows (give every rank the same number of pairs)"
        )
    return agreed


def _blockwise(n: int, rows: int, lengths: list[int], run: Any) -> tuple[Tensor, Tensor]:
    """The [N, N] Gram from passes over at most `rows` rows each: rows sorted by length are cut into
    blocks of rows // 2, and each pair of blocks is one pass (the Gram of a subset of rows is that block
    of the full Gram: rows do not interact). m blocks cost m (m - 1) / 2 passes; the result equals the
    single pass up to float rounding."""
    order = sorted(range(n), key=lambda i: lengths[i])
    size = max(1, rows // 2)
    blocks = [order[i : i + size] for i in range(0, n, size)]
    gram: Tensor | None = None
    logps: Tensor | None = None
    for bi in range(len(blocks)):
        for bj in range(bi + 1, len(blocks)):
            idx = blocks[bi] + blocks[bj]
            g, lp = run(idx)
            if gram is None:
                gram = g.new_zeros(n, n)
                logps = lp.new_zeros(n)
            where = torch.tensor(idx, device=g.device)
            gram[where[:, None], where[None, :]] = g
            logps[torch.tensor(idx, device=lp.device)] = lp  # type: ignore[index]
    assert gram is not None and logps is not None
    return gram, logps


def sequence_gram_and_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    params: Iterable[str | nn.Parameter] | None = None,
    *,
    strategy: Strategy = "auto",
    compute_dtype: torch.dtype = torch.float32,
    max_memory: int | str | None = "auto",
) -> tuple[Tensor, Tensor]:
    """`sequence_gram` plus the summed log-probs [N] it differentiated (detached), from the same forward.

    `max_memory` (bytes; "auto"/None: the innermost `grad.memory.memory_budget`, else half the free
    memory): the peak extra memory is estimated from the shapes first (`grad.memory`); a batch over the
    budget runs as passes over pairs of row blocks (same numbers), and one that cannot fit even two rows
    is refused before anything runs. Under FSDP2 the ranks agree on the chunking first (`agree_rows`)."""
    shapes = [tuple(t.shape) for t in (input_ids, attention_mask, response_mask)]
    if input_ids.dim() != 2 or len(set(shapes)) != 1:
        raise GramError(
            "input_ids, attention_mask and response_mask must be [N, T] tensors of one shape; got "
            + ", ".join(str(s) for s in shapes)
        )
    lengths = row_lengths(attention_mask, response_mask)
    sel = None if params is None else list(params)
    refused: MemoryBudgetError | None = None
    try:
        rows, est = gram_rows_per_run(
            model, lengths, sel, max_memory=max_memory, compute_dtype=compute_dtype, device=input_ids.device
        )
    except MemoryBudgetError as e:
        if not _must_agree(model):
            raise
        rows, est, refused = 0, None, e
    # FSDP2: every rank must run the same passes (its forwards are collectives): one all-reduce here
    rows = agree_rows(model, rows, input_ids.shape[0], input_ids.device, refused)
    assert est is not None
    if est.skipped:
        warnings.warn(
            f"sequence_gram: inexact Gram, {len(est.skipped)} layer(s) left out under the memory budget: "
            + ", ".join(est.skipped),
            stacklevel=2,
        )
    with layer_forms(est.forced):
        return _chunked(
            model, input_ids, attention_mask, response_mask, sel, strategy, compute_dtype, rows, lengths
        )


def _chunked(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    sel: list[str | nn.Parameter] | None,
    strategy: Strategy,
    compute_dtype: torch.dtype,
    rows: int,
    lengths: list[int],
) -> tuple[Tensor, Tensor]:
    n = input_ids.shape[0]
    if rows >= n:
        return _gram_pass(model, input_ids, attention_mask, response_mask, sel, strategy, compute_dtype)

    def run(idx: list[int]) -> tuple[Tensor, Tensor]:
        t = max(lengths[i] for i in idx)
        rows_ = torch.tensor(idx, device=input_ids.device)
        return _gram_pass(
            model,
            input_ids[rows_, :t],
            attention_mask[rows_, :t],
            response_mask[rows_, :t],
            sel,
            strategy,
            compute_dtype,
        )

    return _blockwise(n, rows, lengths, run)


def _gram_pass(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    params: Iterable[str | nn.Parameter] | None,
    strategy: Strategy,
    compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """One forward and one activation-only backward over all the rows."""
    rm = response_mask.bool()
    cap = GramCapture(
        model, attention_mask, rm, params, strategy=strategy, compute_dtype=compute_dtype, anchor=True
    )
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
    max_memory: int | str | None = "auto",
) -> Tensor:
    """[N, N] Gram matrix of the per-sequence gradients of the summed response log-probs.

    G[s, t] = <grad logp_s, grad logp_t> over the trainable parameters (full model or LoRA adapters),
    or over `params` (names from `model.named_parameters()` or the Parameters themselves).
    Exact, from one forward and one activation-only backward (`preflens.grad`). Dropout follows the
    model's mode: call `model.eval()` first for the deterministic gradient the papers analyse.
    `strategy` forces the ghost or materialized form everywhere (default: cheaper per parameter).
    `max_memory`: as `sequence_gram_and_logps`' (chunked under the budget, refused when two rows cannot fit).
    """
    return sequence_gram_and_logps(
        model,
        input_ids,
        attention_mask,
        response_mask,
        params,
        strategy=strategy,
        compute_dtype=compute_dtype,
        max_memory=max_memory,
    )[0]


def sequence_grad_norms(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    params: Iterable[str | nn.Parameter] | None = None,
) -> Tensor:
    """|grad logp_s| per sequence [N]: normalized preference optimization (Yuan et al. 2024,
    arXiv 2410.13828, Sec. 5.1) divides by them at every step."""
    g = sequence_gram(model, input_ids, attention_mask, response_mask, params)
    return g.diagonal().clamp_min(0).sqrt()


def token_gram(
    model: nn.Module,
    input_ids: Tensor,
    response_mask: Tensor,
    params: Iterable[str | nn.Parameter] | None = None,
    *,
    max_tokens: int | None = None,
    max_memory: int | str | None = "auto",
) -> tuple[Tensor, Tensor]:
    """Gram of per-*token* gradients of the response tokens of a few sequences.

    `input_ids`, `response_mask` are [S, T] (right-padded rows, e.g. one chosen and one rejected).
    Each response token t of row s becomes its own sequence (the row truncated after t, with only t
    marked), so the sequence Gram of that batch is the token Gram. Returns (gram [K, K], owner [K, 2]
    = (row, response index)) with K the response tokens in row-major order (at most `max_tokens` per
    row, the first ones). Costs K forward rows: for a probe pair, not for training. Under `max_memory`
    (see `sequence_gram_and_logps`) the K rows run as passes over pairs of row blocks, never all at once
    when they do not fit.
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
    g = sequence_gram(model, ids, att, rm, params, max_memory=max_memory)
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
        """Check the graph (once per capture) and hook c = dL/dlogp on the step's log-probs."""
        if self._check:
            self.cap.check_graph(logps)

        def grab(g: Tensor) -> None:
            self.c = g.detach().to(self.cap.dtype)

        logps.register_hook(grab)

    def result(self) -> Tensor:
        """[N, N] Gram of the log-prob gradients (NaN rows where c_s = 0)."""
        self.cap.remove()
        gram_l = self.cap.finish()
        if self.c is None:
            raise GramError("StepGramCapture: the watched log-probs received no gradient (no backward?)")
        scale = torch.outer(self.c, self.c)
        return torch.where(scale != 0, gram_l / scale, torch.full_like(gram_l, float("nan")))
