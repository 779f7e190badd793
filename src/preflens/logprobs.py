"""Response log-probs of chosen and rejected sequences in one forward pass.

Why this module exists: every loss and diagnostic in preflens reads the summed log-prob of each
response (and sometimes the per-token log-probs or the last hidden states). Computing them well is
most of a DPO step's cost, so this is the hot path:

- chosen and rejected rows go through the model in *one* forward (the batch layout of
  ARCHITECTURE.md: B chosen rows then B rejected rows);
- the backbone runs once; the unembedding (lm_head) is applied *only* at the positions that predict
  a response token (prompt positions never need logits), in chunks, and each chunk's log-softmax
  is recomputed in the backward (activation checkpointing) instead of being stored, so the
  full-vocabulary log-softmax is never materialised for the whole batch, nor in fp32 beyond a chunk;
- the last hidden states at those positions come for free (CHES, Razin et al. 2024, arXiv
  2410.08847, uses them);
- optionally (`padding_free=True`) the N right-padded rows are packed into one row of their real
  tokens with per-sequence position ids, so no padding is computed. Hugging Face models turn such
  position ids into a block-diagonal causal mask (flash-attention: variable-length kernels), which
  makes the packed forward exact: each token attends to its own sequence only, at its own positions.
  `check_padding_free` verifies that on a given model before a run relies on it.

Convention (DESIGN.md): `response_mask[s, t]` marks token t of sequence s as a response token whose
log-prob is `log_softmax(logits[s, t-1])[input_ids[s, t]]`; padding on the right.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from preflens.errors import PreflensError

__all__ = [
    "PairLogps",
    "split_pairs",
    "SequenceLogps",
    "sequence_logps",
    "pair_logps_from_batch",
    "split_backbone_and_head",
    "check_padding_free",
]

# Rows of logits computed at once by the chunked unembedding. 1024 rows x 49k vocab x 4 bytes is
# ~200 MB for SmolLM2; small enough for a laptop, large enough to keep the matmul efficient.
DEFAULT_CHUNK_ROWS = 1024


@dataclass
class PairLogps:
    """Per-pair sequence statistics, the only input a loss sees (DESIGN.md; re-exported by `preflens.losses`).

    Shapes are [B] unless noted. `chosen`/`rejected` are *summed* policy log-probs over the response
    tokens; `ref_*` the same under the reference model; `*_len` the response token counts.
    Token-level fields ([B, L], left-aligned at the response start, see ARCHITECTURE.md) are needed
    only by token-level losses; `*_grad_norm` only by `normalized`.
    """

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_len: Tensor | None = None
    rejected_len: Tensor | None = None
    # token level ([B, L], left-aligned at the response start)
    chosen_tokens: Tensor | None = None
    rejected_tokens: Tensor | None = None
    ref_chosen_tokens: Tensor | None = None
    ref_rejected_tokens: Tensor | None = None
    chosen_mask: Tensor | None = None
    rejected_mask: Tensor | None = None
    chosen_token_ids: Tensor | None = None
    rejected_token_ids: Tensor | None = None
    # logits of a learned token mask (sparse PO, mask="learned"), [B, L]
    chosen_mask_logits: Tensor | None = None
    rejected_mask_logits: Tensor | None = None
    # per-sequence gradient norms |g_w|, |g_l| (normalized PO), [B]
    chosen_grad_norm: Tensor | None = None
    rejected_grad_norm: Tensor | None = None
    # per response token log sum_v pi(v | prefix)^2, [B, L] like chosen_tokens (WPO's weight, TRL's
    # use_weighting): `sequence_logps(..., return_log_sum_sq=True)` computes it in the head's chunks
    chosen_log_sum_sq: Tensor | None = None
    rejected_log_sum_sq: Tensor | None = None

    def require(self, *names: str, loss: str) -> None:
        """Raise a clear error when a loss needs a field the caller did not fill."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise PreflensError(
                f"loss '{loss}' needs PairLogps fields {missing}, which are None "
                f"(reference log-probs, lengths, token-level or gradient-norm fields must be computed first)"
            )

    def replace(self, **changes: Any) -> PairLogps:
        """A copy with some fields replaced (used to differentiate w.r.t. chosen/rejected)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return PairLogps(**values)


def split_pairs(
    logps: Tensor,
    lengths: Tensor,
    ref: tuple[Tensor, Tensor] | None = None,
    *,
    grad_norms: Tensor | None = None,
) -> PairLogps:
    """The one place that turns 2B per-sequence rows (B chosen rows, then B rejected rows: the batch layout
    of ARCHITECTURE.md) into a `PairLogps`.

    Why one builder: every producer of sequence statistics (the training forward, the Gram pass of the
    probes, the single-token analysis) splits the same layout; written out six times, one copy was bound to
    split it differently. `ref` are the reference log-probs (chosen, rejected) of the same B pairs, cast to
    `logps`'s dtype and device; `grad_norms` [2B] the per-sequence gradient norms `normalized` reads.
    """
    n = logps.shape[0]
    if n % 2:
        raise PreflensError(f"a pair batch has an even number of rows (chosen then rejected); got {n}")
    b = n // 2
    p = PairLogps(
        chosen=logps[:b],
        rejected=logps[b:],
        ref_chosen=None if ref is None else ref[0].to(logps),
        ref_rejected=None if ref is None else ref[1].to(logps),
        chosen_len=lengths[:b],
        rejected_len=lengths[b:],
    )
    if grad_norms is not None:
        p.chosen_grad_norm, p.rejected_grad_norm = grad_norms[:b], grad_norms[b:]
    return p


@dataclass
class SequenceLogps:
    """Per-sequence response statistics (N = 2B rows of a pair batch, or any N sequences)."""

    logps: Tensor
    """[N] summed response-token log-probs (float32)."""
    lengths: Tensor
    """[N] number of response tokens."""
    token_logps: Tensor | None = None
    """[N, L] response-token log-probs, left-aligned at the response start (column j = j-th response token)."""
    token_mask: Tensor | None = None
    """[N, L] bool, True where `token_logps` holds a real token."""
    token_ids: Tensor | None = None
    """[N, L] the response token ids in the same layout (-1 on padding)."""
    hidden: Tensor | None = None
    """[N, L, d] last hidden state (input of the unembedding) at the position predicting each response token."""
    token_log_sum_sq: Tensor | None = None
    """[N, L] log sum_v pi(v | prefix)^2 at each response token, same layout (WPO's weight; detached)."""


def split_backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, lm_head) of a Hugging Face causal LM (or a peft model wrapping one), or None.

    The decoder returns the last hidden state after the final norm, the lm_head maps it to logits.
    Models whose logits are not a plain linear map of that state (final-logit soft-capping, a logit
    scale) return None so the caller falls back to the model's own forward.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    if cfg is None:
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (
        None,
        1,
        1.0,
    ):
        return None
    prefix = getattr(base, "base_model_prefix", None)
    decoder = getattr(base, prefix, None) if prefix else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def _chunk_logps(head: nn.Module, h: Tensor, targets: Tensor) -> Tensor:
    """log softmax(head(h))[targets] for one chunk of rows, with the logsumexp in fp32."""
    logits = head(h).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _log_sum_sq(z: Tensor, lse: Tensor) -> Tensor:
    """log sum_v softmax(z)_v^2 = logsumexp(2 z) - 2 logsumexp(z), per row of fp32 logits `z` (WPO's
    normaliser, Zhou et al. 2024, arXiv 2406.11827, Eq. 2: the probability mass the model would give its
    own sampled token, on average)."""
    return torch.logsumexp(2.0 * z, dim=-1) - 2.0 * lse


