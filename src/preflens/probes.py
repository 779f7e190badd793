"""In-training gradient probes: entanglement and imbalance on a fixed probe set, and per step.

Seed 000 (Yuan et al., arXiv 2410.13828, Sec. 3) predicts, from <g_w, g_l>, |g_w|, |g_l| and the
loss's margin weights, whether the next step raises the chosen log-prob and lowers the rejected
one; seed 004 (arXiv 2502.20847, Eq. 2) gives the imbalance |dL/dpi_w| : |dL/dpi_l|. A run shows
whether those predictions come true only if the same pairs are measured again and again, so:

- `ProbeRunner(model, probe_batch, loss_fn, ref).run(step, lr)` measures a *fixed* probe batch (eval
  mode, one `sequence_gram` forward+backward, the model's gradients and mode untouched) and returns
  per-pair rows (step, pair_id, log-probs, inner products, norms, cosine, d_w, d_l, predicted changes
  for one SGD step of size lr, the conditions, and the *observed* change since the previous probe)
  plus aggregates (`probe/...` keys of ARCHITECTURE.md).
- `StepEntanglement` gets the batch's statistics from the training step's own backward
  (`gram.StepGramCapture`: per-sequence signals are the loss weights times the log-prob signals),
  cheap enough for every step (`entanglement/...` keys in the train rows).
- `ProbeCallback` wires both into `preflens.train.Trainer` (options `--probe-every`,
  `--probe-pairs`, `--step-entanglement`): rows go to `probes.parquet`, aggregates to
  `metrics.jsonl` as split "probe" rows.

The predicted changes are for plain SGD; with Adam the magnitudes differ, the *signs* (the
conditions) are what to compare with the observed changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from preflens.diagnostics.entanglement import EntanglementStats, entanglement_from_gram
from preflens.diagnostics.imbalance import gradient_imbalance, imbalance_metrics
from preflens.losses import LossFn, PairLogps
from preflens.train import TrainerCallback

__all__ = ["ProbeRunner", "StepEntanglement", "ProbeCallback", "probe_rows"]


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
    ) -> None:
        self.model = model
        # nats a log-prob must move to count as fallen/risen: re-scoring noise is not displacement
        # (`preflens.train.fell_tolerance`: 1e-4 in float32, 1e-2 in bf16, as the trainer's metrics)
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
        self.prev: dict[str, Any] | None = None

    def _fill_tokens(self, p: PairLogps) -> None:
        """Per-token policy log-probs of the probe batch (no grad) and the cached reference's."""
        import torch.nn.functional as F

        from preflens.logprobs import pair_logps_from_batch, sequence_logps

        b = self.batch
        with torch.no_grad():
            seq = sequence_logps(
                self.model, b["input_ids"], b["attention_mask"], b["response_mask"], return_tokens=True
            )
        q = pair_logps_from_batch(seq)
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
        from preflens.diagnostics.gram import sequence_gram_and_logps

        was_training = self.model.training
        self.model.eval()  # no dropout: the deterministic gradient the papers analyse
        try:
            b = self.batch
            gram, logps = sequence_gram_and_logps(
                self.model, b["input_ids"], b["attention_mask"], b["response_mask"], self.params
            )
        finally:
            self.model.train(was_training)
        n = logps.shape[0] // 2
        lengths = b["response_mask"].bool().sum(1)
        p = PairLogps(
            chosen=logps[:n].float(),
            rejected=logps[n:].float(),
            ref_chosen=None if self.ref is None else self.ref[0].float().to(logps.device),
            ref_rejected=None if self.ref is None else self.ref[1].float().to(logps.device),
            chosen_len=lengths[:n],
            rejected_len=lengths[n:],
        )
        if self.ref_tokens is not None:
            self._fill_tokens(p)
        norms = gram.diagonal().clamp_min(0).sqrt().float()
        p.chosen_grad_norm, p.rejected_grad_norm = norms[:n], norms[n:]  # used by `normalized` only
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
                r["obs_steps"] = step - prev["step"]
                r["obs_delta_chosen"] = float(chosen[i] - prev["chosen"][i])
                r["obs_delta_rejected"] = float(rejected[i] - prev["rejected"][i])
                # what the previous probe predicted for one step, times the steps since
                r["pred_at_prev_chosen"] = float(prev["pred_c"][i]) * r["obs_steps"]
                r["pred_at_prev_rejected"] = float(prev["pred_r"][i]) * r["obs_steps"]
        tol = self.fell_tol
        agg["probe/frac_chosen_fell"] = float((chosen < self.first[0] - tol).float().mean())
        agg["probe/frac_rejected_rose"] = float((rejected > self.first[1] + tol).float().mean())
        if prev is not None:
            agg["probe/frac_chosen_fell_since_prev"] = float((chosen < prev["chosen"] - tol).float().mean())
            agg["probe/frac_rejected_rose_since_prev"] = float(
                (rejected > prev["rejected"] + tol).float().mean()
            )
        agg["probe/logps_chosen"] = float(chosen.mean())
        agg["probe/logps_rejected"] = float(rejected.mean())
        self.prev = {
            "step": step,
            "chosen": chosen,
            "rejected": rejected,
            "pred_c": stats.batch_pred_delta_chosen.cpu(),
            "pred_r": stats.batch_pred_delta_rejected.cpu(),
        }
        return rows, agg


