"""In-run attribution inside `preflens train` (`--attribute-every K --attribute-pairs P`): at every K-th
step, the first-order effect of each training pair of the step's batch on each probe pair's chosen and
rejected log-probs (`preflens.diagnostics.attribution`), from the step's own backward plus one
activation-only pass over the probe set (`preflens.grad.cross`).

Files (names in `diagnostics.attribution`): `attribution.parquet` (step, pair_id, probe_pair_id,
probe_split, sgd_chosen, sgd_rejected, and with `--attribute-optimizer adam` adam_chosen, adam_rejected)
and `attribution_pairs.parquet` (per train pair: total_chosen, total_rejected, seen, mean_chosen), rewritten
at every checkpoint and at the end. Metrics rows get `attribution/...` keys.

The probe set is chosen as `--probe-pairs` chooses its own: the first P eval pairs by pair id, filled up
from the first train pairs. The callback reads the trainer only through `callbacks.TrainerView`.

Distributed: under DDP and FSDP2 alike each rank attributes its own pairs of the global batch; the products
need only each module's inputs and output-gradients of those rows (FSDP2 shards neither: the capture reads
them while the layer is gathered, and the probe pass runs on the sharded root as `sequence_gram` does), the
rows are gathered to every rank and the main process writes them, and each rank's share counts 1/N (both
average the ranks' gradients). What reads whole parameters is the Adam form's denominator, sharded under
FSDP2: `preconditioned_crosses` gathers it one parameter at a time (tests/test_attribution_fsdp.py).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from preflens.data.collate import collate_pairs
from preflens.diagnostics.attribution import (
    ATTRIBUTION_FILE,
    ATTRIBUTION_PAIRS_FILE,
    adam_denominators,
    adam_scale,
    clip_coefficient,
    pair_effects,
    summarize_rows,
)
from preflens.errors import PreflensError
from preflens.grad.cross import CrossCapture, ProbeParts, probe_parts
from preflens.training.callbacks import TrainerCallback, TrainerView

__all__ = ["AttributionCallback", "TABLE"]

TABLE = ATTRIBUTION_FILE.removesuffix(".parquet")  # the tracker's table name


def probe_items(trainer: TrainerView, pairs: int) -> list[tuple[str, Any]]:
    """(split, TokenizedPair): the first `pairs` eval pairs by id, filled up with the first train pairs."""
    chosen = [("eval", it) for it in sorted(trainer.eval_items, key=lambda it: it.pair_id)[:pairs]]
    more = pairs - len(chosen)
    chosen += [("train", it) for it in sorted(trainer.train_items, key=lambda it: it.pair_id)[:more]]
    return chosen


def preconditioned_crosses(caps: list[CrossCapture], denoms: dict[str, Tensor] | None) -> list[Tensor] | None:
    """<G_s, G_j / D_t> of each micro-batch's capture, one parameter at a time (None without Adam state;
    `denoms` by parameter name, in the model's parameter order).

    Under FSDP2 Adam's state is sharded like the parameters (a DTensor per parameter, dim 0 split over
    the ranks) while each rank holds the activations of its own sequences only, so the rank's rows need
    the whole D of each parameter: it is gathered (`full_tensor`, a collective every rank runs in the
    same parameter order, whatever its captures kept), used for every micro-batch, and freed before the
    next, so the extra memory is one parameter in float32, as FSDP's own unshard of a layer."""
    if denoms is None:
        return None
    out = [torch.zeros_like(cap.cross) for cap in caps]
    for name, d in denoms.items():  # the model's parameter order: the same on every rank
        full = d.full_tensor() if isinstance(d, DTensor) else d
        for k, cap in enumerate(caps):
            out[k] += cap.preconditioned_param(name, full)
        del full
    return out


