"""Which training pairs pushed the probe set's chosen responses down: first-order attribution of
likelihood displacement to training pairs, from the cross-example products of `preflens.grad.cross`.

One SGD step with learning rate eta on training pair i's loss share changes a probe log-prob by, to first
order (Wang et al. 2024, "Data Shapley in One Training Run", arXiv 2406.11011, Sec. 4; the displacement
reading is Razin et al. 2024, arXiv 2410.08847, Sec. 4, and Yuan et al. 2024, arXiv 2410.13828, Sec. 3):

    effect_sgd[i, j] = -eta * kappa * <grad l_i, grad logp_j>,
    grad l_i = -d_w,i grad logp(y_w,i) + d_l,i grad logp(y_l,i)       (margin weights, / batch size)

kappa is the step's gradient-clipping coefficient (1 without clipping). The batch sum is the first-order
change of logp_j under the step's SGD update. Exact up to floating point (the products are exact).

The optimizer-aware form for Adam/AdamW (`adam_scale`, `adam_denominators`): torch's update is
    theta -= eta / bc1 * m_t / D_t,   m_t = beta1 m_{t-1} + (1 - beta1) kappa g_t,
    D_t = sqrt(v_t / bc2) + eps,      v_t = beta2 v_{t-1} + (1 - beta2) (kappa g_t)^2 (optimizer state)
so with D_t the *actual* denominator of the step (read after `optimizer.step()`), the update is
exactly the sum of
- the batch's pairs' shares  -eta (1 - beta1) / bc1 * kappa * g_i / D_t   (what `effect_adam` attributes),
- the momentum of earlier batches  -eta beta1 / bc1 * m_{t-1} / D_t        (not attributed to this step),
- decoupled weight decay  -eta * lambda * theta                           (no pair's doing).
Where this is exact and where not:
- step 1 (m_0 = 0) with no weight decay: the pairs' shares sum to the whole update (tests check it);
- later steps: exact as a decomposition of the current batch's share of the update, but the update also
  moves by the earlier batches' momentum, so the sum no longer predicts the whole change;
- with a frozen *earlier* preconditioner (e.g. D_{t-1}) it is not exact at any step: D_t depends on g_t;
- counterfactuals are not linear: dropping pair i changes g_t, hence v_t and D_t for all other pairs.
  The share is the pair's part of the update that happened, not the update without it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

__all__ = [
    "ATTRIBUTION_FILE",
    "ATTRIBUTION_PAIRS_FILE",
    "adam_denominators",
    "adam_scale",
    "clip_coefficient",
    "concentration",
    "pair_effects",
    "rank_agreement",
    "summarize_rows",
]

# Run-directory files (kept here, next to their writer; `preflens.tracking` lists the trainer's own).
ATTRIBUTION_FILE = "attribution.parquet"
"""One row per (step, train pair, probe pair): the first-order effects on the probe's chosen/rejected."""
ATTRIBUTION_PAIRS_FILE = "attribution_pairs.parquet"
"""One row per train pair: its total predicted effect on the probe set's chosen log-probs, times seen, mean."""


def pair_effects(cross: Tensor, scale: float) -> Tensor:
    """[B, P, 2] effects from the [2B, 2P] cross products (train rows: chosen then rejected; probe columns
    likewise): effect[i, j, 0] on probe j's chosen, [..., 1] on its rejected; `scale` = -eta * kappa (or
    the Adam factor). A pair's share is the sum over its chosen and rejected rows."""
    nt, np_ = cross.shape
    b, p = nt // 2, np_ // 2
    per_pair = cross[:b] + cross[b:]  # [B, 2P]: <grad l_i, grad logp_j>
    return torch.stack([per_pair[:, :p], per_pair[:, p:]], -1) * scale