class StepEntanglement:
    """Per-step entanglement statistics from the training step's own backward.

    `capture(model, batch)` returns the context to wrap one micro-batch's forward+backward in;
    `watch(seq_logps, pair)` is called after the forward; after the context exits, `stats` holds
    the micro-batch's `EntanglementStats` (pairs whose loss weight is 0 come out NaN).
    """

    def __init__(self, loss_fn: LossFn, reduction: str = "mean", fuse_grads: bool = False) -> None:
        self.loss_fn = loss_fn
        self.reduction = reduction
        self.fuse_grads = fuse_grads
        self._checked = False
        self.cap: Any = None
        self.pair: PairLogps | None = None
        self.collected: list[EntanglementStats] = []

    def capture(self, model: nn.Module, batch: dict[str, Tensor]) -> Any:
        from preflens.diagnostics.gram import StepGramCapture

        self.cap = StepGramCapture(
            model,
            batch["attention_mask"],
            batch["response_mask"],
            check_graph=not self._checked,
            fuse_grads=self.fuse_grads,
        )
        outer = self

        class _Ctx:
            def __enter__(self) -> None:
                outer.cap.__enter__()

            def __exit__(self, *exc: Any) -> None:
                outer.cap.__exit__(*exc)
                if exc[0] is None:
                    outer._finish()

        return _Ctx()

    def watch(self, logps: Tensor, pair: PairLogps) -> None:
        self.cap.watch(logps)
        self._checked = True
        self.pair = pair.replace(
            **{k: v.detach() for k, v in vars(pair).items() if isinstance(v, Tensor) and v.requires_grad}
        )

    def _finish(self) -> None:
        if self.pair is None or self.cap.c is None:
            self.cap.cap.finish()  # with fused weight gradients, this writes the remaining ones
            self.pair = None
            return
        gram = self.cap.result()
        self.collected.append(entanglement_from_gram(gram, self.pair, self.loss_fn, reduction=self.reduction))  # type: ignore[arg-type]
        self.pair = None

    def pop_metrics(self, gather: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """Aggregates over the micro-batches since the last call (`entanglement/...` keys).

        Under several processes each one holds the statistics of its share of every batch; `gather`
        (the accelerator's) collects all of them first, so the means are over the whole global batch
        and not rank 0's share (every process holds the same number of pairs, so shapes agree).
        """
        if not self.collected:
            return {}
        keys = [
            "cosine",
            "inner",
            "norm_w",
            "norm_l",
            "cond1_violated",
            "cond2_violated",
        ]
        table = torch.stack([torch.cat([getattr(s, k).float() for s in self.collected]) for k in keys], 1)
        if gather is not None:
            table = gather(table)  # [pairs on all processes, keys]: one collective per step
        out: dict[str, float] = {}
        for j, k in enumerate(keys):
            v = table[:, j]
            v = v[torch.isfinite(v)]
            name = f"entanglement/frac_{k}" if k.startswith("cond") else f"entanglement/{k}"
            out[name] = float(v.mean()) if v.numel() else math.nan
        self.collected = []
        return out


class ProbeCallback(TrainerCallback):
    """Adds probes to `preflens.train.Trainer` (`--probe-every K --probe-pairs P --step-entanglement`).

    The probe set is the first P pairs (by pair id) of the eval split, filled up with the first
    train pairs when the eval split has fewer than P, each with its cached reference log-probs and
    its split in the `split` column. It is probed before step 1 and every K optimizer steps; a
    resumed run takes its first and latest probe back from probes.parquet.
    """

    def __init__(self, every: int, pairs: int, step_entanglement: bool = False) -> None:
        self.every = int(every)
        self.pairs = int(pairs)
        self.step = StepEntanglement.__new__(StepEntanglement) if step_entanglement else None
        self.runner: ProbeRunner | None = None

    # -- probes on a fixed set ----------------------------------------------------------------

    def on_train_begin(self, trainer: Any) -> None:
        from preflens.data.collate import collate_pairs
        from preflens.errors import PreflensError

        kind = str(getattr(trainer.accelerator, "distributed_type", ""))
        if "FSDP" in kind or "DEEPSPEED" in kind:
            raise PreflensError(
                "--probe-every/--step-entanglement read whole parameters and their gradients per module; "
                f"not supported with sharded training ({kind}): use one process or DDP"
            )

        if self.step is not None:
            from preflens.losses import TOKEN_LEVEL_LOSSES

            if trainer.config.loss in TOKEN_LEVEL_LOSSES or trainer.mask_head is not None:
                from preflens.errors import PreflensError

                raise PreflensError(
                    f"--step-entanglement needs a loss of the summed log-probs; '{trainer.config.loss}' weighs "
                    "tokens individually (use --probe-every for its sentence-level statistics)"
                )
            # The hooks write the weight gradients (the sum of the per-sequence ones they build anyway),
            # so autograd skips them: no duplicate work. Under DDP that means its all-reduce hooks never
            # fire, so the trainer syncs the gradients itself after the step's backward.
            StepEntanglement.__init__(self.step, trainer.loss_fn, fuse_grads=True)
            trainer.manual_grad_sync = trainer.accelerator.num_processes > 1
        if self.every > 0 and self.pairs < 1:
            raise PreflensError(
                f"--probe-every {self.every} needs a probe set: --probe-pairs must be >= 1, got {self.pairs}"
            )
        if self.every <= 0:
            return
        # The first P eval pairs; when the eval split is smaller (12 pairs at --eval-fraction 0.1 hold
        # 1), filled up with the first train pairs, so the probe set has the size asked for.
        chosen_items = [
            ("eval", it) for it in sorted(trainer.eval_items, key=lambda it: it.pair_id)[: self.pairs]
        ]
        more = self.pairs - len(chosen_items)
        chosen_items += [
            ("train", it) for it in sorted(trainer.train_items, key=lambda it: it.pair_id)[:more]
        ]
        self.splits = [split for split, _ in chosen_items]
        items = [it for _, it in chosen_items]
        batch = collate_pairs(items, trainer.tokenizer.pad_token_id)
        dev = trainer.accelerator.device
        batch = {k: (v.to(dev) if isinstance(v, Tensor) else v) for k, v in batch.items()}
        ref = torch.stack([trainer.ref_table[split][it.pair_id] for split, it in chosen_items])
        model = trainer.accelerator.unwrap_model(trainer.model)
        ref_tokens = None
        if trainer.needs_tokens:
            if trainer.mask_head is not None:
                raise PreflensError(
                    "--probe-every with sparse mask='learned' is not supported: the probe has no mask head "
                    "(use mask='diff', or probe without the learned mask)"
                )
            from torch.nn.utils.rnn import pad_sequence

            ref_tokens = tuple(
                pad_sequence(
                    [trainer.reference[split][it.pair_id][key].float() for split, it in chosen_items],
                    batch_first=True,
                )
                for key in ("chosen_tokens", "rejected_tokens")
            )
        self.runner = ProbeRunner(
            model,
            batch,
            trainer.loss_fn,
            (ref[:, 0], ref[:, 1]),
            ref_tokens=ref_tokens,
            fell_tol=trainer._fell_tol,
        )
        if trainer.state.step == 0:
            self._probe(trainer, 0, trainer.scheduler.get_last_lr()[0])
        else:
            self._restore(trainer.tracker.table("probes").rows)

    def _restore(self, rows: list[dict[str, Any]]) -> None:
        """On resume: the first and the latest probe of the run so far, from probes.parquet's rows.

        Without them `probe/frac_chosen_fell` would compare with the first probe *after* the resume
        (not with the start of training) and the first observed change would be missing. Left as is
        when the saved probes are of another probe set (e.g. --probe-pairs changed).
        """
        runner = self.runner
        if runner is None or not rows:
            return
        by_step: dict[int, dict[tuple[str, int], dict[str, Any]]] = {}
        for r in rows:
            by_step.setdefault(int(r["step"]), {})[(str(r.get("split")), int(r["pair_id"]))] = r
        keys = list(zip(self.splits, runner.pair_ids))

        def column(step: int, name: str) -> Tensor | None:
            table = by_step[step]
            if not all(k in table and name in table[k] for k in keys):
                return None
            return torch.tensor([float(table[k][name]) for k in keys])

        first, last = min(by_step), max(by_step)
        c0, r0 = column(first, "chosen"), column(first, "rejected")
        if c0 is None or r0 is None:
            return
        runner.first = (c0, r0)
        prev = {
            n: column(last, n)
            for n in ("chosen", "rejected", "batch_pred_delta_chosen", "batch_pred_delta_rejected")
        }
        if all(v is not None for v in prev.values()):
            runner.prev = {
                "step": last,
                "chosen": prev["chosen"],
                "rejected": prev["rejected"],
                "pred_c": prev["batch_pred_delta_chosen"],
                "pred_r": prev["batch_pred_delta_rejected"],
            }

    def _probe(self, trainer: Any, step: int, lr: float) -> None:
        rows, agg = self.runner.run(step, lr)  # type: ignore[union-attr]
        for r, split in zip(rows, self.splits):
            r["split"] = split
        trainer.tracker.table("probes").append(rows)
        trainer.tracker.log({"step": step, "split": "probe", **agg})

    def on_step_end(self, trainer: Any, state: Any, batch_stats: dict[str, Any]) -> dict | None:
        if self.runner is not None and self.every > 0 and state.step % self.every == 0:
            self._probe(trainer, state.step, float(batch_stats["metrics"].get("lr", 1.0)))
        return self.step.pop_metrics(trainer.accelerator.gather) if self.step is not None else None

    # -- statistics of the training step itself -------------------------------------------------

    def micro_batch_context(self, trainer: Any, batch: dict[str, Any]) -> Any:
        if self.step is None:
            return None
        return self.step.capture(trainer.accelerator.unwrap_model(trainer.model), batch)

    def on_logps(self, trainer: Any, batch: dict[str, Any], seq: Any, pair: Any, per_pair_loss: Any) -> None:
        if self.step is not None:
            self.step.watch(seq.logps, pair)