def _chunk_logps_sq(head: nn.Module, h: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """`_chunk_logps` and, from the same logits, `_log_sum_sq` detached (TRL detaches WPO's weight)."""
    logits = head(h).float()
    lse = torch.logsumexp(logits, dim=-1)
    tok = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    return tok, _log_sum_sq(logits.detach(), lse.detach())


def _autocast_on(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4 takes no device type
        return bool(torch.is_autocast_enabled())


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on this device, or None outside autocast."""
    if not _autocast_on(device_type):
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


class _FusedLinearLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[targets] over row chunks, keeping only each row's logsumexp.

    The backward recomputes each chunk's logits once and turns them in place into
    dz = g (onehot(target) - softmax(z)) (d log p_t / d z_j = 1[j = t] - p_j), then dh = dz W and
    dW += dz^T h: one [chunk, V] buffer at a time and no autograd graph over it. Measured on SmolLM2
    shapes (512 rows, CPU, benchmarks/logprobs_head.py): 1.37x faster than checkpointing `_chunk_logps`
    and 2.8x less peak memory.

    Under autocast (`--mixed-precision bf16`) the forward's matmul is autocast's, and the backward, which
    the autograd engine runs outside the autocast context, casts explicitly to the same dtype: the
    matmuls a module's autocast backward would run in bf16 run in bf16 here too, the softmax and the
    weight-gradient accumulation stay in fp32.

    `with_log_sum_sq=True` also returns log sum_v softmax(z)_v^2 per row (WPO's normaliser, TRL's
    `log_sum_sq_probs`), from the same chunk's logits: one more logsumexp over the chunk, no extra
    matmul and no [M, V] buffer. It is a non-differentiable output: TRL computes WPO's weight under
    `torch.no_grad()` (`DPOTrainer._compute_loss`, TRL 1.x), so no gradient ever flows through it, and
    the backward is the one above. The flag is off on every other path, which is then unchanged.
    """

    @staticmethod
    def forward(
        ctx,
        h: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        chunk_rows: int,
        with_log_sum_sq: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:  # type: ignore[override]
        tgt = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.empty_like(tgt)
        lss = torch.empty_like(tgt) if with_log_sum_sq else None
        for s in range(0, h.shape[0], chunk_rows):
            z = F.linear(h[s : s + chunk_rows], weight, bias).float()
            lse[s : s + chunk_rows] = torch.logsumexp(z, dim=-1)
            tgt[s : s + chunk_rows] = z.gather(-1, targets[s : s + chunk_rows, None]).squeeze(-1)
            if lss is not None:  # z is not needed after this: doubled in place, no second [chunk, V] buffer
                lss[s : s + chunk_rows] = torch.logsumexp(z.mul_(2.0), dim=-1) - 2.0 * lse[s : s + chunk_rows]
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.chunk_rows = chunk_rows
        ctx.autocast_dtype = _autocast_dtype(h.device.type)
        if lss is None:
            return tgt - lse
        ctx.mark_non_differentiable(lss)
        return tgt - lse, lss

    @staticmethod
    def backward(ctx, grad: Tensor, *_lss_grad: Tensor):  # type: ignore[override]
        h, weight, bias, targets, lse = ctx.saved_tensors
        cr = ctx.chunk_rows
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        dt = ctx.autocast_dtype
        if dt is not None:  # the forward ran under autocast: the same casts, once, not per chunk
            h_mm, w_mm = h.to(dt), weight.to(dt)
            b_mm = None if bias is None else bias.to(dt)
        else:
            h_mm, w_mm, b_mm = h, weight, bias
        for s in range(0, h.shape[0], cr):
            hc, g = h_mm[s : s + cr], grad[s : s + cr, None].float()
            dz = F.linear(hc, w_mm, b_mm).float().sub_(lse[s : s + cr, None]).exp_().mul_(-g)
            dz.scatter_add_(-1, targets[s : s + cr, None], g)
            if gb is not None:
                gb += dz.sum(0)
            dz = dz.to(hc.dtype)
            if gh is not None:
                gh[s : s + cr] = dz @ w_mm
            if gw is not None:
                if dt is not None:
                    gw += dz.t() @ hc  # autocast's precision for this matmul, accumulated in fp32
                else:
                    gw.addmm_(dz.t().float(), hc.float())
        return (
            gh,
            None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(bias.dtype),
            None,
            None,
            None,
        )


def _can_fuse(head: nn.Module) -> bool:
    """The fused path computes the head's matmul itself, so only a plain nn.Linear qualifies, with no
    hooks (gradient diagnostics hook the lm_head's forward)."""
    return (
        type(head) is nn.Linear
        and not (head._forward_hooks or head._forward_pre_hooks or head._backward_hooks)
        and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
    )


def _needs_grad(head: nn.Module, h: Tensor) -> bool:
    return torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))


def _selected_logps(head: nn.Module, h: Tensor, targets: Tensor, chunk_rows: int) -> Tensor:
    """Log-probs of `targets` [M] given hidden states `h` [M, d], chunked and recomputed in backward."""
    if h.shape[0] == 0:
        return h.new_zeros(0, dtype=torch.float32)
    needs_grad = _needs_grad(head, h)
    if needs_grad and _can_fuse(head):
        return _FusedLinearLogps.apply(h, head.weight, head.bias, targets, chunk_rows)
    out = []
    for start in range(0, h.shape[0], chunk_rows):
        hc, tc = h[start : start + chunk_rows], targets[start : start + chunk_rows]
        if needs_grad:
            out.append(checkpoint(_chunk_logps, head, hc, tc, use_reentrant=False))
        else:
            out.append(_chunk_logps(head, hc, tc))
    return torch.cat(out)


def _selected_logps_and_sq(
    head: nn.Module, h: Tensor, targets: Tensor, chunk_rows: int
) -> tuple[Tensor, Tensor]:
    """`_selected_logps` and each row's log sum_v pi(v)^2 (detached), from the same chunks' logits: the
    fused head when it applies, else one matmul per chunk giving both (checkpointed under grad)."""
    if h.shape[0] == 0:
        empty = h.new_zeros(0, dtype=torch.float32)
        return empty, empty
    needs_grad = _needs_grad(head, h)
    if needs_grad and _can_fuse(head):
        tok, lss = _FusedLinearLogps.apply(h, head.weight, head.bias, targets, chunk_rows, True)
        return tok, lss
    parts = [
        checkpoint(_chunk_logps_sq, head, hc, tc, use_reentrant=False)
        if needs_grad
        else _chunk_logps_sq(head, hc, tc)
        for hc, tc in zip(h.split(chunk_rows), targets.split(chunk_rows))
    ]
    return torch.cat([t for t, _ in parts]), torch.cat([q for _, q in parts])


def _validate(input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> None:
    if (
        input_ids.dim() != 2
        or input_ids.shape != attention_mask.shape
        or input_ids.shape != response_mask.shape
    ):
        raise PreflensError(
            "input_ids, attention_mask and response_mask must all be [N, T] tensors of the same shape; got "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(response_mask.shape)}"
        )
    if response_mask[:, 0].any():
        bad = int(response_mask[:, 0].nonzero()[0, 0])
        raise PreflensError(
            f"sequence {bad}: response_mask marks position 0 as a response token, but nothing predicts it "
            "(a response needs at least one token of prompt/BOS before it)"
        )
    if (response_mask.bool() & ~attention_mask.bool()).any():
        bad = int((response_mask.bool() & ~attention_mask.bool()).any(1).nonzero()[0, 0])
        raise PreflensError(f"sequence {bad}: response_mask marks a padding position (attention_mask 0)")


def _packed_inputs(input_ids: Tensor, attention_mask: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Model inputs for the N right-padded rows packed into one row, and each row's start in it.

    Position ids restart at 0 for every sequence; with no attention mask, Hugging Face models read the
    sequence boundaries from those restarts (`masking_utils.find_packed_sequence_indices`, or the
    flash-attention variable-length path), so attention stays within each sequence.
    """
    real = attention_mask.bool()
    if (real[:, 1:] & ~real[:, :-1]).any():
        bad = int((real[:, 1:] & ~real[:, :-1]).any(1).nonzero()[0, 0])
        raise PreflensError(
            f"sequence {bad}: padding_free needs right padding (real tokens first, then padding); "
            "this attention_mask has padding before a real token"
        )
    lengths = real.sum(1)
    starts = lengths.cumsum(0) - lengths
    packed = {
        "input_ids": input_ids[real].unsqueeze(0),
        "position_ids": (real.long().cumsum(1) - 1)[real].unsqueeze(0),
    }
    return packed, starts


def sequence_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    *,
    return_tokens: bool = False,
    return_hidden: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    padding_free: bool = False,
    return_log_sum_sq: bool = False,
) -> SequenceLogps:
    """Summed (and optionally per-token) response log-probs of N sequences in one forward pass.

    Gradients flow to the model when called under grad mode. See the module docstring for why the
    unembedding is applied only at response-predicting positions, and for `padding_free` (the real
    tokens of all rows in one packed row: no compute spent on padding; needs right padding and a
    model whose attention honours packed position ids, see `check_padding_free`).
    `return_log_sum_sq`: also `token_log_sum_sq`, log sum_v pi(v | prefix)^2 per response token
    (WPO's weight, TRL's `use_weighting`), from the head's own chunks, detached (TRL detaches it).
    """
    _validate(input_ids, attention_mask, response_mask)
    response_mask = response_mask.bool()
    n, t = input_ids.shape
    rows, pos = response_mask.nonzero(as_tuple=True)  # row-major: ordered by row, then position
    targets = input_ids[rows, pos]
    if padding_free:
        inputs, starts = _packed_inputs(input_ids, attention_mask)
        pred = (starts[rows] + pos - 1,)  # the packed position predicting each response token

        def at_pred(x: Tensor) -> Tensor:  # [1, S, ...] -> [M, ...]
            return x[0][pred]
    else:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}

        def at_pred(x: Tensor) -> Tensor:  # [N, T, ...] -> [M, ...]
            return x[rows, pos - 1]

    parts = split_backbone_and_head(model)
    if parts is not None:
        decoder, head = parts
        hidden_all = decoder(**inputs, use_cache=False).last_hidden_state
        h_sel = at_pred(hidden_all)
        if return_log_sum_sq:
            tok, lss = _selected_logps_and_sq(head, h_sel, targets, chunk_rows)
        else:
            tok, lss = _selected_logps(head, h_sel, targets, chunk_rows), None
    else:  # generic fallback: the model's own logits (e.g. soft-capped heads)
        out = model(**inputs, use_cache=False, output_hidden_states=return_hidden)
        logits = at_pred(out.logits).float()
        lse = torch.logsumexp(logits, -1)
        tok = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
        lss = _log_sum_sq(logits.detach(), lse.detach()) if return_log_sum_sq else None
        h_sel = at_pred(out.hidden_states[-1]) if return_hidden else None

    lengths = response_mask.sum(1)
    logps = torch.zeros(n, dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)
    result = SequenceLogps(logps=logps, lengths=lengths)
    if return_tokens or return_hidden or lss is not None:
        width = int(lengths.max()) if n else 0
        col = (response_mask.long().cumsum(1) - 1)[rows, pos]
        if lss is not None:
            result.token_log_sum_sq = lss.new_zeros(n, width).index_put((rows, col), lss)
        if return_tokens:
            result.token_logps = tok.new_zeros(n, width).index_put((rows, col), tok)
            result.token_mask = torch.zeros(n, width, dtype=torch.bool, device=tok.device).index_put(
                (rows, col), torch.ones_like(targets, dtype=torch.bool)
            )
            result.token_ids = torch.full(
                (n, width), -1, dtype=input_ids.dtype, device=input_ids.device
            ).index_put((rows, col), targets)
        if return_hidden and h_sel is not None:
            result.hidden = h_sel.new_zeros(n, width, h_sel.shape[-1]).index_put((rows, col), h_sel)
    return result


def pair_logps_from_batch(
    policy: SequenceLogps,
    ref: tuple[Tensor, Tensor] | None = None,
    ref_tokens: tuple[Tensor, Tensor] | None = None,
) -> PairLogps:
    """Split 2B sequence rows (chosen first, then rejected) into a `PairLogps`.

    `ref` are the cached reference log-probs (chosen, rejected) of the same pairs, `ref_tokens` their
    per-token versions (left-aligned, for token-level losses).
    """
    p = split_pairs(policy.logps, policy.lengths, ref)
    b = policy.logps.shape[0] // 2

    def halves(x: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        return (None, None) if x is None else (x[:b], x[b:])

    p.chosen_tokens, p.rejected_tokens = halves(policy.token_logps)
    p.chosen_mask, p.rejected_mask = halves(policy.token_mask)
    p.chosen_token_ids, p.rejected_token_ids = halves(policy.token_ids)
    p.chosen_log_sum_sq, p.rejected_log_sum_sq = halves(policy.token_log_sum_sq)
    if ref_tokens is not None:
        p.ref_chosen_tokens, p.ref_rejected_tokens = ref_tokens
    return p


def check_padding_free(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor
) -> dict[str, float]:
    """Verify on this model and batch that packing is exact; raise `PreflensError` if it is not.

    Packing is exact only if the model keeps the packed sequences apart and at their own positions
    (transformers builds a block-diagonal mask from restarting position ids since 4.53; flash-attention
    uses variable-length kernels). A model that ignored them would silently let sequences attend to
    each other, so a run checks its model once before training packed. Two checks, no gradients:

    - isolation (any dtype): replacing the first sequence's tokens must leave every other sequence's
      packed log-probs unchanged. Rows never mix in an exact implementation, so the tolerance is tight
      even in bf16, while leaked attention moves them by far more;
    - agreement: packed and padded per-token log-probs match (1e-3 in fp32; in 16-bit a mean of 0.05,
      kernels differ between the two layouts).

    Returns the measured differences ("isolation", "max_abs", "mean_abs").
    """
    n = int(input_ids.shape[0])
    if n < 2:
        raise PreflensError("check_padding_free needs at least 2 sequences (packing joins several)")
    real0 = attention_mask[0].bool()
    other = input_ids.clone()
    ids0 = other[0, real0]
    other[0, real0] = torch.cat([ids0[1:], ids0[:1]]) if ids0.numel() > 1 else ids0
    if torch.equal(other[0], input_ids[0]):  # a constant sequence: any different token will do
        other[0, real0] = (ids0 + 1) % max(2, int(input_ids.max()) + 1)
    was_training = model.training
    model.eval()  # dropout would make two passes differ for reasons that have nothing to do with packing
    try:
        with torch.no_grad():
            padded = sequence_logps(
                model, input_ids, attention_mask, response_mask, return_tokens=True, return_hidden=True
            )
            packed = sequence_logps(
                model, input_ids, attention_mask, response_mask, return_tokens=True, padding_free=True
            )
            moved = sequence_logps(
                model, other, attention_mask, response_mask, return_tokens=True, padding_free=True
            )
    finally:
        model.train(was_training)
    assert padded.token_logps is not None and packed.token_logps is not None and moved.token_logps is not None
    mask = padded.token_mask
    pk, pd, mv = (x.token_logps.float() for x in (packed, padded, moved))  # type: ignore[union-attr]
    isolation = float((mv[1:] - pk[1:]).abs().max())
    delta = (pk - pd).abs()[mask]
    max_abs = float(delta.max()) if delta.numel() else 0.0
    mean_abs = float(delta.mean()) if delta.numel() else 0.0
    full = padded.hidden is not None and padded.hidden.dtype in (torch.float32, torch.float64)
    full = full and not _autocast_on(input_ids.device.type)
    problem = None
    if not isolation <= 1e-4:
        problem = f"changing one packed sequence moved the others' token log-probs by up to {isolation:.3g}"
    elif full and not max_abs <= 1e-3:
        problem = f"packed and padded token log-probs differ by up to {max_abs:.3g} (tolerance 1e-3)"
    elif not full and not mean_abs <= 0.05:
        problem = f"packed and padded token log-probs differ by {mean_abs:.3g} on average (tolerance 0.05)"
    if problem:
        raise PreflensError(
            f"padding_free is not exact for this model: {problem}. Its attention does not keep packed "
            "sequences apart at their own positions (transformers < 4.53, or a custom attention); "
            "train without padding_free."
        )
    return {"isolation": isolation, "max_abs": max_abs, "mean_abs": mean_abs}