def clip_coefficient(grad_norm: float, max_grad_norm: float | None) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor: min(1, max / (norm + 1e-6)); 1 without clipping."""
    if not max_grad_norm or not math.isfinite(grad_norm):
        return 1.0
    return min(1.0, float(max_grad_norm) / (float(grad_norm) + 1e-6))


def adam_denominators(optimizer: Any, params: Iterable[nn.Parameter]) -> dict[int, Tensor] | None:
    """{id(param): D_t} of an Adam/AdamW step that has just run: sqrt(v_t / (1 - beta2^t)) + eps, exactly
    torch's denominator; None when the optimizer is not Adam-like (no exp_avg_sq state) or uses amsgrad."""
    out: dict[int, Tensor] = {}
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for p in params:
        st = optimizer.state.get(p)
        g = groups.get(id(p))
        if g is None or not st or "exp_avg_sq" not in st or g.get("amsgrad"):
            return None
        beta2, eps = g["betas"][1], g["eps"]
        t = float(st["step"])
        out[id(p)] = st["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t) + eps
    return out


def adam_scale(optimizer: Any, lr: float, kappa: float) -> float:
    """-eta (1 - beta1) / (1 - beta1^t) * kappa: the factor of a pair's share <g_i, . / D_t> in the step
    that has just run (one param group's betas and step count; preflens trains one group)."""
    g = optimizer.param_groups[0]
    beta1 = g["betas"][0]
    st = optimizer.state.get(g["params"][0]) or {}
    t = float(st.get("step", 1))
    return -lr * (1 - beta1) / (1 - beta1**t) * kappa


def summarize_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per train pair over a run's attribution rows: total predicted effect on the probe set's chosen
    (and rejected) log-probs, the number of attributed steps it was seen in, and the mean per step."""
    acc: dict[int, dict[str, Any]] = {}
    steps: dict[int, set[int]] = {}
    adam = bool(rows) and "adam_chosen" in rows[0]
    for r in rows:
        pid = int(r["pair_id"])
        a = acc.setdefault(pid, {"pair_id": pid, "total_chosen": 0.0, "total_rejected": 0.0})
        a["total_chosen"] += float(r["sgd_chosen"])
        a["total_rejected"] += float(r["sgd_rejected"])
        if adam and r.get("adam_chosen") is not None and math.isfinite(float(r["adam_chosen"])):
            a["adam_total_chosen"] = a.get("adam_total_chosen", 0.0) + float(r["adam_chosen"])
        seen_steps = steps.setdefault(pid, set())
        if int(r["step"]) not in seen_steps:  # one cosine per (step, pair), repeated on its probe rows
            seen_steps.add(int(r["step"]))
            cos = float(r.get("cosine", math.nan))
            if math.isfinite(cos):
                a["_cos"] = a.get("_cos", 0.0) + cos
                a["_ncos"] = a.get("_ncos", 0) + 1
    out = []
    for pid, a in acc.items():
        seen = len(steps[pid])
        a["seen"] = seen
        a["mean_chosen"] = a["total_chosen"] / seen
        n_cos = a.pop("_ncos", 0)
        a["mean_cosine"] = a.pop("_cos", 0.0) / n_cos if n_cos else math.nan
        out.append(a)
    out.sort(key=lambda a: (a["total_chosen"], a["pair_id"]))
    return out


def concentration(effects: Sequence[float], fractions: Sequence[float] = (0.05, 0.2)) -> dict[float, float]:
    """Share of the total downward push (sum of the negative effects) that the top `fraction` of pairs
    (most negative first) account for; NaN when nothing was pushed down."""
    neg = sorted(min(0.0, float(e)) for e in effects)
    total = sum(neg)
    out: dict[float, float] = {}
    for f in fractions:
        k = max(1, int(math.ceil(f * len(neg)))) if neg else 0
        out[f] = (sum(neg[:k]) / total) if total < 0 else math.nan
    return out


def rank_agreement(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation of two scores over the same pairs (None: fewer than 3, or constant).

    pandas' average ranks of ties, as `ches_scan`'s Spearman uses them."""
    if len(a) < 3 or len(a) != len(b):
        return None
    ra = pd.Series(list(a), dtype="float64").rank()
    rb = pd.Series(list(b), dtype="float64").rank()
    r = float(ra.corr(rb))
    return None if math.isnan(r) else r
