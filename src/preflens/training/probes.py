"""Gradient probes inside `preflens train`: a fixed probe set every K steps, and every step's own statistics.

- `ProbeCallback` (options `--probe-every K --probe-pairs P --step-entanglement`) measures the fixed probe
  set with `diagnostics.probe_state.ProbeRunner` (rows to probes.parquet, aggregates to metrics.jsonl as
  split "probe" rows) and, with `--step-entanglement`, each training batch;
- `StepEntanglement` gets a batch's entanglement statistics (Yuan et al. 2024, arXiv 2410.13828, Sec. 3)
  from the training step's own backward (`preflens.grad.StepGramCapture`: the per-sequence signals are the
  loss weights times the log-prob signals), cheap enough for every step (`entanglement/...` keys).

The callback reads the trainer only through `callbacks.TrainerView`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from preflens.data.collate import collate_pairs
from preflens.diagnostics.entanglement import EntanglementStats, entanglement_from_gram
from preflens.diagnostics.probe_state import ProbeHistory, ProbeRunner
from preflens.diagnostics.update_prediction import trainable_params, update_prediction
from preflens.errors import PreflensError
from preflens.grad import StepGramCapture
from preflens.logprobs import PairLogps
from preflens.losses import LossFn, loss_token_weighted
from preflens.training import fsdp
from preflens.training.callbacks import TrainerCallback, TrainerView

__all__ = ["StepEntanglement", "ProbeCallback", "check_step_entanglement"]


def check_step_entanglement(loss: str, loss_kwargs: dict[str, Any], *, learned_mask: bool = False) -> None:
    """Refuse `--step-entanglement` for a loss whose gradient it would measure wrongly, naming why.

    The fused statistics (`grad.StepGramCapture`) recover each sequence's gradient from the step's backward
    by dividing by one weight per sequence, c_s = dL/d logp_s (hooked on the summed log-probs). That is
    exact when the loss reads each response only through its summed log-prob (WPO's detached weight,
    TRL's `use_weighting`, only scales c_s). A loss that differentiates the per-token log-probs with
    weights of its own (`sparse`, TRL's `ld_alpha`, a comma combination holding one) sends gradient past
    that hook: c_s would be partial or 0 and the statistics wrong or NaN. Called by `TrainConfig.validate`
    (before anything is loaded) and by the callback.
    """
    why = loss_token_weighted(loss, **loss_kwargs)
    if learned_mask:
        why.append("sparse mask='learned' weighs each token by a learned mask")
    if why:
        raise PreflensError(
            f"--step-entanglement with --loss {loss}: {'; '.join(why)}; its fused statistics divide each "
            "sequence's gradient by one weight dL/dlogp, exact only for losses of the summed log-probs "
            "(use --probe-every for this loss)"
        )


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
    """Adds probes to the preference trainer (`--probe-every K --probe-pairs P --step-entanglement`).

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
        # the trainable parameters one step before the next probe: that probe also predicts, to first
        # order, the change of the probed log-probs from the optimizer's real update (update_prediction)
        self._before: list[Tensor] | None = None
        self._forward: nn.Module | None = None

    # -- probes on a fixed set ----------------------------------------------------------------

    def on_train_begin(self, trainer: TrainerView) -> None:
        kind = str(getattr(trainer.accelerator, "distributed_type", ""))
        if "DEEPSPEED" in kind:  # FSDP: preflens shards with fully_shard itself (training/fsdp.py), exact
            raise PreflensError(
                "--probe-every/--step-entanglement read whole parameters and their gradients per module; "
                f"not supported with DeepSpeed ({kind}): use one process, DDP or FSDP2 (--fsdp)"
            )

        if self.step is not None:
            check_step_entanglement(
                trainer.config.loss,
                getattr(trainer, "loss_kwargs", None) or getattr(trainer.loss_fn, "hparams", {}),
                learned_mask=trainer.mask_head is not None,
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
        ref = torch.stack([trainer.reference.table[split][it.pair_id] for split, it in chosen_items])
        model = trainer.accelerator.unwrap_model(trainer.model)
        # FSDP2: update_prediction's forwards run through the sharded root's call (training/fsdp.py)
        self._forward = fsdp.ThroughRoot(model) if fsdp.is_sharded(model) else None
        ref_tokens = None
        if trainer.needs_tokens:
            if trainer.mask_head is not None:
                raise PreflensError(
                    "--probe-every with sparse mask='learned' is not supported: the probe has no mask head "
                    "(use mask='diff', or probe without the learned mask)"
                )
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
            fell_tol=trainer.fell_tol,
            log_sum_sq=bool(getattr(trainer, "needs_log_sum_sq", False)),
        )
        if trainer.state.step == 0:
            self._probe(trainer, 0, trainer.scheduler.get_last_lr()[0])
            self._snapshot(trainer, 0)
        else:
            self._restore(trainer.tracker.table("probes").rows)

    def _restore(self, rows: list[dict[str, Any]]) -> None:
        """On resume: the first and the latest probe of the run so far, from probes.parquet's rows.

        Without them `probe/frac_chosen_fell` would compare with the first probe *after* the resume
        (not with the start of training) and the first observed change would be missing. Left as is
        when the saved probes are of another probe set (e.g. --probe-pairs changed).
        """
        if self.runner is None:
            return
        history = ProbeHistory.from_rows(rows, list(zip(self.splits, self.runner.pair_ids)))
        if history is not None:
            self.runner.restore(history)

    def _snapshot(self, trainer: TrainerView, step: int) -> None:
        """Keep the trainable parameters when the next step is a probe step."""
        if self.runner is not None and (step + 1) % self.every == 0:
            self._before = [p.detach().clone() for p in trainable_params(self.runner.model)]

    def _update_columns(self, rows: list[dict[str, Any]]) -> None:
        """update_pred_* / update_obs_*: the optimizer's last step, predicted (<g_i, delta theta>) and observed."""
        n = len(rows)
        if self._before is None:
            for r in rows:
                r.update(update_pred_chosen=math.nan, update_pred_rejected=math.nan)
                r.update(update_obs_chosen=math.nan, update_obs_rejected=math.nan)
            return
        res = update_prediction(self.runner.model, self.runner.batch, self._before, forward=self._forward)  # type: ignore[union-attr]
        self._before = None
        for i, r in enumerate(rows):
            r["update_pred_chosen"], r["update_pred_rejected"] = (
                float(res["pred"][i]),
                float(res["pred"][n + i]),
            )
            r["update_obs_chosen"], r["update_obs_rejected"] = float(res["obs"][i]), float(res["obs"][n + i])

    def _probe(self, trainer: TrainerView, step: int, lr: float) -> None:
        rows, agg = self.runner.run(step, lr)  # type: ignore[union-attr]
        self._update_columns(rows)
        for r, split in zip(rows, self.splits):
            r["split"] = split
        trainer.tracker.table("probes").append(rows)
        trainer.tracker.log({"step": step, "split": "probe", **agg})

    def on_step_end(self, trainer: TrainerView, state: Any, batch_stats: dict[str, Any]) -> dict | None:
        if self.runner is not None and self.every > 0 and state.step % self.every == 0:
            self._probe(trainer, state.step, float(batch_stats["metrics"].get("lr", 1.0)))
        if self.every > 0:
            self._snapshot(trainer, state.step)
        return self.step.pop_metrics(trainer.accelerator.gather) if self.step is not None else None

    # -- statistics of the training step itself -------------------------------------------------

    def micro_batch_context(self, trainer: TrainerView, batch: dict[str, Any]) -> Any:
        if self.step is None:
            return None
        return self.step.capture(trainer.accelerator.unwrap_model(trainer.model), batch)

    def on_logps(
        self, trainer: TrainerView, batch: dict[str, Any], seq: Any, pair: Any, per_pair_loss: Any
    ) -> None:
        if self.step is not None:
            self.step.watch(seq.logps, pair)
