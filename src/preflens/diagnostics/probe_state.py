"""Gradient entanglement and imbalance of a *fixed* probe set, measured again and again during a run.

Yuan et al. 2024 (arXiv 2410.13828, Sec. 3) predict, from <g_w, g_l>, |g_w|, |g_l| and the loss's margin
weights, whether the next step raises the chosen log-prob and lowers the rejected one; Ma et al. 2025
(arXiv 2502.20847, Eq. 2) give the imbalance |dL/dpi_w| : |dL/dpi_l|. A run shows whether those predictions
come true only if the same pairs are measured at every probe, so `ProbeRunner` keeps the first and the
previous measurement and each row holds the change observed since the previous probe beside what that probe
predicted for it.

Shared by `preflens train --probe-every` (`training.probes.ProbeCallback`), the TRL callback
(`integrations.trl`) and `preflens probe` (`probe_rows`); `ProbeHistory.from_rows` is the one way a resumed
run of either trainer takes its earlier probes back from probes.parquet. The predicted changes are for plain
SGD; with Adam the magnitudes differ, the *signs* (the conditions) are what to compare with the observed
changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from preflens.diagnostics.entanglement import EntanglementStats, entanglement_from_gram
from preflens.diagnostics.imbalance import gradient_imbalance, imbalance_metrics
from preflens.grad import sequence_gram_and_logps
from preflens.grad.capture import gathered_root
from preflens.logprobs import PairLogps, pair_logps_from_batch, sequence_logps, split_pairs
from preflens.losses import LossFn

__all__ = ["ProbeRunner", "ProbeHistory", "PreviousProbe", "probe_rows"]


@dataclass
class PreviousProbe:
    """The latest probe of the set: its step, log-probs and what it predicted for one step."""

    step: int
    chosen: Tensor
    rejected: Tensor
    pred_chosen: Tensor
    pred_rejected: Tensor


@dataclass
class ProbeHistory:
    """What a probe runner remembers between probes: the first measurement and the latest one."""

    first: tuple[Tensor, Tensor]
    prev: PreviousProbe | None

    @classmethod
    def from_rows(
        cls, rows: Sequence[dict[str, Any]], keys: Sequence[tuple[str, int]]
    ) -> ProbeHistory | None:
        """From probes.parquet rows, for the probe set `keys` ((split, pair_id) in probe order).

        None when the saved probes are of another probe set (e.g. --probe-pairs changed): the runner then
        starts afresh. `prev` is None when the latest probe lacks the predicted changes.
        """
        if not rows:
            return None
        by_step: dict[int, dict[tuple[str, int], dict[str, Any]]] = {}
        for r in rows:
            by_step.setdefault(int(r["step"]), {})[(str(r.get("split")), int(r["pair_id"]))] = r

        def column(step: int, name: str) -> Tensor | None:
            table = by_step[step]
            if not all(k in table and name in table[k] for k in keys):
                return None
            return torch.tensor([float(table[k][name]) for k in keys])

        first, last = min(by_step), max(by_step)
        c0, r0 = column(first, "chosen"), column(first, "rejected")
        if c0 is None or r0 is None:
            return None
        cols = {
            n: column(last, n)
            for n in ("chosen", "rejected", "batch_pred_delta_chosen", "batch_pred_delta_rejected")
        }
        prev = None
        if all(v is not None for v in cols.values()):
            prev = PreviousProbe(
                step=last,
                chosen=cols["chosen"],
                rejected=cols["rejected"],
                pred_chosen=cols["batch_pred_delta_chosen"],
                pred_rejected=cols["batch_pred_delta_rejected"],
            )
        return cls(first=(c0, r0), prev=prev)


def probe_rows(
    stats: EntanglementStats, p: PairLogps, loss_fn: LossFn, pair_ids: list[int], step: int
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per-pair rows and aggregates of one measurement (shared by the probe runner and `preflens probe`)."""
    imb = gradient_imbalance(loss_fn, p)
    rows = stats.rows(step=step, pair_id=pair_ids)
    ref_c = p.ref_chosen.tolist() if p.ref_chosen is not None else [math.nan] * len(rows)
    ref_r = p.ref_rejected.tolist() if p.ref_rejected is not None else [math.nan] * len(rows)
    for i, r in enumerate(rows):
        r["ref_chosen"], r["ref_rejected"] = ref_c[i], ref_r[i]
        r["imbalance_log_ratio"] = float(imb.log_ratio[i])
        r["lambda_w"] = float(imb.lambda_w[i])
    agg = stats.aggregates("probe/")
    m = imbalance_metrics(imb)
    agg["probe/imbalance_ratio"] = m["imbalance/ratio"]
    agg["probe/lambda_w"] = m["imbalance/lambda_w"]
    return rows, agg


