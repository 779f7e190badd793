"""preflens diagnostics inside a TRL `DPOTrainer` run: a `TrainerCallback`.

For a user who already trains with TRL (DESIGN.md: "users come from TRL/OpenRLHF") and wants to
see *why* the run goes wrong without switching trainers:

    trainer = DPOTrainer(model=..., args=DPOConfig(output_dir="out", ...), train_dataset=..., ...)
    trainer.add_callback(PreflensCallback(trainer, probe_pairs=16, probe_every=10))
    trainer.train()
    # then: preflens report out

What it writes into `args.output_dir` (ARCHITECTURE.md's run-directory format, so `preflens report`
reads it like a `preflens train` run):

- `metrics.jsonl`: TRL's own logs (loss, logps/chosen, rewards/margins, ...; `eval_*` keys become
  split "eval" rows, `learning_rate` becomes `lr`) and one "probe" row per probe;
- `pairs.parquet`: per-pair chosen/rejected summed log-probs of a *fixed* probe set (the first
  `probe_pairs` rows of the eval dataset, else of the train dataset) at step 0 and every
  `probe_every` steps, with the reference log-probs: likelihood displacement per pair (Razin et al.
  2024, arXiv 2410.08847);
- `probes.parquet`: per probed pair and step, the gradient-entanglement statistics of Yuan et al.
  2024 (arXiv 2410.13828, Sec. 3): <g_w, g_l>, |g_w|, |g_l|, cosine, the loss's margin weights
  d_w = -dl/d chosen and d_l = dl/d rejected, the first-order predicted changes
  eta (d_w |g_w|^2 - d_l <g_w,g_l>) and eta (d_w <g_w,g_l> - d_l |g_l|^2), which of condition 1
  (chosen rises) and condition 2 (rejected falls) they violate, and the changes observed at the next
  probe, so the prediction can be checked.

Under FSDP2 (accelerate's `fully_shard` of the policy and of TRL's reference copy) the probes are the same
numbers as in one process: the Gram pass reads each layer's inputs and output-gradients while FSDP has it
gathered (`preflens.grad.capture`), the log-prob forwards run through the sharded root
(`training.fsdp.ThroughRoot`), and every rank probes the same set. Tested on CPU processes with a model
sharded by `fully_shard` and the callback's events driven by hand (tests/test_fsdp.py): accelerate's FSDP
plugin does not shard on CPU processes, so TRL's DPOTrainer itself cannot run FSDP2 here (README, "70B
with FSDP").

The measurement is `preflens.diagnostics.probe_state.ProbeRunner`, the same one `preflens train --probe-every` uses
(one `sequence_gram` forward + activation-only backward over the probe set, eval mode, the model's
gradients and mode untouched), so the columns and their meaning are identical in both kinds of run:
a row at step s holds the change observed since the previous probe (`obs_delta_*`) beside what that
probe predicted for it (`pred_at_prev_*`). Only the main process writes files; every process
computes (the probe set is the same on all of them), so distributed runs stay in lock-step.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from preflens.diagnostics.displacement import fell_tolerance
from preflens.diagnostics.probe_state import ProbeHistory, ProbeRunner
from preflens.errors import PreflensError
from preflens.logprobs import sequence_logps
from preflens.losses import get_loss
from preflens.losses.trl_pair import TRL_TO_PREFLENS, loss_from_trl_args
from preflens.tracking import METRICS_FILE, PAIRS_FILE, PROBES_FILE
from preflens.training import fsdp

__all__ = ["PreflensCallback", "TRL_TO_PREFLENS_LOSS"]

# TRL `loss_type` -> preflens loss used for the margin weights d_w, d_l: every TRL loss type (its own
# name; sigmoid -> dpo and sppo_hard -> sppo, the same functions), preflens.losses.trl_pair.
TRL_TO_PREFLENS_LOSS: dict[str, str] = dict(TRL_TO_PREFLENS)


class PreflensCallback(TrainerCallback):
    """Adds preflens probes to a TRL `DPOTrainer` and writes a preflens run directory.

    Args:
        trainer: the `DPOTrainer` (its tokenized datasets, reference model and config are read).
        probe_pairs: how many pairs make the fixed probe set.
        probe_every: probe every this many optimizer steps (default: the trainer's `logging_steps`).
        entanglement: also compute the per-pair gradient statistics (costs a backward over the
            probe set; switch off for a log-prob-only probe).
        output_dir: where to write (default: the trainer's `args.output_dir`).
        loss: the preflens loss whose margin weights d_w, d_l are used; default: TRL's own `loss_type`
            (any of them, or its weighted list) with TRL's `beta`, `label_smoothing`, `loss_weights`,
            `f_divergence_type` (`loss_from_trl_args`; `ld_alpha` and WPO weighting are left out, the probes
            see summed log-probs).
    """

    def __init__(
        self,
        trainer: Any,
        *,
        probe_pairs: int = 16,
        probe_every: int | None = None,
        entanglement: bool = True,
        output_dir: str | Path | None = None,
        loss: str | None = None,
    ) -> None:
        self.trainer = trainer
        self.args = trainer.args
        self.out = Path(output_dir if output_dir is not None else self.args.output_dir)
        self.probe_every = int(probe_every or max(1, int(self.args.logging_steps)))
        self.entanglement = entanglement
        if loss is None:  # TRL's own loss (every loss_type, a weighted list, the f-divergence), TRL's numbers
            loss, hp = loss_from_trl_args(self.args, token_options=False)  # probes see summed log-probs
        else:
            hp = {"beta": float(self.args.beta)} if loss in ("dpo", "ipo", "sppo") else {}
        self.loss_name = loss
        self.loss_fn = get_loss(loss, **hp)
        dataset, self.probe_split = (
            (trainer.eval_dataset, "eval")
            if _has_rows(trainer.eval_dataset)
            else (trainer.train_dataset, "train")
        )
        if isinstance(dataset, dict):  # several eval datasets: probe the first
            dataset = next(iter(dataset.values()))
        self.batch, self.pair_ids = self._probe_batch(dataset, probe_pairs)
        self.ref: tuple[Tensor, Tensor] | None = None
        self.runner: Any = None
        self.start: Tensor | None = None
        self.last_step: int | None = None
        self.probe_rows: list[dict[str, Any]] = []
        self.pair_rows: list[dict[str, Any]] = []
        self._restored: ProbeHistory | None = None

    # -- set-up ----------------------------------------------------------------------------------

    def _probe_batch(self, dataset: Any, n: int) -> tuple[dict[str, Tensor], list[int]]:
        """ARCHITECTURE.md's batch layout from TRL's tokenized rows (prompt_ids, chosen_ids, rejected_ids)."""
        if dataset is None or len(dataset) == 0:
            raise PreflensError("PreflensCallback: the trainer has no train or eval dataset to probe")
        cols = getattr(dataset, "column_names", None) or list(dataset[0].keys())
        need = ("prompt_ids", "chosen_ids", "rejected_ids")
        if any(c not in cols for c in need):
            raise PreflensError(
                f"PreflensCallback: the trainer's dataset has columns {cols}; expected TRL's tokenized "
                f"{list(need)} (create the callback after DPOTrainer(...) has prepared its datasets)"
            )
        n = min(n, len(dataset))
        rows = [dataset[i] for i in range(n)]
        seqs, masks = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for r in rows:
                p, c = list(r["prompt_ids"]), list(r[key])
                seqs.append(p + c)
                masks.append([False] * len(p) + [True] * len(c))
        tok = self.trainer.processing_class
        tok = getattr(tok, "tokenizer", tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        att = torch.zeros(len(seqs), width, dtype=torch.long)
        resp = torch.zeros(len(seqs), width, dtype=torch.bool)
        for i, (s, m) in enumerate(zip(seqs, masks)):
            ids[i, : len(s)] = torch.tensor(s)
            att[i, : len(s)] = 1
            resp[i, : len(m)] = torch.tensor(m)
        resp[:, 0] = False  # position 0 predicts nothing
        pair_index = torch.arange(n, dtype=torch.long)
        return {
            "input_ids": ids,
            "attention_mask": att,
            "response_mask": resp,
            "pair_index": pair_index,
        }, list(range(n))

    def _logps(self, model: nn.Module) -> Tensor:
        dev = next(model.parameters()).device
        b = {k: v.to(dev) for k, v in self.batch.items()}
        # FSDP2 (accelerate's fully_shard of the policy and of TRL's reference copy): the forward runs
        # through the sharded root's call so FSDP gathers the root's parameters; the gathered copies are
        # dropped afterwards, so none outlives the optimizer's next write of the shards
        sharded = fsdp.is_sharded(model)
        fwd = fsdp.ThroughRoot(model) if sharded else model
        try:
            with torch.no_grad():
                return (
                    sequence_logps(fwd, b["input_ids"], b["attention_mask"], b["response_mask"])
                    .logps.float()
                    .cpu()
                )
        finally:
            if sharded:
                fsdp.reshard_all(model)

    # -- events ----------------------------------------------------------------------------------

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any
    ) -> None:
        model = model if model is not None else self.trainer.model
        resumed = int(state.global_step) > 0
        # the threshold preflens's own trainer uses for "chosen fell" in this precision
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        mixed = "bf16" if (getattr(args, "bf16", False) or getattr(args, "fp16", False)) else "no"
        self.fell_tol = fell_tolerance(dtype, mixed)
        if state.is_world_process_zero:
            self.out.mkdir(parents=True, exist_ok=True)
        # a second train() of the same trainer starts its tables afresh (the reference, if measured, stays:
        # TRL's reference model does not change between the calls)
        self.pair_rows, self.probe_rows = [], []
        self.last_step, self.start, self.runner, self._restored = None, None, None, None
        if resumed:
            self._resume_files(int(state.global_step), main=state.is_world_process_zero)
        elif state.is_world_process_zero:
            # TRL reuses output_dir: a new run's rows must not be appended to an earlier run's
            for name in (METRICS_FILE, PAIRS_FILE, PROBES_FILE):
                (self.out / name).unlink(missing_ok=True)
        if self.ref is None:
            lp = self._reference_logps(model)
            b = len(self.pair_ids)
            self.ref = (lp[:b], lp[b:])
        if state.is_world_process_zero:
            (self.out / "preflens_probe.json").write_text(
                json.dumps(
                    {
                        "source": "trl",
                        "loss": self.loss_name,
                        "probe_split": self.probe_split,
                        "probe_pairs": len(self.pair_ids),
                        "probe_every": self.probe_every,
                    },
                    indent=1,
                )
            )
        if resumed and self.last_step == int(state.global_step):
            return  # this step was probed before the checkpoint was written
        self._probe(model, state, lr=_current_lr(kw.get("lr_scheduler"), args))

    def _reference_logps(self, model: nn.Module) -> Tensor:
        """The probe set's reference log-probs [2B], from the model TRL uses as the reference.

        A separate `ref_model`; else (PEFT) the policy with the adapters switched off, or TRL's "ref"
        copy of a pre-trained adapter; else (`precompute_ref_log_probs`) the policy itself, which is
        the reference only at step 0 (a resumed run takes the reference from pairs.parquet instead).
        """
        ref_model = getattr(self.trainer, "ref_model", None)
        with _eval_mode(model):
            if ref_model is not None:
                with _eval_mode(ref_model):
                    return self._logps(ref_model)
            unwrapped = self.trainer.accelerator.unwrap_model(model)
            if hasattr(unwrapped, "peft_config"):
                from trl.trainer.utils import use_adapter

                name = "ref" if "ref" in unwrapped.peft_config else None
                with use_adapter(unwrapped, adapter_name=name):
                    return self._logps(model)
            return self._logps(model)

    def _resume_files(self, step: int, *, main: bool) -> None:
        """`train(resume_from_checkpoint=...)`: keep what the run wrote up to the checkpoint's step.

        Rows logged after the checkpoint are dropped (they are logged again); the probe tables are read
        back, so pairs.parquet keeps the earlier probes, the reference is the one of step 0 (the resumed
        policy is not the reference) and the first observed change compares with the last probe.
        """
        metrics = self.out / METRICS_FILE
        if metrics.is_file() and main:
            kept = [
                line
                for line in metrics.read_text().splitlines()
                if line.strip() and int(json.loads(line).get("step", 0)) <= step
            ]
            metrics.write_text("".join(line + "\n" for line in kept))
        pairs_file, probes_file = self.out / PAIRS_FILE, self.out / PROBES_FILE
        if not pairs_file.is_file():
            return
        pairs = pd.read_parquet(pairs_file)
        pairs = pairs[pairs["step"] <= step]
        if pairs.empty or not set(self.pair_ids) <= set(pairs["pair_id"]):
            return  # another probe set (e.g. probe_pairs changed): start the tables afresh
        self.pair_rows = pairs.to_dict("records")
        self.last_step = int(pairs["step"].max())
        first = pairs[pairs["step"] == pairs["step"].min()].set_index("pair_id").loc[self.pair_ids]
        self.ref = (
            torch.tensor(first["ref_chosen"].to_numpy(), dtype=torch.float32),
            torch.tensor(first["ref_rejected"].to_numpy(), dtype=torch.float32),
        )
        self.start = torch.tensor(first["chosen"].to_numpy(), dtype=torch.float32)
        if not (self.entanglement and probes_file.is_file()):
            return
        probes = pd.read_parquet(probes_file)
        probes = probes[probes["step"] <= step]
        if probes.empty:
            return
        self.probe_rows = probes.to_dict("records")
        self._restored = ProbeHistory.from_rows(
            self.probe_rows, [(self.probe_split, pid) for pid in self.pair_ids]
        )

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any
    ) -> None:
        if state.global_step % self.probe_every == 0:
            self._probe(
                model if model is not None else self.trainer.model,
                state,
                lr=_current_lr(kw.get("lr_scheduler"), args),
            )

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        if any(k.startswith("train_") and k.endswith("runtime") for k in logs):
            return  # the end-of-training summary, not a step's metrics
        train: dict[str, Any] = {}
        ev: dict[str, Any] = {}
        for k, v in logs.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if k.startswith("eval_"):
                if k.endswith(("_runtime", "_samples_per_second", "_steps_per_second")):
                    continue
                ev[k[len("eval_") :]] = float(v)
            else:
                train["lr" if k == "learning_rate" else k] = float(v)
        if ev and set(train) <= {"epoch"}:  # TRL's eval logs carry the epoch: part of the eval row
            ev.update(train)
            train = {}
        if train:
            self._write_metrics({"step": int(state.global_step), "split": "train", **train})
        if ev:
            self._write_metrics({"step": int(state.global_step), "split": "eval", **ev})

    def on_train_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any
    ) -> None:
        if self.last_step != state.global_step:
            self._probe(
                model if model is not None else self.trainer.model,
                state,
                lr=_current_lr(kw.get("lr_scheduler"), args),
            )

    # -- the probe -------------------------------------------------------------------------------

    def _probe(self, model: nn.Module, state: Any, lr: float) -> None:
        assert self.ref is not None
        step = int(state.global_step)
        if self.entanglement:
            rows, agg = self._entanglement_probe(model, step, lr)
            chosen = [float(r["chosen"]) for r in rows]
            rejected = [float(r["rejected"]) for r in rows]
            for r in rows:
                r["split"] = self.probe_split
            self.probe_rows.extend(rows)
        else:  # log-prob probe only (no backward): displacement, not entanglement
            with _eval_mode(model):
                lp = self._logps(model)
            b = len(self.pair_ids)
            chosen, rejected = lp[:b].tolist(), lp[b:].tolist()
            if self.start is None:
                self.start = lp[:b]
            agg = {
                "probe/frac_chosen_fell": float((lp[:b] < self.start - self.fell_tol).double().mean()),
                "probe/logps_chosen": float(lp[:b].mean()),
                "probe/logps_rejected": float(lp[b:].mean()),
            }
        for i, pid in enumerate(self.pair_ids):
            self.pair_rows.append(
                {
                    "step": step,
                    "split": self.probe_split,
                    "pair_id": pid,
                    "chosen": chosen[i],
                    "rejected": rejected[i],
                    "ref_chosen": float(self.ref[0][i]),
                    "ref_rejected": float(self.ref[1][i]),
                }
            )
        self.last_step = step
        if state.is_world_process_zero:
            self._write_metrics({"step": step, "split": "probe", **agg})
            self._write_parquets()

    def _entanglement_probe(self, model: nn.Module, step: int, lr: float) -> tuple[list[dict], dict]:
        if self.runner is None or self.runner.model is not model:
            # (re)built when the trainer hands a different model object (e.g. after wrapping);
            # the first and previous measurements carry over so observed changes stay continuous
            dev = next(model.parameters()).device
            batch = {k: v.to(dev) for k, v in self.batch.items()}
            ref = (self.ref[0].to(dev), self.ref[1].to(dev)) if self.ref is not None else None
            old = self.runner
            self.runner = ProbeRunner(model, batch, self.loss_fn, ref=ref, fell_tol=self.fell_tol)
            if old is not None:
                self.runner.first, self.runner.prev = old.first, old.prev
            elif self._restored is not None:  # a resumed run: the probes written before the checkpoint
                self.runner.restore(self._restored)
        with _keep_grads(model):
            return self.runner.run(step, lr=lr)

    # -- files -----------------------------------------------------------------------------------

    def _write_metrics(self, row: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with (self.out / METRICS_FILE).open("a") as f:
            f.write(json.dumps(row) + "\n")

    def _write_parquets(self) -> None:
        # small tables, rewritten whole at each probe so a crashed run still has its last probe
        pd.DataFrame(self.pair_rows).to_parquet(self.out / PAIRS_FILE, index=False)
        if self.probe_rows:
            pd.DataFrame(self.probe_rows).to_parquet(self.out / PROBES_FILE, index=False)


def _has_rows(ds: Any) -> bool:
    if ds is None:
        return False
    if isinstance(ds, dict):
        return any(_has_rows(v) for v in ds.values())
    try:
        return len(ds) > 0
    except TypeError:
        return False


def _current_lr(scheduler: Any, args: Any) -> float:
    if scheduler is not None:
        try:
            return float(scheduler.get_last_lr()[0])
        except Exception:
            pass
    return float(getattr(args, "learning_rate", 1.0))


class _eval_mode:
    """Eval mode (no dropout) for the probe, restoring the previous mode."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was)


class _keep_grads:
    """Save and restore `.grad` of the trainable parameters around the probe's backward, so a probe
    between accumulation steps leaves the trainer's gradients untouched."""

    def __init__(self, model: nn.Module) -> None:
        self.params: Sequence[nn.Parameter] = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self) -> None:
        self.saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None

    def __exit__(self, *exc: object) -> None:
        for p, g in zip(self.params, self.saved):
            p.grad = g
