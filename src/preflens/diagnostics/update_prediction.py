"""The first-order change of log-probs under the update the optimizer actually made.

Yuan et al. 2024 (arXiv 2410.13828, Sec. 3) write the change of the chosen/rejected log-prob for one *SGD*
step, -eta <g_i, grad L>. A run trained with AdamW does not take that step: its update is rescaled per
coordinate, so an SGD-form prediction set against an AdamW run's observed change compares unlike things.
Here the prediction is the directional derivative of each sequence's log-prob along the real parameter
update delta = theta_after - theta_before:

    predicted change of log pi_i  =  <g_i, delta>,   g_i = grad_theta log pi_i(theta_before),

whatever the optimizer made of the gradients (SGD: delta = -eta grad L, and this is the paper's form). The
observed change is log pi_i(theta_after) - log pi_i(theta_before), from scoring the same rows twice.

- `directional_change(model, batch, delta, params)`: <g_i, delta> for every row of a batch at the model's
  current parameters (the building block; reusable for any direction, e.g. one example's update);
- `update_prediction(model, batch, before, params)`: the model holds theta_after, `before` the saved
  theta_before; returns predicted and observed change per row, leaving the model as found;
- `prediction_agreement(table, tol)`: sign agreement and correlation over a probes table's
  `update_pred_*` / `update_obs_*` columns (the report's "how well the first-order picture held").

FSDP2 (`torch.distributed.fsdp.fully_shard`, DTensor parameters): exact, not approximated. The forward
must run through the sharded root's call (the caller passes `forward`, e.g. `training.fsdp.ThroughRoot`:
this module may not import training), so FSDP gathers the root's parameters and arms its backward. Each
row then gets its own forward and backward (one backward per forward, as in a training step); FSDP's
reduce-scatter leaves every rank the *mean over ranks* of that row's gradient in its local shard of
`p.grad`, which is the row's gradient itself because every rank scores the same rows. The dot product of
the local shards of the gradient and of the update, summed over the ranks (one all-reduce of N numbers),
is <g_i, delta> up to float summation order. No full parameter or gradient is ever gathered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from preflens.logprobs import sequence_logps

__all__ = [
    "trainable_params",
    "directional_change",
    "update_prediction",
    "UpdatePrediction",
    "prediction_agreement",
]


def trainable_params(model: nn.Module) -> list[Tensor]:
    """The parameters an optimizer updates (LoRA: the adapters only), in `model.parameters()` order."""
    return [p for p in model.parameters() if p.requires_grad]


def _row_logps(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"]).logps


def _forward_for(model: nn.Module, forward: nn.Module | None) -> nn.Module:
    if forward is not None:
        return forward
    if isinstance(model, FSDPModule):
        raise ValueError(
            "update_prediction on an FSDP2-sharded model needs `forward=` (a module whose call runs "
            "through the sharded root, e.g. preflens.training.fsdp.ThroughRoot(model))"
        )
    return model


def _reshard(model: nn.Module) -> None:
    """FSDP2: drop every gathered copy of the parameters, so the next forward gathers what the shards now
    hold. Needed after writing the shards: a forward without a backward leaves the root (and any unit with
    reshard_after_forward off) gathered, and FSDP would reuse those stale copies."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a plain tensor as is)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _sharded_directional_change(
    model: nn.Module,
    forward: nn.Module,
    batch: dict[str, Tensor],
    delta: Sequence[Tensor],
    params: list[Tensor],
) -> Tensor:
    """`directional_change` under FSDP2 (see the module docstring): per row, forward and backward through
    the root, local shards of grad and delta dotted, summed over the ranks."""
    import torch.distributed as dist

    keys = ("input_ids", "attention_mask", "response_mask")
    n = batch["input_ids"].shape[0]
    # the model's own gradients are kept aside and put back: the probe must not touch the training state
    with_grad = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in with_grad]
    local = torch.zeros(n, dtype=torch.float64, device=batch["input_ids"].device)
    model.set_requires_gradient_sync(True)  # type: ignore[operator]  # the reduce-scatter is what we read
    try:
        for i in range(n):
            for p in with_grad:
                p.grad = None
            row = {k: batch[k][i : i + 1] for k in keys}
            lp = _row_logps(forward, row).sum()
            if lp.requires_grad:  # a row without response tokens has no gradient (the same on every rank)
                lp.backward()
            for p, d in zip(params, delta):
                if p.grad is not None:
                    local[i] += (_local(p.grad).double() * _local(d).double()).sum()
    finally:
        for p, g in zip(with_grad, saved):
            p.grad = g
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(local)  # the sum over the ranks' shards
    return local.cpu()