class AttributionCallback(TrainerCallback):
    """Attribute each K-th step's update to its training pairs, measured on a fixed probe set."""

    def __init__(self, every: int, pairs: int, optimizer_form: str = "sgd") -> None:
        if optimizer_form not in ("sgd", "adam"):
            raise PreflensError(f"--attribute-optimizer must be sgd or adam, got {optimizer_form!r}")
        self.every, self.pairs, self.form = int(every), int(pairs), optimizer_form
        self.batch: dict[str, Tensor] | None = None
        self.keys: list[tuple[str, int]] = []
        self._probe: ProbeParts | None = None
        self._probe_step = -1
        self._caps: list[tuple[Tensor, CrossCapture]] = []
        self._cap: CrossCapture | None = None
        self._checked = False

    @classmethod
    def from_config(cls, config: Any) -> AttributionCallback:
        """From `--attribute-every`, `--attribute-pairs`, `--attribute-optimizer` (a `TrainConfig`)."""
        return cls(config.attribute_every, config.attribute_pairs, config.attribute_optimizer)

    def on_train_begin(self, trainer: TrainerView) -> None:
        kind = str(getattr(trainer.accelerator, "distributed_type", ""))
        if "DEEPSPEED" in kind:
            raise PreflensError(f"--attribute-every is not supported with {kind}: use DDP or --fsdp")
        if self.pairs < 1:
            raise PreflensError(f"--attribute-every needs --attribute-pairs >= 1, got {self.pairs}")
        if trainer.config.padding_free:
            raise PreflensError("--attribute-every reads the padded layout; drop --padding-free")
        chosen = probe_items(trainer, self.pairs)
        self.keys = [(split, it.pair_id) for split, it in chosen]
        batch = collate_pairs([it for _, it in chosen], trainer.tokenizer.pad_token_id)
        dev = trainer.accelerator.device
        self.batch = {k: v.to(dev) for k, v in batch.items() if isinstance(v, Tensor)}
        table = trainer.tracker.table(TABLE)
        if trainer.state.step > 0:
            table.load(up_to_step=trainer.state.step)  # rows after the checkpoint are dropped

    def _due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def micro_batch_context(self, trainer: TrainerView, batch: dict[str, Any]) -> Any:
        step = trainer.state.step + 1  # the step this micro-batch belongs to
        if not self._due(step) or self.batch is None:
            return None
        model = trainer.accelerator.unwrap_model(trainer.model)
        if self._probe_step != step:  # once per step, at the step's weights (before its update)
            was_training = model.training
            model.eval()
            try:
                with trainer.accelerator.autocast():
                    self._probe = probe_parts(
                        model,
                        self.batch["input_ids"],
                        self.batch["attention_mask"],
                        self.batch["response_mask"],
                    )
            finally:
                model.train(was_training)
            self._probe_step = step
        cap = CrossCapture(
            model,
            batch["attention_mask"],
            batch["response_mask"],
            self._probe,  # type: ignore[arg-type]
            keep=self.form == "adam",
            check_graph=not self._checked,
            with_gram=True,  # the pairs' entanglement cosine (Yuan et al. 2024, arXiv 2410.13828, Sec. 3)
        )
        self._cap = cap
        outer = self

        class _Ctx:
            def __enter__(self) -> None:
                cap.__enter__()

            def __exit__(self, *exc: Any) -> None:
                cap.__exit__(*exc)
                if exc[0] is None and cap.watched:
                    cap.result()
                    outer._caps.append((batch["pair_index"], cap))
                outer._cap = None

        return _Ctx()

    def on_logps(self, trainer: TrainerView, batch: dict[str, Any], seq: Any, pair: Any, loss: Any) -> None:
        if self._cap is not None:
            self._cap.watch(seq.logps)
            self._checked = True

    def on_step_end(self, trainer: TrainerView, state: Any, batch_stats: dict[str, Any]) -> dict | None:
        if not self._caps:
            return None
        caps, self._caps, self._probe = self._caps, [], None
        m = batch_stats["metrics"]
        acc = trainer.accelerator
        kappa = clip_coefficient(float(m.get("grad_norm", float("nan"))), trainer.config.max_grad_norm)
        # DDP averages the processes' gradients: each process's loss share counts 1/N in the update
        sgd = -float(m["lr"]) * kappa / acc.num_processes
        pre: list[Tensor] | None = None
        if self.form == "adam":
            named = [(n, p) for n, p in acc.unwrap_model(trainer.model).named_parameters() if p.requires_grad]
            by_id = adam_denominators(trainer.optimizer, [p for _, p in named])
            denoms = {n: by_id[id(p)] for n, p in named} if by_id is not None else None
            pre = preconditioned_crosses([cap for _, cap in caps], denoms)
        rows: list[dict[str, Any]] = []
        for k, (pid, cap) in enumerate(caps):
            eff = pair_effects(cap.cross, sgd)
            parts = [eff]
            if pre is not None:
                scale = adam_scale(trainer.optimizer, float(m["lr"]), kappa) / acc.num_processes
                parts.append(pair_effects(pre[k], scale))
            cos = cap.logp_cosines().to(eff.device, eff.dtype)[:, None, None].expand(-1, eff.shape[1], 1)
            local = torch.cat(parts + [cos], -1).float()  # [B_local, P, 3 or 5]: effects, cosine
            table = acc.gather(local).cpu()
            ids = acc.gather(pid.to(local.device)).cpu().tolist()
            rows += self._rows(state.step, ids, table)
            cap.kept.clear()
        trainer.tracker.table(TABLE).append(rows)
        per_probe = torch.tensor([[r["sgd_chosen"] for r in rows]]).reshape(-1, len(self.keys))
        total = per_probe.sum(0)  # [P]: the batch's predicted change of each probe's chosen
        return {
            "attribution/pred_chosen_mean": float(total.mean()),
            "attribution/frac_probe_chosen_pushed_down": float((total < 0).float().mean()),
            "attribution/frac_pairs_pushing_down": float((per_probe.sum(1) < 0).float().mean()),
        }

    def _rows(self, step: int, ids: list[int], table: Tensor) -> list[dict[str, Any]]:
        rows = []
        for i, pair_id in enumerate(ids):
            for j, (split, probe_id) in enumerate(self.keys):
                r = {
                    "step": step,
                    "pair_id": int(pair_id),
                    "probe_pair_id": int(probe_id),
                    "probe_split": split,
                    "sgd_chosen": float(table[i, j, 0]),
                    "sgd_rejected": float(table[i, j, 1]),
                    "cosine": float(table[i, j, -1]),
                }
                if table.shape[-1] == 5:
                    r["adam_chosen"], r["adam_rejected"] = float(table[i, j, 2]), float(table[i, j, 3])
                rows.append(r)
        return rows

    def _write_summary(self, trainer: TrainerView) -> None:
        if not trainer.accelerator.is_main_process:
            return
        import pandas as pd

        rows = trainer.tracker.table(TABLE).rows
        path = trainer.tracker.run_dir / ATTRIBUTION_PAIRS_FILE
        tmp = path.with_suffix(".parquet.tmp")
        pd.DataFrame(summarize_rows(rows)).to_parquet(tmp, index=False)
        os.replace(tmp, path)

    def on_save(self, trainer: TrainerView, state: Any, path: Any) -> None:
        self._write_summary(trainer)

    def on_train_end(self, trainer: TrainerView, state: Any) -> None:
        self._write_summary(trainer)
