"""Gradient entanglement of chosen and rejected log-probs.

Yuan et al. 2024, "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement"
(arXiv 2410.13828, ICLR 2025), Sec. 3. With g_w = grad log pi(y_w), g_l = grad log pi(y_l) and the loss's
margin weights d_w = -dl/d log pi_w, d_l = dl/d log pi_l, one gradient step of size eta on the pair's loss
moves, to first order,

    delta chosen   = eta (d_w |g_w|^2 - d_l <g_w, g_l>)     condition 1 (chosen rises):   > 0
    delta rejected = eta (d_w <g_w, g_l> - d_l |g_l|^2)     condition 2 (rejected falls): < 0

(for DPO, d_w = d_l and the conditions read <g_w, g_l> < |g_w|^2 and <g_w, g_l> < |g_l|^2, the
paper's "<g_w, g_l> <= min(|g_w|^2, |g_l|^2)"); `first_order_change` is the one function that computes
these two moves. A step on a *batch* also moves pair i through the other pairs' gradients: with
c = dL_batch/d logp (all 2B sequences) the exact first-order change is delta logp = -eta Gram c, which we
report beside the per-pair form (it is what an SGD step observes).

Sec. 4 / Fig. 4: token level. The sentence-level inner product is the sum of the inner products of
per-token gradients; the paper finds it large and positive while most token-level products are
small or negative (shared tokens carry the positive part). `token_entanglement` measures that.

Everything here comes from `preflens.grad.sequence_gram`; the margin weights from
`preflens.losses.margin_weights` (autograd on PairLogps, so every loss in the registry works).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor, nn

from preflens.errors import PreflensError
from preflens.grad import sequence_gram_and_logps, token_gram
from preflens.logprobs import PairLogps, split_pairs
from preflens.losses.registry import LossFn
from preflens.losses.weights import margin_weights

__all__ = [
    "first_order_change",
    "EntanglementStats",
    "entanglement_from_gram",
    "pair_entanglement",
    "TokenEntanglement",
    "token_entanglement",
]

Reduction = Literal["mean", "sum"]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while measuring (the deterministic gradient the papers analyse, as `preflens probe`
    and the in-training probes take it); the model's own mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class EntanglementStats:
    """Per-pair statistics, each a [B] tensor (rows of `probes.parquet`)."""

    chosen: Tensor
    rejected: Tensor
    inner: Tensor
    norm_w: Tensor
    norm_l: Tensor
    cosine: Tensor
    d_w: Tensor
    d_l: Tensor
    pred_delta_chosen: Tensor
    """Per-pair first-order change eta (d_w |g_w|^2 - d_l <g_w, g_l>) (a step on this pair's loss)."""
    pred_delta_rejected: Tensor
    batch_pred_delta_chosen: Tensor
    """Exact first-order change under one SGD step of size eta on the batch loss: -eta (Gram c)."""
    batch_pred_delta_rejected: Tensor
    cond1_violated: Tensor
    """Chosen would fall (d_w |g_w|^2 - d_l <g_w,g_l> < 0)."""
    cond2_violated: Tensor
    """Rejected would rise (d_w <g_w,g_l> - d_l |g_l|^2 > 0)."""

    def rows(self, **constant: Any) -> list[dict[str, Any]]:
        """One dict per pair (plain Python numbers), with `constant` columns (e.g. step, pair_id list)."""
        cols = {f.name: getattr(self, f.name).detach().cpu().tolist() for f in fields(self)}
        b = len(cols["inner"])
        out = []
        for i in range(b):
            row = {
                k: (v[i] if isinstance(v, (list, tuple)) and len(v) == b else v) for k, v in constant.items()
            }
            row.update({k: v[i] for k, v in cols.items()})
            out.append(row)
        return out

    def aggregates(self, prefix: str = "probe/") -> dict[str, float]:
        """Batch summaries (ARCHITECTURE.md probe keys)."""
        cos = self.cosine[torch.isfinite(self.cosine)]
        return {
            f"{prefix}cosine": float(cos.mean()) if cos.numel() else math.nan,
            f"{prefix}inner": float(self.inner.mean()),
            f"{prefix}norm_w": float(self.norm_w.mean()),
            f"{prefix}norm_l": float(self.norm_l.mean()),
            f"{prefix}frac_cond1_violated": float(self.cond1_violated.float().mean()),
            f"{prefix}frac_cond2_violated": float(self.cond2_violated.float().mean()),
            f"{prefix}frac_pred_chosen_fell": float((self.batch_pred_delta_chosen < 0).float().mean()),
        }


def first_order_change(
    d_w: Tensor, d_l: Tensor, sq_norm_w: Tensor, inner: Tensor, sq_norm_l: Tensor, *, eta: float = 1.0
) -> tuple[Tensor, Tensor]:
    """First-order change of (chosen, rejected) log-probs under one gradient step on each pair's own loss.

    Yuan et al. 2024 (arXiv 2410.13828), Sec. 3: with g_w, g_l the gradients of the chosen and rejected
    log-probs and d_w = -dl/d chosen, d_l = dl/d rejected the loss's margin weights, a step of size eta on
    the pair's loss moves

        delta chosen   = eta (d_w |g_w|^2 - d_l <g_w, g_l>),
        delta rejected = eta (d_w <g_w, g_l> - d_l |g_l|^2).

    All arguments are per pair ([B], or any matching shape): `sq_norm_w` = |g_w|^2, `inner` = <g_w, g_l>,
    `sq_norm_l` = |g_l|^2 (the Gram's blocks). Condition 1 of the paper (chosen rises) is delta chosen > 0,
    condition 2 (rejected falls) delta rejected < 0; eta > 0 does not change either sign.
    """
    return eta * (d_w * sq_norm_w - d_l * inner), eta * (d_w * inner - d_l * sq_norm_l)


def _batch_weights(loss_fn: LossFn, p: PairLogps, reduction: Reduction) -> tuple[Tensor, Tensor, Tensor]:
    d_w, d_l = margin_weights(loss_fn, p)
    if reduction not in ("mean", "sum"):
        raise PreflensError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    r = 1.0 / d_w.shape[0] if reduction == "mean" else 1.0
    c = torch.cat([-d_w, d_l]) * r  # dL_batch / d logp for the 2B rows (chosen, then rejected)
    return d_w, d_l, c


def entanglement_from_gram(
    gram: Tensor,
    p: PairLogps,
    loss_fn: LossFn,
    *,
    eta: float = 1.0,
    reduction: Reduction = "mean",
) -> EntanglementStats:
    """Per-pair statistics from the [2B, 2B] Gram (chosen rows 0..B-1, rejected rows B..2B-1).

    `reduction` is how the training loss combines the per-pair losses (TRL and preflens: mean); it
    matters only for the batch prediction.
    """
    n = gram.shape[0]
    if n % 2 or gram.shape != (n, n) or p.chosen.shape[0] != n // 2:
        raise PreflensError(
            f"expected a [2B, 2B] Gram for B = {p.chosen.shape[0]} pairs, got {tuple(gram.shape)}"
        )
    b = n // 2
    g = gram.double()
    idx = torch.arange(b, device=g.device)
    inner = g[idx, idx + b]
    nw2, nl2 = g[idx, idx], g[idx + b, idx + b]
    nw, nl = nw2.clamp_min(0).sqrt(), nl2.clamp_min(0).sqrt()
    cos = inner / (nw * nl)
    d_w, d_l, c = _batch_weights(loss_fn, p, reduction)
    dw, dl = d_w.double().to(g.device), d_l.double().to(g.device)
    # The conditions are read on the moves of a unit step (eta > 0 does not change their sign).
    move_c, move_r = first_order_change(dw, dl, nw2, inner, nl2)
    batch = -eta * (g @ c.double().to(g.device))
    f = torch.float32
    return EntanglementStats(
        chosen=p.chosen.detach().float(),
        rejected=p.rejected.detach().float(),
        inner=inner.to(f),
        norm_w=nw.to(f),
        norm_l=nl.to(f),
        cosine=cos.to(f),
        d_w=d_w.float(),
        d_l=d_l.float(),
        pred_delta_chosen=(eta * move_c).to(f),
        pred_delta_rejected=(eta * move_r).to(f),
        batch_pred_delta_chosen=batch[:b].to(f),
        batch_pred_delta_rejected=batch[b:].to(f),
        cond1_violated=move_c < 0,
        cond2_violated=move_r > 0,
    )


def pair_entanglement(
    model: nn.Module,
    batch: dict[str, Tensor],
    loss_fn: LossFn,
    *,
    ref: tuple[Tensor, Tensor] | None = None,
    eta: float = 1.0,
    reduction: Reduction = "mean",
    params: Any = None,
    grad_norms: bool = False,
) -> EntanglementStats:
    """Entanglement statistics of a pair batch (ARCHITECTURE.md layout) in one forward + one backward.

    Measured in eval mode (dropout off; the model's mode is restored), as the papers and
    `preflens probe` take the gradients.

    `ref` = cached reference log-probs (chosen, rejected) for losses that need them. `grad_norms`
    fills `chosen_grad_norm`/`rejected_grad_norm` from the same Gram (needed by `normalized`).
    """
    with _eval_mode(model):
        gram, logps = sequence_gram_and_logps(
            model, batch["input_ids"], batch["attention_mask"], batch["response_mask"], params
        )
    lengths = batch["response_mask"].bool().sum(1)
    norms = None
    if grad_norms or getattr(loss_fn, "loss_name", None) == "normalized":
        norms = gram.diagonal().clamp_min(0).sqrt().to(logps)
    p = split_pairs(logps, lengths, ref, grad_norms=norms)
    return entanglement_from_gram(gram, p, loss_fn, eta=eta, reduction=reduction)


@dataclass
class TokenEntanglement:
    """Token-level vs sentence-level inner products of one pair (Yuan et al. 2024, arXiv 2410.13828,
    Sec. 4)."""

    inner: Tensor
    """[L_w, L_l] <grad log pi(y_w,i | ...), grad log pi(y_l,j | ...)>."""
    chosen_ids: Tensor
    rejected_ids: Tensor
    norm_w: Tensor
    """[L_w] per-token gradient norms of the chosen response."""
    norm_l: Tensor
    sentence_inner: float
    """<g_w, g_l> = the sum of all token-level products (exactly, when no token was cut off)."""

    def summary(self) -> dict[str, float]:
        same = self.chosen_ids[:, None] == self.rejected_ids[None, :]
        x = self.inner
        cos = x / (self.norm_w[:, None] * self.norm_l[None, :]).clamp_min(1e-30)
        return {
            "sentence_inner": self.sentence_inner,
            "token_inner_mean": float(x.mean()),
            "token_cosine_mean": float(cos.mean()),
            "frac_token_inner_negative": float((x < 0).float().mean()),
            "inner_from_same_tokens": float(x[same].sum()),
            "inner_from_different_tokens": float(x[~same].sum()),
        }


def token_entanglement(
    model: nn.Module,
    batch: dict[str, Tensor],
    pair: int,
    *,
    params: Any = None,
    max_tokens: int | None = None,
) -> TokenEntanglement:
    """Per-token gradient inner products between pair `pair`'s chosen and rejected responses.

    One forward row per response token (see `gram.token_gram`): an offline probe for a few pairs.
    """
    n = batch["input_ids"].shape[0]
    b = n // 2
    if not 0 <= pair < b:
        raise PreflensError(f"pair {pair} out of range for a batch of {b} pairs")
    rows = torch.tensor([pair, b + pair])
    ids = batch["input_ids"][rows]
    rm = batch["response_mask"][rows].bool()
    with _eval_mode(model):
        g, owner = token_gram(model, ids, rm, params, max_tokens=max_tokens)
    w = owner[:, 0] == 0
    lw = int(w.sum())
    inner = g[:lw, lw:]
    diag = g.diagonal().clamp_min(0).sqrt()
    tok_w = ids[0][rm[0]][:lw]
    tok_l = ids[1][rm[1]][: g.shape[0] - lw]
    return TokenEntanglement(
        inner=inner.float(),
        chosen_ids=tok_w,
        rejected_ids=tok_l,
        norm_w=diag[:lw].float(),
        norm_l=diag[lw:].float(),
        sentence_inner=float(inner.double().sum()),
    )