def directional_change(
    model: nn.Module,
    batch: dict[str, Tensor],
    delta: Sequence[Tensor],
    params: Sequence[Tensor] | None = None,
    *,
    forward: nn.Module | None = None,
) -> Tensor:
    """<grad log pi_i, delta> for each row i of `batch` (a collate_pairs batch: chosen rows, then rejected
    rows), at the model's current parameters, in float64. `delta[k]` has the shape of `params[k]`
    (default: the trainable parameters). One backward per row: meant for probe-sized batches.
    `forward`: the module `sequence_logps` runs (default: `model`; FSDP2: required, see the module
    docstring); every rank must call this with the same rows."""
    params = list(params) if params is not None else trainable_params(model)
    if len(params) != len(delta):
        raise ValueError(f"directional_change: {len(delta)} direction tensors for {len(params)} parameters")
    fwd = _forward_for(model, forward)
    if any(isinstance(p, DTensor) for p in params):
        return _sharded_directional_change(model, fwd, batch, delta, params)
    logps = _row_logps(fwd, batch)
    out = torch.empty(logps.shape[0], dtype=torch.float64)
    for i in range(logps.shape[0]):
        gs = torch.autograd.grad(logps[i], params, retain_graph=i + 1 < logps.shape[0], allow_unused=True)
        out[i] = sum(float((g.double() * d.double()).sum()) for g, d in zip(gs, delta) if g is not None)
    return out


@dataclass
class UpdatePrediction:
    """Per row of the batch: the first-order predicted and the observed change of its log-prob."""

    pred: Tensor  # [N] float64, <g_i, delta>
    obs: Tensor  # [N] float64, log pi_i(after) - log pi_i(before)
    start: Tensor  # [N] float64, log pi_i(before)

    def __getitem__(self, key: str) -> Tensor:
        return getattr(self, key)


def update_prediction(
    model: nn.Module,
    batch: dict[str, Tensor],
    before: Sequence[Tensor],
    params: Sequence[Tensor] | None = None,
    *,
    forward: nn.Module | None = None,
) -> UpdatePrediction:
    """First-order change of each row's log-prob under the update the optimizer made.

    The model holds the parameters after the update; `before` holds the values of `params` (default: the
    trainable parameters) before it. The parameters are set back to `before` to take the gradients, then
    restored (also on error); dropout is off while scoring. The model is left as found. `forward`: as
    `directional_change`'s (FSDP2: the sharded root's call, e.g. `training.fsdp.ThroughRoot(model)`).
    """
    params = list(params) if params is not None else trainable_params(model)
    fwd = _forward_for(model, forward)
    if len(params) != len(before):
        raise ValueError(f"update_prediction: {len(before)} saved tensors for {len(params)} parameters")
    was_training = model.training
    model.eval()
    after = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, v in zip(params, before):
                p.copy_(v)
        _reshard(model)
        delta = [a - v for a, v in zip(after, before)]
        pred = directional_change(model, batch, delta, params, forward=fwd)
        with torch.no_grad():
            start = _row_logps(fwd, batch).double().cpu()
    finally:
        with torch.no_grad():
            for p, a in zip(params, after):
                p.copy_(a)
        _reshard(model)
    try:
        with torch.no_grad():
            end = _row_logps(fwd, batch).double().cpu()
    finally:
        model.train(was_training)
        _reshard(model)
    return UpdatePrediction(pred=pred, obs=end - start, start=start)


def prediction_agreement(table: Any, tol: float = 0.0) -> tuple[float | None, float | None, int]:
    """(sign agreement, Pearson correlation, n) of `update_pred_*` against `update_obs_*` over the chosen and
    rejected log-probs of a probes table (a DataFrame); observed changes within `tol` of zero are left out of
    the sign count (re-scoring noise has no sign)."""
    pred = np.concatenate([table[f"update_pred_{k}"].to_numpy(float) for k in ("chosen", "rejected")])
    obs = np.concatenate([table[f"update_obs_{k}"].to_numpy(float) for k in ("chosen", "rejected")])
    ok = np.isfinite(pred) & np.isfinite(obs)
    pred, obs = pred[ok], obs[ok]
    moved = np.abs(obs) > tol
    if not moved.any():
        return None, None, 0
    agree = float((np.sign(pred[moved]) == np.sign(obs[moved])).mean())
    corr = float(np.corrcoef(pred, obs)[0, 1]) if len(pred) > 2 and pred.std() > 0 and obs.std() > 0 else None
    return agree, corr, int(moved.sum())