class ProbeRunner:
    """Entanglement/imbalance statistics of a fixed probe batch, compared with the previous probe.

    `batch` is a pair batch in ARCHITECTURE.md's layout (chosen rows, then rejected rows) on the
    model's device; `ref` the reference log-probs (chosen, rejected) [B] for losses that need them.
    """

    def __init__(
        self,
        model: nn.Module,
        batch: dict[str, Tensor],
        loss_fn: LossFn,
        ref: tuple[Tensor, Tensor] | None = None,
        *,
        params: Any = None,
        reduction: str = "mean",
        ref_tokens: tuple[Tensor, Tensor] | None = None,
        fell_tol: float = 1e-4,
        log_sum_sq: bool = False,
    ) -> None:
        self.model = model
        # also log sum_v pi(v)^2 per token (WPO's weight: a loss with TRL's use_weighting reads it)
        self.log_sum_sq = log_sum_sq
        # nats a log-prob must move to count as fallen/risen: re-scoring noise is not displacement
        # (`diagnostics.displacement.fell_tolerance`: 1e-4 in float32, 1e-2 in bf16, as the trainer's metrics)
        self.fell_tol = fell_tol
        # per-token reference log-probs [B, L] (left-aligned), for token-level losses (`sparse`)
        self.ref_tokens = ref_tokens
        self.batch = batch
        self.loss_fn = loss_fn
        self.ref = ref
        self.params = params
        self.reduction = reduction
        self.pair_ids = [int(i) for i in batch["pair_index"].tolist()]
        self.first: tuple[Tensor, Tensor] | None = None
        """(chosen, rejected) at the first probe: what `probe/frac_chosen_fell` compares with."""
        self.prev: PreviousProbe | None = None

    def restore(self, history: ProbeHistory) -> None:
        """Continue a run's probes (resume): its first and latest measurement."""
        self.first, self.prev = history.first, history.prev

    def _fill_tokens(self, p: PairLogps) -> None:
        """Per-token policy log-probs of the probe batch (no grad) and the cached reference's."""
        b = self.batch
        with torch.no_grad(), gathered_root(self.model):  # FSDP2: the root's parameters (grad.capture)
            seq = sequence_logps(
                self.model, b["input_ids"], b["attention_mask"], b["response_mask"], return_tokens=True,
                **({"return_log_sum_sq": True} if self.log_sum_sq else {}),
            )  # fmt: skip
        q = pair_logps_from_batch(seq)
        p.chosen_log_sum_sq, p.rejected_log_sum_sq = q.chosen_log_sum_sq, q.rejected_log_sum_sq
        width = q.chosen_tokens.shape[1]  # type: ignore[union-attr]

        def fit(x: Tensor) -> Tensor:
            x = x.float().to(seq.logps.device)
            return F.pad(x, (0, width - x.shape[1])) if x.shape[1] < width else x[:, :width]

        p.chosen_tokens, p.rejected_tokens = q.chosen_tokens, q.rejected_tokens
        p.chosen_mask, p.rejected_mask = q.chosen_mask, q.rejected_mask
        p.chosen_token_ids, p.rejected_token_ids = q.chosen_token_ids, q.rejected_token_ids
        p.ref_chosen_tokens, p.ref_rejected_tokens = fit(self.ref_tokens[0]), fit(self.ref_tokens[1])  # type: ignore[index]

    def run(self, step: int, lr: float = 1.0) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Measure now; `lr` scales the predicted changes (one SGD step of that size)."""
        was_training = self.model.training
        self.model.eval()  # no dropout: the deterministic gradient the papers analyse
        try:
            b = self.batch
            gram, logps = sequence_gram_and_logps(
                self.model, b["input_ids"], b["attention_mask"], b["response_mask"], self.params
            )
        finally:
            self.model.train(was_training)
        norms = gram.diagonal().clamp_min(0).sqrt().float()  # read by `normalized` only
        ref = None if self.ref is None else (self.ref[0].float(), self.ref[1].float())
        p = split_pairs(logps.float(), b["response_mask"].bool().sum(1), ref, grad_norms=norms)
        if self.ref_tokens is not None:
            self._fill_tokens(p)
        stats = entanglement_from_gram(gram, p, self.loss_fn, eta=lr, reduction=self.reduction)  # type: ignore[arg-type]
        rows, agg = probe_rows(stats, p, self.loss_fn, self.pair_ids, step)

        chosen, rejected = p.chosen.detach().cpu(), p.rejected.detach().cpu()
        if self.first is None:
            self.first = (chosen, rejected)
        prev = self.prev
        for i, r in enumerate(rows):
            if prev is None:
                r.update(obs_steps=0, obs_delta_chosen=math.nan, obs_delta_rejected=math.nan)
                r.update(pred_at_prev_chosen=math.nan, pred_at_prev_rejected=math.nan)
            else:
                r["obs_steps"] = step - prev.step
                r["obs_delta_chosen"] = float(chosen[i] - prev.chosen[i])
                r["obs_delta_rejected"] = float(rejected[i] - prev.rejected[i])
                # what the previous probe predicted for one step, times the steps since
                r["pred_at_prev_chosen"] = float(prev.pred_chosen[i]) * r["obs_steps"]
                r["pred_at_prev_rejected"] = float(prev.pred_rejected[i]) * r["obs_steps"]
        tol = self.fell_tol
        agg["probe/frac_chosen_fell"] = float((chosen < self.first[0] - tol).float().mean())
        agg["probe/frac_rejected_rose"] = float((rejected > self.first[1] + tol).float().mean())
        if prev is not None:
            agg["probe/frac_chosen_fell_since_prev"] = float((chosen < prev.chosen - tol).float().mean())
            agg["probe/frac_rejected_rose_since_prev"] = float(
                (rejected > prev.rejected + tol).float().mean()
            )
        agg["probe/logps_chosen"] = float(chosen.mean())
        agg["probe/logps_rejected"] = float(rejected.mean())
        self.prev = PreviousProbe(
            step=step,
            chosen=chosen,
            rejected=rejected,
            pred_chosen=stats.batch_pred_delta_chosen.cpu(),
            pred_rejected=stats.batch_pred_delta_rejected.cpu(),
        )
        return rows, agg
