"""The preference-optimization trainer (`preflens train`), on accelerate.

What a step does, and why it is lean (DESIGN.md "Performance": at least as fast as TRL's DPOTrainer):
- the reference log-probs are computed *once*, before training (`reference.py`), cached per pair id and
  saved in the run directory; no second model is kept in memory;
- chosen and rejected rows go through the model in one forward (`preflens.logprobs.sequence_logps`: the
  unembedding only at response-predicting positions), each batch padded only to its own longest row;
- the loss is any entry of `preflens.losses.LOSSES`, a function of `PairLogps` only, so the margin weights
  d_w = -dl/d chosen, d_l = dl/d rejected (Yuan et al. 2024, arXiv 2410.13828, Sec. 3) come from autograd
  on [B]-sized tensors and are logged every step for every loss (`metrics.py`).

Multi-process (`accelerate launch` / `torchrun`): `batch_size` is the *global* number of pairs per
micro-batch; the prepared dataloader splits each global batch across the processes (`split_batches=True`),
so a run on N processes sees the same batches in the same order as a run on one, and DDP's gradient
average over equal shards equals the single-process mean. Per-pair statistics are gathered before they are
reduced to metrics; only the main process writes files. `distributed.py` says which module DDP wraps.

Exact resume: `checkpoints/step-N/` is an `accelerator.save_state` (weights or adapter, optimizer,
scheduler, RNG states, and `TrainerState`: step, epoch, position within the epoch, tokens). The batch order
is a pure function of (seed, epoch) (`sampler.py`); rows logged after the checkpoint are dropped from the
tables. Ctrl-C or SIGTERM inside a step rewinds it (`runtime.StepGuard`) and checkpoints the last one.

Callbacks (`callbacks.TrainerCallback`) read the trainer through `callbacks.TrainerView`, so the gradient
probes (`training.probes`) attach without the trainer knowing them.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from preflens.data.collate import PairCollator, PairDataset
from preflens.diagnostics.displacement import fell_tolerance
from preflens.errors import PreflensError, RunDirError, TrainingDivergedError
from preflens.grad import sequence_grad_norms
from preflens.logprobs import (
    PairLogps,
    SequenceLogps,
    pair_logps_from_batch,
    sequence_logps,
)
from preflens.losses import get_loss, loss_hparams, loss_needs_log_sum_sq, loss_needs_tokens
from preflens.tracking import (
    DATA_REPORT_FILE,
    RunTracker,
    checkpoint_dir,
    prune_checkpoints,
    save_checkpoint,
    write_config,
)
from preflens.training import checkpoint as ckpt
from preflens.training import fsdp
from preflens.training.attribution import AttributionCallback
from preflens.training.callbacks import TrainerCallback, TrainerState
from preflens.training.config import TrainConfig, resolve_loss_kwargs
from preflens.training.data_setup import read_pairs, tokenize_splits
from preflens.training.distributed import (
    all_reduce_mean_grads,
    grad_sync,
    is_ddp_like,
    is_distributed,
    lean_logps_module,
    through_forward,
)
from preflens.training.memory_plan import MemoryPlanCallback
from preflens.training.metrics import STAT_COLS, eval_columns, eval_line, pair_rows, pair_stats, run_metrics
from preflens.training.model_setup import build_model, is_peft
from preflens.training.optim import make_optimizer
from preflens.training.probes import ProbeCallback
from preflens.training.reference import evaluation_rows, load_or_compute_reference
from preflens.training.runtime import (
    StepGuard,
    init_trackers,
    make_accelerator,
    prepare_run_dir_on_all,
    seed_everything,
    sigterm_as_interrupt,
)
from preflens.training.sampler import PairBatchSampler
from preflens.training.scoring import PairScorer

__all__ = ["Trainer", "train"]


@dataclass
class Scored:
    """Per-pair statistics of a batch (local to this process)."""

    pair: PairLogps
    loss: torch.Tensor  # [B]
    seq: SequenceLogps


class Trainer:
    """One training run: `Trainer(config).train()` returns the run directory.

    `model`/`tokenizer` may be passed in (tests, notebooks); otherwise they are loaded from
    `config.model`. `callbacks` are `TrainerCallback`s.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: Any = None,
        tokenizer: Any = None,
        callbacks: Sequence[TrainerCallback] = (),
        log_fn: Any = None,
    ) -> None:
        config.validate()
        self.config = config
        self.loss_kwargs = resolve_loss_kwargs(config)
        self._model_in, self._tokenizer_in = model, tokenizer
        self.callbacks = list(callbacks)
        if config.probe_every or config.step_entanglement or config.attribute_every:  # issue 18: first
            self.callbacks.append(MemoryPlanCallback())
        if config.probe_every or config.step_entanglement:
            self.callbacks.append(ProbeCallback(config.probe_every, config.probe_pairs, config.step_entanglement))  # fmt: skip
        self.callbacks += [AttributionCallback.from_config(config)] if config.attribute_every else []
        self.state = TrainerState()
        self.run_dir = Path(str(config.output_dir))
        self._say = log_fn
        # Set by a callback that writes the parameter gradients itself (fused `--step-entanglement`):
        # autograd then skips them, so DDP's all-reduce hooks would never fire. The trainer keeps DDP
        # out of the step (no_sync) and all-reduces the gradients once after the last micro-batch.
        self.manual_grad_sync = False

    def say(self, msg: str) -> None:
        if self._say is not None:
            self._say(msg)
        elif self.accelerator.is_main_process:
            tqdm.write(msg)

    @property
    def needs_tokens(self) -> bool:
        # token-level losses, and TRL's ld_alpha / use_weighting on any loss (losses.loss_needs_tokens)
        return loss_needs_tokens(self.config.loss, **self.loss_kwargs)

    @property
    def needs_log_sum_sq(self) -> bool:
        # WPO's weight (TRL's use_weighting): log sum_v pi(v)^2 per token from the head (losses.trl_pair)
        return loss_needs_log_sum_sq(self.config.loss, **self.loss_kwargs)

    @property
    def needs_grad_norms(self) -> bool:
        return self.config.loss == "normalized"

    # -- set-up ---------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything before step 1: accelerator, run dir, data, model, optimizer, reference pass."""
        cfg = self.config
        self.accelerator = make_accelerator(
            self.run_dir, mixed_precision=cfg.mixed_precision, report_to=cfg.report_to, split_batches=True
        )
        prepare_run_dir_on_all(self.accelerator, self.run_dir, overwrite=cfg.overwrite, resume=cfg.resume)
        if cfg.resume:
            ckpt.check_data_order(self.run_dir, cfg)
        seed_everything(cfg.seed)
        self.loss_fn = get_loss(cfg.loss, **self.loss_kwargs)
        self._loss_defaults = loss_hparams(cfg.loss)
        raw = read_pairs(cfg, self.run_dir, self.say)  # a bad file fails before a large model is loaded
        parts = build_model(cfg, self.loss_kwargs, self._model_in, self._tokenizer_in)
        self.model, self.tokenizer, self.mask_head = parts.model, parts.tokenizer, parts.mask_head
        self.fsdp = fsdp.wants_fsdp(cfg, self.accelerator)
        if self.fsdp:  # FSDP2: sharded before the optimizer sees the parameters (training/fsdp.py)
            fsdp.shard_policy(self.model, self.mask_head, self.accelerator, cfg)
        data = tokenize_splits(cfg, raw, self.tokenizer, self.accelerator.num_processes)
        self.train_items, self.eval_items, self.train_subset = data.train_items, data.eval_items, data.train_subset  # fmt: skip
        self.data_reports = data.reports
        self.fell_tol = fell_tolerance(cfg.dtype, cfg.mixed_precision)
        loader, steps, warmup = self._make_optimization()
        self._prepare(loader)
        resolved = {**cfg.to_dict(), "loss_kwargs_resolved": {**self._loss_defaults, **self.loss_kwargs}}
        resolved.update(
            num_processes=self.accelerator.num_processes, steps_resolved=steps, warmup_steps_resolved=warmup
        )
        self._resume_or_record(resolved, steps)
        self.scorer = PairScorer(
            self.accelerator, self.model, self._forward_module, self.tokenizer.pad_token_id,
            cfg.eval_batch_size or cfg.batch_size, fresh_lora=parts.fresh_lora, want_tokens=self.needs_tokens,
            mask_head=self.mask_head, padding_free=cfg.padding_free, want_log_sum_sq=self.needs_log_sum_sq,
        )  # fmt: skip
        if cfg.padding_free:  # refuse to train packed unless packing is exact for this model
            self.say(self.scorer.verify_padding_free(self.train_items[:4]))
        self.reference = load_or_compute_reference(
            self.run_dir,
            self.train_items,
            self.eval_items,
            score=lambda items: self.scorer.score(items, reference=True),
            with_tokens=self.needs_tokens,
            can_recompute=not (cfg.resume and not parts.fresh_lora),
            is_main_process=self.accelerator.is_main_process,
            device=self.accelerator.device,
            say=self.say,
        )
        self._batches = self._micro_batches()

    def _make_optimization(self) -> tuple[DataLoader, int, int]:
        """The train loader, AdamW and the schedule; returns (loader, steps, warm-up steps)."""
        cfg = self.config
        dataset = PairDataset(self.train_items)
        self.sampler = PairBatchSampler(dataset.lengths, cfg.batch_size, cfg.seed, cfg.group_by_length)
        # Its own generator: a DataLoader draws a base seed from the global RNG each time an iterator is
        # made, which would shift dropout's random stream on resume.
        loader = DataLoader(
            dataset,
            batch_sampler=self.sampler,
            collate_fn=PairCollator(self.tokenizer.pad_token_id),
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        self.batches_per_epoch = len(self.sampler)
        steps = cfg.steps or max(1, math.ceil(cfg.epochs * self.batches_per_epoch / cfg.grad_accum))
        self.state.max_steps = steps
        self.optimizer = make_optimizer(self.model, self.mask_head, cfg, self.accelerator)
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * steps)
        self.scheduler = get_scheduler(
            cfg.scheduler, self.optimizer, num_warmup_steps=warmup, num_training_steps=steps
        )
        return loader, steps, warmup

    def _prepare(self, loader: DataLoader) -> None:
        """accelerate.prepare; under DDP it wraps `lean_logps_module(model)` (the lean forward survives)
        and `self.model` stays the bare model (probes, saving, no-grad passes); FSDP2: `fsdp.prepare_sharded`."""
        acc = self.accelerator
        self._ddp = None
        self._adapter_ckpt = is_peft(acc.unwrap_model(self.model))
        if self.fsdp:
            args = (self.model, self.optimizer, self.scheduler, loader, self._adapter_ckpt)
            self.train_loader = fsdp.prepare_sharded(acc, *args)
        else:
            lean = is_ddp_like(acc)
            first = lean_logps_module(self.model) if lean else self.model
            objs = [first] + ([self.mask_head] if self.mask_head is not None else [])
            prepared = acc.prepare(*objs, self.optimizer, loader, self.scheduler)
            if self.mask_head is not None:
                self.mask_head = prepared[1]
            self.optimizer, self.train_loader, self.scheduler = prepared[-3:]
            self._ddp, self.model = (prepared[0], self.model) if lean else (None, prepared[0])
            if self._adapter_ckpt:
                acc.register_save_state_pre_hook(ckpt.adapter_only_hook(acc, lambda: self.model))
        acc.register_for_checkpointing(self.state)
        self.guard = StepGuard([self.optimizer])
        self.tracker = RunTracker(self.run_dir, acc)

    def _resume_or_record(self, resolved: dict[str, Any], steps: int) -> None:
        """Load the latest checkpoint (--resume) or record the new run's config; start the trackers."""
        acc, cfg = self.accelerator, self.config
        self._last_saved = -1
        if cfg.resume:
            latest = ckpt.load_latest(acc, self.run_dir, adapter_only=self._adapter_ckpt, policy=self.model)
            if self.state.step > steps:
                raise RunDirError(f"{latest}: the run is at step {self.state.step}, beyond --steps {steps}")
            ckpt.lr_from_schedule(self.optimizer, self.scheduler, cfg.lr)
            self.tracker.resume_at(self.state.step)
            self._last_saved = self.state.step
            self.say(f"resumed from {latest} (step {self.state.step} of {steps})")
            if acc.is_main_process:  # the next plain --resume must read this length, not the first one
                write_config(self.run_dir, resolved)
        elif acc.is_main_process:
            write_config(self.run_dir, resolved)
            (self.run_dir / DATA_REPORT_FILE).write_text(json.dumps(self.data_reports, indent=2, default=str))
        resume_step = self.state.step if cfg.resume else None  # TensorBoard drops later events on resume
        init_trackers(acc, "preflens", resolved, self.run_dir, resume_step=resume_step)  # --report-to

    # -- the step -------------------------------------------------------------------------------

    def _forward_module(self) -> Any:
        """What `sequence_logps` runs: the bare model in one process (the lean path), else the wrapped
        model through its own forward (`distributed.through_forward`); FSDP2: the decoder through the root's
        call (`fsdp.ThroughRoot`)."""
        if getattr(self, "fsdp", False):
            return fsdp.ThroughRoot(self.model)
        if is_distributed(self.accelerator) and getattr(self, "_ddp", None) is None:
            return through_forward(self.model)
        return self.accelerator.unwrap_model(self.model)

    def forward_batch(self, batch: dict[str, Any], split: str = "train") -> Scored:
        """Policy log-probs of a batch (one forward over chosen+rejected), its PairLogps and per-pair loss."""
        ids, am, rm, pid = (batch[k] for k in ("input_ids", "attention_mask", "response_mask", "pair_index"))
        norms = None
        if self.needs_grad_norms:
            # Normalized PO (Yuan et al. 2024, arXiv 2410.13828, Sec. 5.1) divides by |grad log pi(y)| per
            # sequence: exact from one extra forward and an activation-only backward (preflens.grad).
            with self.accelerator.autocast():
                norms = sequence_grad_norms(self.accelerator.unwrap_model(self.model), ids, am, rm)
        kw = dict(return_tokens=self.needs_tokens, return_hidden=self.mask_head is not None)
        if self.needs_log_sum_sq:
            kw["return_log_sum_sq"] = True
        with self.accelerator.autocast():
            if self._ddp is not None:
                seq = self._ddp(ids, am, rm, padding_free=self.config.padding_free, **kw)
            else:
                seq = sequence_logps(
                    self._forward_module(), ids, am, rm, padding_free=self.config.padding_free, **kw
                )
        ref_tokens = None
        if self.needs_tokens:
            ref_tokens = self.reference.token_tensors(split, pid.tolist(), seq.token_logps.shape[1])
        pair = pair_logps_from_batch(seq, ref=self.reference.batch(split, pid), ref_tokens=ref_tokens)
        b = pid.shape[0]
        if norms is not None:
            pair.chosen_grad_norm, pair.rejected_grad_norm = norms[:b].float(), norms[b:].float()
        if self.mask_head is not None:
            logits = self.mask_head(seq.hidden).squeeze(-1).float()
            pair.chosen_mask_logits, pair.rejected_mask_logits = logits[:b], logits[b:]
        loss = self.loss_fn(pair)
        if loss.shape != pid.shape:
            raise PreflensError(f"loss '{self.config.loss}' returned shape {tuple(loss.shape)}, expected [B]")
        return Scored(pair=pair, loss=loss.to(torch.float32), seq=seq)

    def _micro_batch(self, batch: dict[str, Any], last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its gathered per-pair statistics."""
        acc = self.accelerator
        wrapped = self._ddp if self._ddp is not None else self.model
        sync = grad_sync(acc, wrapped, last and (self.fsdp or not self.manual_grad_sync), self.fsdp)
        with contextlib.ExitStack() as stack:
            stack.enter_context(sync)
            for cb in self.callbacks:
                c = cb.micro_batch_context(self, batch)
                if c is not None:
                    stack.enter_context(c)
            scored = self.forward_batch(batch, "train")
            for cb in self.callbacks:
                cb.on_logps(self, batch, scored.seq, scored.pair, scored.loss)
            acc.backward(scored.loss.mean() / self.config.grad_accum)
        tokens = batch["attention_mask"].sum(1)
        b = batch["pair_index"].shape[0]
        local = pair_stats(
            scored.pair,
            scored.loss,
            self.loss_fn,
            batch["pair_index"],
            tokens[:b] + tokens[b:],
            log_dpo=self.needs_grad_norms,
            loss_kwargs=self.loss_kwargs,
        )
        return acc.gather(local)

    def _train_step(self) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches; returns the step's gathered per-pair stats."""
        acc, cfg = self.accelerator, self.config
        # where this step starts: an interrupt before the update rewinds to it, so the checkpoint written
        # on Ctrl-C resumes exactly
        self.guard.begin((self.state.epoch, self.state.batch_in_epoch))
        self.model.train()
        parts = [
            self._micro_batch(next(self._batches), k == cfg.grad_accum - 1) for k in range(cfg.grad_accum)
        ]
        if self.manual_grad_sync and acc.num_processes > 1 and not self.fsdp:  # FSDP2: never fused
            all_reduce_mean_grads([p for p in self.model.parameters() if p.requires_grad])
        stats = torch.cat(parts).cpu()  # one device-to-host copy; metrics are computed on the host
        col = {name: stats[:, i] for i, name in enumerate(STAT_COLS)}
        if not torch.isfinite(col["loss"]).all():
            bad = col["pair_id"][~torch.isfinite(col["loss"])].long().tolist()
            self._diverged(
                f"the loss is {'NaN' if col['loss'].isnan().any() else 'inf'} on pair(s) {bad[:10]}"
            )
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.mask_head is not None:
            params += list(self.mask_head.parameters())
        clip = fsdp.clip_grad_norm if self.fsdp else acc.clip_grad_norm_
        grad_norm = clip(params, cfg.max_grad_norm if cfg.max_grad_norm else float("inf"))
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if not math.isfinite(grad_norm):
            self._diverged(f"the gradient norm is {grad_norm}")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()  # the guard's pre-hook marks the update as begun
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {"stats": col, "grad_norm": grad_norm, "lr": lr}
        # kept until the loop has written the step's row: an interrupt in between writes it instead
        self._last_step_out = out
        self.state.tokens += int(col["tokens"].sum())
        self.state.step += 1
        self.guard.end()
        return out

    def _log_now(self, step: int) -> bool:
        return step % self.config.log_every == 0 or step == self.state.max_steps

    def _beta(self) -> float:
        return float(self.loss_kwargs.get("beta", self._loss_defaults.get("beta", 1.0)))

    def _step_metrics(self, out: dict[str, Any]) -> dict[str, Any]:
        """The train row of a finished step (without callbacks' extra keys)."""
        state = self.state
        metrics = run_metrics(out["stats"], beta=self._beta(), fell_tol=self.fell_tol)
        epoch = (state.epoch * self.batches_per_epoch + state.batch_in_epoch) / self.batches_per_epoch
        metrics.update(lr=out["lr"], grad_norm=out["grad_norm"], epoch=epoch, tokens=state.tokens)
        return metrics

    def _on_interrupt(self, pending_row: dict[str, Any] | None) -> None:
        """Ctrl-C: keep what the completed steps produced and checkpoint them, unless the interrupt hit
        the parameter update itself (then the last checkpoint stays the one to resume)."""
        state = self.state
        if self.guard.updating:
            self.say("interrupted during the parameter update: resume from the last checkpoint")
            return
        if self.guard.phase == "forward":  # rewind the half-done step: data position, RNG, gradients
            state.epoch, state.batch_in_epoch = self.guard.rewind()
            self._batches = self._micro_batches()  # the iterator had moved on: rebuilt at the step's start
        out = getattr(self, "_last_step_out", None)
        if pending_row is None and out is not None and self._log_now(state.step):
            # the interrupt came between the step's update and its row (e.g. a signal): write it now
            pending_row = {"step": state.step, "split": "train", **self._step_metrics(out)}
        self._last_step_out = None
        if pending_row is not None:
            self.tracker.log(pending_row)
        if state.step > 0 and self._last_saved != state.step:
            path = self._save_checkpoint()
            self.say(f"interrupted: saved {path}; continue with --resume")

    def _diverged(self, what: str) -> None:
        """Stop on NaN/inf: no update is applied; the last good state is checkpointed and kept."""
        self.optimizer.zero_grad(set_to_none=True)
        step = self.state.step
        kept = ""
        if step > 0:
            path = self._save_checkpoint() if self._last_saved != step else checkpoint_dir(self.run_dir, step)
            kept = f"; the last good state (after step {step}) is in {path}"
        else:
            self.tracker.flush()
        raise TrainingDivergedError(
            f"training stopped at step {step + 1}: {what}{kept}. Lower --lr, check --beta and the data, then "
            "rerun (or --resume after changing them in config.yaml)."
        )

    # -- evaluation and checkpoints -------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Log-probs of the eval split and the fixed train subset: metrics row + pairs.parquet rows."""
        step = self.state.step
        splits = [(s, its) for s, its in (("eval", self.eval_items), ("train", self.train_subset)) if its]
        at_reference = step == 0 and self.scorer.eval_rows_match_reference  # a fresh run's step 0
        scored = evaluation_rows(lambda its: self.scorer.score(its, reference=False), splits, self.reference, at_reference)  # fmt: skip
        rows: list[dict[str, Any]] = []
        metrics: dict[str, Any] = {}
        for split, per_pair in scored.items():
            ref = self.reference.rows(split)
            rows += pair_rows(step, split, per_pair, ref)
            if split == "eval":
                kw = dict(needs_tokens=self.needs_tokens, needs_grad_norms=self.needs_grad_norms)
                cols = eval_columns(per_pair, ref, self.loss_fn, loss_kwargs=self.loss_kwargs, **kw)
                metrics = run_metrics(cols, beta=self._beta(), fell_tol=self.fell_tol)
                metrics["n_pairs"] = len(per_pair)
                self.tracker.log({"step": step, "split": "eval", **metrics})
                self.say(eval_line(step, metrics, [r for r in rows if r["split"] == "eval"]))
        self.tracker.table("pairs").append(rows)
        for cb in self.callbacks:
            cb.on_eval(self, self.state, metrics, rows)
        return metrics

    def _save_checkpoint(self) -> Path:
        acc = self.accelerator
        self.tracker.flush()  # the tables on disk match the checkpoint
        state = json.dumps(self.state.state_dict())
        path = save_checkpoint(
            acc,
            checkpoint_dir(self.run_dir, self.state.step),
            lambda d: (d / "trainer_state.json").write_text(state),
        )
        if acc.is_main_process:
            prune_checkpoints(self.run_dir, self.config.save_total_limit)
        acc.wait_for_everyone()
        self._last_saved = self.state.step
        for cb in self.callbacks:
            cb.on_save(self, self.state, path)
        return path

    # -- the loop -------------------------------------------------------------------------------

    def _micro_batches(self) -> Iterator[dict[str, Any]]:
        """Endless micro-batches across epochs, tracking the data position in `self.state`."""
        while True:
            self.sampler.skip = self.state.batch_in_epoch
            self.train_loader.set_epoch(self.state.epoch)
            for batch in self.train_loader:
                self.state.batch_in_epoch += 1
                yield batch
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def _after_step(self, out: dict[str, Any], bar: Any) -> None:
        """Log the finished step (`self._pending` holds its row until written), evaluate and checkpoint when due."""
        cfg, state = self.config, self.state
        metrics = self._step_metrics(out)
        log_now = self._log_now(state.step)
        self._pending = {"step": state.step, "split": "train", **metrics} if log_now else None
        self._last_step_out = None  # from here on `_pending` holds the step's row
        for cb in self.callbacks:
            extra = cb.on_step_end(self, state, {"per_pair": out["stats"], "metrics": metrics})
            if extra:
                metrics.update(extra)
        if log_now:
            self.tracker.log({"step": state.step, "split": "train", **metrics})
            self._pending = None
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", margin=f"{metrics['rewards/margins']:.3f}",
                        acc=f"{metrics['rewards/accuracies']:.2f}", refresh=False)  # fmt: skip
        done = state.step == state.max_steps or state.should_stop
        if (cfg.eval_every and state.step % cfg.eval_every == 0) or done:
            self.evaluate()
        if (cfg.save_every and state.step % cfg.save_every == 0) or done:
            self._save_checkpoint()

    def train(self) -> Path:
        """Run set-up, the loop and the final save; returns the run directory."""
        self.setup()
        cfg, acc, state = self.config, self.accelerator, self.state
        for cb in self.callbacks:
            cb.on_train_begin(self)
        bar = tqdm(
            total=state.max_steps,
            initial=state.step,
            desc=f"{cfg.loss}",
            disable=not (cfg.progress and acc.is_main_process),
            dynamic_ncols=True,
        )
        self._pending: dict[str, Any] | None = None
        # SIGTERM takes Ctrl-C's path, and stays caught while the interrupt's checkpoint is written
        with sigterm_as_interrupt():
            try:
                if state.step == 0:
                    self.evaluate()
                while state.step < state.max_steps and not state.should_stop:
                    self._pending = None
                    self._after_step(self._train_step(), bar)
                if state.step == state.max_steps and self._last_saved != state.step:
                    self._save_checkpoint()
            except KeyboardInterrupt:
                self._on_interrupt(self._pending)
                raise
            finally:
                bar.close()
                self.tracker.flush()
        save_final = fsdp.save_full if self.fsdp else ckpt.save_final
        save_final(acc, self.model, self.tokenizer, self.mask_head, self.run_dir)
        for cb in self.callbacks:
            cb.on_train_end(self, state)
        self.tracker.close()
        return self.run_dir


def train(
    config: TrainConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> Path:
    """Train per `config`; returns the run directory (ARCHITECTURE.md says what it holds)."""
    return Trainer(config, model=model, tokenizer=tokenizer, callbacks=callbacks).train()
