"""Peak extra memory of the diagnostics that are not a standalone Gram pass, from the shapes before they
run (`grad.memory` holds the budget, the Gram pass's estimate and the chunk planner these build on).

- `estimate_capture_memory`: `--step-entanglement` (`StepGramCapture` rides on the training step's backward:
  the step's activations are its own; a parameter used twice is held across the backward);
- `estimate_cross_memory` / `plan_cross_batch`: attribution (`grad.cross`: the probe set's parts of every
  parameter held while the training rows' cross kernels run one at a time);
- `estimate_forward_memory`: CHES (an inference forward keeping only the last hidden state: tiny).

Each returns a `grad.memory.MemoryEstimate` (items per layer), so a refusal names layer, shape and bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from preflens.grad.kernels import BLOCK_ELEMS
from preflens.grad.memory import (
    WORKSPACE,
    MemoryEstimate,
    MemoryItem,
    _config_dims,
    _kernel_item,
    _onehot_owners,
    _selected,
    _sizes,
    estimate_gram_memory,
    plan_rows,
)

__all__ = [
    "INFER_HIDDEN",
    "INFER_INTERMEDIATE",
    "estimate_capture_memory",
    "estimate_cross_memory",
    "estimate_forward_memory",
    "plan_cross_batch",
]

# Values an inference forward (no autograd: CHES) holds at once per token: the residual stream, one layer's
# attention/MLP transients; the same margin over a Llama layer's ~6 hidden + 3 intermediate values.
INFER_HIDDEN = 8
INFER_INTERMEDIATE = 4


def _parts_item(
    what: str, name: str, p: nn.Parameter, onehot: bool, rows: int, n: int, dsize: int
) -> MemoryItem:
    """One parameter's parts of a pass over `rows` tokens of `n` sequences (`grad.parts`): a matrix's
    input and output-gradient rows R x (d_in + d_out) (one-hot: R x d_out and the ids), a vector's
    per-sequence rows N x numel."""
    if p.dim() < 2:
        return MemoryItem(what, name, (n, p.numel()), n * p.numel() * dsize, transient=False)
    d_out, d_in = int(p.shape[0]), int(p.shape[-1])
    if onehot:
        return MemoryItem(
            what, name, (rows, int(p.shape[1])), rows * (int(p.shape[1]) * dsize + 8), transient=False
        )
    return MemoryItem(what, name, (rows, d_in + d_out), rows * (d_in + d_out) * dsize, transient=False)


def _uses(model: nn.Module) -> dict[int, int]:
    """How many modules own each parameter (a tied embedding / head: 2)."""
    count: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                count[id(p)] = count.get(id(p), 0) + 1
    return count


def estimate_capture_memory(
    model: nn.Module,
    lengths: Sequence[int],
    params: Iterable[str | nn.Parameter] | None = None,
    *,
    fused: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> MemoryEstimate:
    """Peak extra bytes of a `StepGramCapture` (`--step-entanglement`) on a training micro-batch of rows of
    these `lengths`, beyond the step itself: the step's activations are the step's own (not counted); a
    parameter's parts wait until all its uses have their output-gradients, so a parameter used by several
    modules (a tied embedding and head: from the first to the last layer of the backward) is held across
    the step's backward; the others are reduced one at a time (their parts + kernel, the largest counts),
    and with `fused` the weight gradient the hooks write (one parameter's size in the compute dtype)."""
    lengths = [int(x) for x in lengths]
    n, rows = len(lengths), sum(lengths)
    longest = max(lengths, default=0)
    _, dsize = _sizes(model, compute_dtype)
    est = MemoryEstimate(rows=n, tokens=rows)
    est.items.append(MemoryItem("workspace", "runtime", (), WORKSPACE))
    owners, uses = _onehot_owners(model), _uses(model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, p in _selected(model, params):
        onehot = owners.get(id(p), False)
        k = _kernel_item(name, p, onehot, rows, n, longest, dsize)
        if fused:
            k = MemoryItem(k.what, k.layer, k.shape, k.bytes + p.numel() * dsize)
        est.items.append(k)
        if (
            uses.get(id(p), 1) > 1
        ):  # every use's parts: a tied embedding's ids and rows, the head's dense rows
            held = [_parts_item("parts (held, tied)", name, p, False, rows, n, dsize)]
            if id(p) in embeddings:
                held.append(_parts_item("parts (held, tied)", name, p, True, rows, n, dsize))
            shape = held[0].shape if len(held) == 1 else (rows, held[0].shape[1] + held[1].shape[1])
            est.items.append(
                MemoryItem("parts (held, tied)", name, shape, sum(h.bytes for h in held), transient=False)
            )
    return est


def _pass_item(
    what: str, model: nn.Module, lengths: list[int], compute_dtype: torch.dtype, *, transient: bool
) -> MemoryItem:
    """A forward + activation backward over rows of `lengths` with no parameter's parts: its activations
    and head chunk (`estimate_gram_memory` with no parameters, less the workspace counted once at the end)."""
    held = estimate_gram_memory(model, lengths, params=[], compute_dtype=compute_dtype).held - WORKSPACE
    return MemoryItem(
        what, "activations and head", (len(lengths), max(lengths, default=0)), held, transient=transient
    )


def estimate_cross_memory(
    model: nn.Module,
    train_lengths: Sequence[int],
    probe_lengths: Sequence[int],
    params: Iterable[str | nn.Parameter] | None = None,
    *,
    keep: bool = False,
    train_pass: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> MemoryEstimate:
    """Peak extra bytes of in-run attribution (`grad.cross`: `probe_parts` then a `CrossCapture` on a
    training micro-batch of rows of `train_lengths`): the probe set's parts of every selected parameter are
    held from the probe pass to the end of the step; one at a time come the probe pass's own activations
    and head (before the step) and each parameter's cross kernel (its training parts plus three
    [rows, probe rows] blocks); `keep` (Adam's form) also holds every parameter's training parts;
    `train_pass` (`preflens attribute`: `objective_cross` runs the training rows' own forward and backward,
    not a training step's) also holds that pass's activations and head."""
    tl, pl = [int(x) for x in train_lengths], [int(x) for x in probe_lengths]
    nt, rt, np_, rp = len(tl), sum(tl), len(pl), sum(pl)
    asize, dsize = _sizes(model, compute_dtype)
    est = MemoryEstimate(rows=nt + np_, tokens=rt + rp)
    est.items.append(_pass_item("probe pass", model, pl, compute_dtype, transient=True))
    owners = _onehot_owners(model)
    for name, p in _selected(model, params):
        onehot = owners.get(id(p), False)
        est.items.append(_parts_item("probe parts (held)", name, p, onehot, rp, np_, dsize))
        train = _parts_item("parts", name, p, onehot, rt, nt, dsize)
        blocks = 3 * min(rt * rp, max(BLOCK_ELEMS, rp)) * dsize
        est.items.append(MemoryItem("kernel (cross)", name, (rt, rp), train.bytes + blocks, transient=True))
        if keep:
            est.items.append(_parts_item("parts (kept for Adam)", name, p, onehot, rt, nt, dsize))
    if train_pass:
        est.items.append(_pass_item("training rows' pass", model, tl, compute_dtype, transient=False))
    est.items.append(MemoryItem("workspace", "runtime", (), WORKSPACE))
    return est


def plan_cross_batch(
    model: nn.Module, longest: int, probe_lengths: Sequence[int], batch_size: int, budget: int, what: str
) -> int:
    """Pairs per `objective_cross` batch (<= batch_size; rows of up to `longest` tokens) under `budget`,
    the probe set's parts held throughout (`estimate_cross_memory(train_pass=True)`); refuses in one line
    when even one pair cannot fit beside them. Pairs do not interact: the cross rows are the same."""

    def est(k: int) -> MemoryEstimate:
        return estimate_cross_memory(model, [longest] * (2 * k), probe_lengths, train_pass=True)

    return plan_rows(est, batch_size, budget, min_rows=1, what=what)


def estimate_forward_memory(
    model: nn.Module, lengths: Sequence[int], *, all_hidden_states: bool = False
) -> MemoryEstimate:
    """Peak extra bytes of an inference forward (no autograd) over rows of these `lengths` that keeps the
    last hidden state (CHES, `diagnostics.ches`): one decoder layer's transients at a time (INFER_HIDDEN x
    hidden + INFER_INTERMEDIATE x intermediate values per token, plus heads x T^2 when the attention is
    eager), the last hidden state [N, T, hidden] and its float32 copy; `all_hidden_states` (a model without
    a separable backbone: `output_hidden_states=True`): every layer's hidden state and the logits too."""
    lengths = [int(x) for x in lengths]
    n, longest = len(lengths), max([int(x) for x in lengths], default=0)
    dims = _config_dims(model)
    asize, _ = _sizes(model, torch.float32)
    est = MemoryEstimate(rows=n, tokens=sum(lengths))
    per_token = INFER_HIDDEN * dims["hidden"] + INFER_INTERMEDIATE * dims["intermediate"]
    attn = dims["heads"] * n * longest * longest if dims["eager"] else 0
    est.items.append(
        MemoryItem(
            "activations (one layer)",
            "decoder layer",
            (n, longest, per_token),
            (n * longest * per_token + attn) * asize,
            transient=False,
        )  # fmt: skip
    )
    est.items.append(
        MemoryItem(
            "last hidden state",
            "final norm",
            (n, longest, dims["hidden"]),
            n * longest * dims["hidden"] * (asize + 4),
            transient=False,
        )  # fmt: skip
    )
    if all_hidden_states:
        est.items.append(
            MemoryItem(
                "hidden states",
                f"{dims['layers']} layers",
                (dims["layers"], n, longest, dims["hidden"]),
                dims["layers"] * n * longest * dims["hidden"] * asize,
                transient=False,
            )  # fmt: skip
        )
        est.items.append(
            MemoryItem(
                "logits",
                "lm_head",
                (n, longest, dims["vocab"]),
                n * longest * dims["vocab"] * 4,
                transient=False,
            )  # fmt: skip
        )
    est.items.append(MemoryItem("workspace", "runtime", (), WORKSPACE))
    return est
