"""The preference-optimization trainer (`preflens train`), on accelerate.

What a step does, and why it is lean (DESIGN.md "Performance": at least as fast as TRL's DPOTrainer):
- the reference log-probs are computed *once*, before training, in one no-grad pass over the train
  and eval pairs (eval mode; with LoRA the adapters are switched off by `model.disable_adapter()`,
  for a full finetune the model before its first update *is* the reference), cached per pair id and
  saved in the run directory (`reference_logps.pt`) so a resumed run does not recompute them. No
  second model is kept in memory;
- chosen and rejected rows go through the model in one forward (`preflens.logprobs.sequence_logps`:
  the unembedding only at response-predicting positions), each batch padded only to its own longest
  row;
- the loss is any entry of `preflens.losses.LOSSES`, a function of `PairLogps` only, so the margin
  weights d_w = -dl/d chosen, d_l = dl/d rejected (seed 000, Sec. 3) come from autograd on [B]-sized
  tensors (`margin_weights`) and are logged every step for every loss.

Multi-process (`accelerate launch` / `torchrun`): `batch_size` is the *global* number of pairs per
micro-batch; the prepared dataloader splits each global batch across the processes
(`split_batches=True`), so a run on N processes sees the same batches in the same order as a run on
one, and DDP's gradient average over equal shards equals the single-process mean. Per-pair
statistics are gathered across processes (`accelerator.gather`) before they are reduced to metrics;
only the main process writes files. Under DDP, DDP wraps a small module whose forward *is*
`sequence_logps`, so the lean path survives; under FSDP/DeepSpeed the log-probs come from the wrapped
model's own forward (it gathers sharded parameters), at the cost of full-vocabulary logits.

Exact resume: `checkpoints/step-N/` is an `accelerator.save_state` (model or adapter weights,
optimizer, scheduler, RNG states, and the loop state: step, epoch, position within the epoch,
tokens). The batch order is a pure function of (seed, epoch), so the resumed run draws the same
batches; rows logged after the checkpoint are dropped from `metrics.jsonl`/`pairs.parquet`.

Callbacks (`TrainerCallback`) get the trainer, the loop state and per-step statistics, so the
gradient probes (`preflens.diagnostics`) can attach without the trainer knowing them.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from preflens.diagnostics.displacement import fell_tolerance
from preflens.errors import DataError, PreflensError, RunDirError, TrainingDivergedError

__all__ = [
    "TrainConfig",
    "TrainerState",
    "TrainerCallback",
    "Trainer",
    "train",
    "LOSS_HPARAM_FIELDS",
    "resolve_loss_kwargs",
]

REFERENCE_FILE = "reference_logps.pt"
# Options that decide which pairs each step sees; a resumed run must keep them (`_check_resumed_data_order`).
_DATA_ORDER_OPTIONS = ("batch_size", "seed", "group_by_length")

LOSS_HPARAM_FIELDS = (
    "beta",
    "gamma",
    "alpha",
    "lam",
    "delta",
    "clip",
    "l1",
    "mask",
    "symmetric",
    "length_normalize",
)
"""TrainConfig fields that are loss hyper-parameters (flags `--beta` etc.); None means the loss's default."""


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field whose help text (its docstring) is kept in `metadata["help"]`, which the CLI
    reuses for `preflens train --help`, so the two never drift apart."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every option of `preflens train` (CLI flag `--some-name` for field `some_name`).

    `preflens train --config file.yaml` reads the same names; flags override the file. The resolved
    configuration is written to `<output_dir>/config.yaml`.
    """

    # --- what to train on
    model: str | None = _opt(
        None, "Hugging Face model id or local directory; default: the embedded SmolLM2-135M-Instruct."
    )
    data: str | None = _opt(None, "Preference pairs: .jsonl/.json/.parquet/.csv file, directory or hub id.")
    eval_data: str | None = _opt(
        None,
        "Held-out pairs; default: the --eval-split split of --data when it has one (hub dataset or "
        "directory), else --eval-fraction of --data held out.",
    )
    eval_fraction: float = _opt(
        0.1,
        "Share of --data held out for evaluation when there is no --eval-data and no --eval-split split "
        "in --data (0: no evaluation).",
    )
    data_split: str = _opt("train", "Split of a hub dataset or directory to read for --data.")
    eval_split: str = _opt(
        "test", "Split of a hub dataset or directory to evaluate on (of --eval-data, else of --data)."
    )
    prompt_field: str = _opt("prompt", "Column holding the prompt.")
    chosen_field: str = _opt("chosen", "Column holding the preferred response.")
    rejected_field: str = _opt("rejected", "Column holding the dispreferred response.")
    on_invalid: str = _opt(
        "error", "Invalid rows: 'error' (stop, naming row and field) or 'drop' (count them)."
    )
    max_length: int | None = _opt(512, "Longest prompt+response in tokens.")
    max_prompt_length: int | None = _opt(256, "Longest prompt in tokens.")
    truncation_mode: str = _opt("keep_end", "Prompt truncation: keep_end or keep_start.")
    on_too_long: str = _opt("truncate", "Pairs over the limits: truncate, drop or error.")
    chat_template: bool | None = _opt(
        None, "Render plain-string pairs through the chat template (default: only conversational data)."
    )
    output_dir: str | None = _opt(None, "Run directory (refused if it exists and is not empty).")
    overwrite: bool = _opt(False, "Delete an existing --output-dir first.")
    resume: bool = _opt(False, "Continue the run in --output-dir from its latest checkpoint.")

    # --- the loss
    loss: str = _opt("dpo", "Loss name (preflens.losses.LOSSES: dpo, ipo, simpo, cpo, slic, rrhf, ...).")
    beta: float | None = _opt(None, "Loss hyper-parameter beta (default: the loss's own).")
    gamma: float | None = _opt(None, "Loss hyper-parameter gamma (simpo).")
    alpha: float | None = _opt(None, "Loss hyper-parameter alpha (cpo, rdpo, rpo).")
    lam: float | None = _opt(None, "Loss hyper-parameter lam (slic, rrhf, dpop).")
    delta: float | None = _opt(None, "Loss hyper-parameter delta (slic).")
    clip: float | None = _opt(None, "Loss hyper-parameter clip (nbdpo).")
    l1: float | None = _opt(None, "Loss hyper-parameter l1 (sparse, mask=learned).")
    mask: str | None = _opt(None, "Loss hyper-parameter mask: diff or learned (sparse).")
    symmetric: bool | None = _opt(None, "Loss hyper-parameter symmetric (nbdpo).")
    length_normalize: bool | None = _opt(None, "Loss hyper-parameter length_normalize (ipo).")
    loss_kwargs: dict = _opt({}, "Further loss hyper-parameters as a mapping (YAML) or k=v,k=v (CLI).")

    # --- the model
    dtype: str = _opt("float32", "Weights dtype: float32 or bfloat16.")
    mixed_precision: str = _opt("no", "Autocast: no or bf16 (accelerate).")
    lora_rank: int = _opt(0, "LoRA rank; 0 trains all parameters.")
    lora_alpha: float | None = _opt(None, "LoRA alpha (default: 2 x rank).")
    lora_dropout: float = _opt(0.0, "LoRA dropout.")
    lora_target_modules: list | None = _opt(None, "Modules LoRA adapts (default: all linear layers).")
    gradient_checkpointing: bool = _opt(False, "Recompute activations in the backward (less memory).")

    # --- optimization
    steps: int | None = _opt(None, "Optimizer steps (default: --epochs over the train split).")
    epochs: float = _opt(1.0, "Epochs over the train split when --steps is not given.")
    batch_size: int = _opt(8, "Pairs per micro-batch, global (split across processes).")
    grad_accum: int = _opt(1, "Micro-batches per optimizer step (effective batch = batch_size x grad_accum).")
    eval_batch_size: int | None = _opt(None, "Pairs per evaluation/reference batch (default: batch_size).")
    lr: float = _opt(5e-6, "Peak learning rate (AdamW).")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.999, "AdamW beta2.")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon.")
    scheduler: str = _opt("linear", "LR schedule (transformers.get_scheduler): linear, cosine, constant, ...")
    warmup_steps: int = _opt(0, "Warm-up steps (overrides --warmup-ratio when > 0).")
    warmup_ratio: float = _opt(0.0, "Warm-up as a share of --steps.")
    max_grad_norm: float | None = _opt(1.0, "Clip the gradient norm (None: no clipping, norm still logged).")
    group_by_length: bool = _opt(False, "Batch pairs of similar length (less padding).")
    attn_implementation: str | None = _opt(
        None,
        "Attention kernel: sdpa, eager, flash_attention_2 (GPU, flash-attn installed), ... "
        "Default: the model's own (sdpa).",
    )
    padding_free: bool = _opt(
        False,
        "Pack each batch's sequences into one row (no padding computed; exact, checked on the model at "
        "start). Pays off with flash-attention; under sdpa/eager attention cost grows with the packed length.",
    )
    seed: int = _opt(0, "Seed for data order, LoRA init and dropout.")

    # --- logging, evaluation, checkpoints
    eval_every: int = _opt(50, "Evaluate every N steps (and at step 0 and the end); 0: only start and end.")
    log_every: int = _opt(1, "Write a train metrics row every N steps.")
    save_every: int = _opt(100, "Checkpoint every N steps (and at the end); 0: only at the end.")
    save_total_limit: int | None = _opt(2, "Keep only the newest N checkpoints (0 or None: all).")
    pairs_train_subset: int = _opt(
        64, "Train pairs whose log-probs are written to pairs.parquet at each eval."
    )
    report_to: str = _opt("tensorboard", "Extra tracker: tensorboard (in <output_dir>/tb) or none.")
    probe_every: int = _opt(0, "Gradient-entanglement probes every N steps (0: off).")
    probe_pairs: int = _opt(
        8,
        "Pairs in the fixed probe set: the first ones of the eval split, filled up from train if it has fewer.",
    )
    step_entanglement: bool = _opt(
        False, "Log entanglement statistics of every training batch from the step's own backward."
    )
    progress: bool = _opt(True, "Show a progress bar.")

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of option `name` (its docstring in this class)."""
        for f in fields(cls):
            if f.name == name:
                return str(f.metadata.get("help", ""))
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        """Check every option a user can get wrong, with a message naming it."""
        from preflens.losses import LOSSES

        if not self.data:
            raise PreflensError("--data is required (a file, directory or hub id of preference pairs)")
        if not self.output_dir:
            raise PreflensError("--output-dir is required (where the run's results go)")
        if self.loss not in LOSSES:
            raise PreflensError(f"--loss: unknown loss '{self.loss}'; available: {', '.join(sorted(LOSSES))}")
        positive = ("batch_size", "grad_accum", "log_every")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise PreflensError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        nonneg = (
            "eval_every",
            "save_every",
            "warmup_steps",
            "lora_rank",
            "pairs_train_subset",
            "probe_every",
        )
        for name in nonneg:
            if int(getattr(self, name)) < 0:
                raise PreflensError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise PreflensError(f"--steps must be >= 1, got {self.steps}")
        if self.steps is None and not self.epochs > 0:
            raise PreflensError(f"--epochs must be > 0, got {self.epochs}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise PreflensError(f"--eval-batch-size must be >= 1, got {self.eval_batch_size}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise PreflensError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise PreflensError(f"--warmup-ratio must be in [0, 1], got {self.warmup_ratio}")
        if not self.lr > 0:
            raise PreflensError(f"--lr must be > 0, got {self.lr}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise PreflensError(
                f"--max-grad-norm must be > 0 (or None for no clipping), got {self.max_grad_norm}"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise PreflensError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise PreflensError(f"--mixed-precision must be no or bf16, got {self.mixed_precision!r}")
        if self.report_to not in ("tensorboard", "none"):
            raise PreflensError(f"--report-to must be tensorboard or none, got {self.report_to!r}")
        if self.overwrite and self.resume:
            raise RunDirError("--overwrite and --resume exclude each other: pick one")
        if self.padding_free and self.step_entanglement:
            raise PreflensError(
                "--step-entanglement reads per-sequence activations of the padded layout; "
                "it cannot be combined with --padding-free (use --probe-every for entanglement probes)"
            )
        from transformers.trainer_utils import SchedulerType

        names = [s.value for s in SchedulerType]
        if self.scheduler not in names:
            raise PreflensError(f"--scheduler must be one of {names}, got {self.scheduler!r}")
        resolve_loss_kwargs(self)


def resolve_loss_kwargs(config: TrainConfig) -> dict[str, Any]:
    """The keyword arguments for `get_loss(config.loss, **kw)`: the per-hparam flags plus `loss_kwargs`.

    Only hyper-parameters the loss accepts are passed; a flag that does not apply to the loss is an
    error (a silently ignored `--gamma 0.5` on DPO would be a wrong experiment).
    """
    from preflens.losses import loss_hparams

    accepted = loss_hparams(config.loss)
    given = {k: getattr(config, k) for k in LOSS_HPARAM_FIELDS if getattr(config, k) is not None}
    extra = dict(config.loss_kwargs or {})
    for k in sorted(set(given) & set(extra)):
        if given[k] != extra[k]:
            raise PreflensError(f"--{k} {given[k]!r} and loss_kwargs {k}={extra[k]!r} disagree: give it once")
    merged = {**extra, **given}
    bad = [k for k in merged if k not in accepted]
    if bad:
        have = ", ".join(f"{k}={v!r}" for k, v in accepted.items()) or "none"
        raise PreflensError(
            f"{', '.join('--' + k.replace('_', '-') for k in bad)} does not apply to loss '{config.loss}' "
            f"(its hyper-parameters: {have})"
        )
    for k, v in merged.items():
        default = accepted[k]
        if isinstance(default, bool) and not isinstance(v, bool):
            raise PreflensError(f"loss '{config.loss}': {k} must be true or false, got {v!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise PreflensError(f"loss '{config.loss}': {k} must be a number, got {v!r}")
        if isinstance(default, str) and not isinstance(v, str):
            raise PreflensError(f"loss '{config.loss}': {k} must be a string, got {v!r}")
    if config.loss == "sparse" and merged.get("mask", accepted.get("mask")) not in ("diff", "learned"):
        raise PreflensError(f"loss 'sparse': --mask must be diff or learned, got {merged.get('mask')!r}")
    return merged


# ----------------------------------------------------------------------------------------------
# state and callbacks


@dataclass
class TrainerState:
    """Where the loop is; saved in every checkpoint (accelerate `register_for_checkpointing`)."""

    step: int = 0
    """Optimizer steps completed."""
    epoch: int = 0
    """Current pass over the train split."""
    batch_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed (the data position)."""
    tokens: int = 0
    """Non-padding tokens processed (all processes)."""
    max_steps: int = 0
    should_stop: bool = False
    """Set by a callback to end the run after this step (a checkpoint is saved)."""

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("step", "epoch", "batch_in_epoch", "tokens")}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for k, v in sd.items():
            setattr(self, k, int(v))


class TrainerCallback:
    """Hooks into the loop; override what you need. All processes call them (collectives allowed).

    - `on_train_begin(trainer)`: after set-up and the reference pass, before step 1.
    - `micro_batch_context(trainer, batch)`: a context manager wrapping one micro-batch's forward and
      backward (e.g. `StepGramCapture` hooks), or None.
    - `on_logps(trainer, batch, seq, pair, per_pair_loss)`: after the forward, before the backward.
    - `on_step_end(trainer, state, batch_stats)`: after the optimizer step; `batch_stats` holds the
      step's per-pair tensors (gathered over processes) and `metrics` (the train row). A returned
      dict is merged into the train metrics row.
    - `on_eval(trainer, state, metrics, pair_rows)`: after an evaluation (metrics of the eval split,
      per-pair rows written to pairs.parquet).
    - `on_save(trainer, state, path)`, `on_train_end(trainer, state)`.
    Set `state.should_stop = True` to end the run early (a checkpoint is saved).
    """

    def on_train_begin(self, trainer: Trainer) -> None:
        pass

    def micro_batch_context(self, trainer: Trainer, batch: dict[str, Any]) -> Any:
        return None

    def on_logps(
        self, trainer: Trainer, batch: dict[str, Any], seq: Any, pair: Any, per_pair_loss: Any
    ) -> None:
        pass

    def on_step_end(self, trainer: Trainer, state: TrainerState, batch_stats: dict[str, Any]) -> dict | None:
        return None

    def on_eval(
        self, trainer: Trainer, state: TrainerState, metrics: dict[str, Any], pair_rows: list[dict]
    ) -> None:
        pass

    def on_save(self, trainer: Trainer, state: TrainerState, path: Path) -> None:
        pass

    def on_train_end(self, trainer: Trainer, state: TrainerState) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# data order


class _Epoch:
    """Holds the epoch where accelerate's BatchSamplerShard looks for `sampler.set_epoch`."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class PairBatchSampler:
    """Global batches of pair indices: a pure function of (seed, epoch), so resume and every process
    see the same order. Only whole batches (the few pairs left over change with each epoch's shuffle),
    so every process gets an equal shard. `skip` drops the first batches of the next pass (resume)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool = False):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.drop_last = True
        self.seed = seed
        self.group_by_length = group_by_length
        self.sampler = _Epoch()
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def batches(self, epoch: int) -> list[list[int]]:
        import torch

        if self.group_by_length:
            from preflens.data.collate import LengthGroupedBatchSampler

            inner = LengthGroupedBatchSampler(
                self.lengths, self.batch_size, shuffle=True, seed=self.seed, drop_last=True
            )
            inner.set_epoch(epoch)
            return [list(b) for b in inner]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        n = len(order) // self.batch_size
        return [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(n)]

    def __iter__(self) -> Iterator[list[int]]:
        out = self.batches(self.sampler.epoch)[self.skip :]
        self.skip = 0
        return iter(out)

    def __len__(self) -> int:
        return len(self.lengths) // self.batch_size


# ----------------------------------------------------------------------------------------------
# the trainer


def _load_model_and_tokenizer(config: TrainConfig) -> tuple[Any, Any]:
    """`preflens.models.load_model` (HF id, local dir, GGUF, or the embedded default)."""
    from preflens.models import load_model

    return load_model(config.model, dtype=config.dtype, device="cpu")


def _apply_lora(model: Any, config: TrainConfig) -> Any:
    rank = config.lora_rank
    alpha = config.lora_alpha if config.lora_alpha is not None else 2.0 * rank
    targets = config.lora_target_modules or "all-linear"
    try:
        from preflens.models import apply_lora
    except ImportError:  # pragma: no cover
        apply_lora = None
    if apply_lora is not None:
        return apply_lora(model, rank=rank, alpha=alpha, target_modules=targets, dropout=config.lora_dropout)
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        lora_dropout=config.lora_dropout,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def _all_reduce_mean_grads(params: Sequence[Any], bucket_elems: int = 1 << 25) -> None:
    """Average `p.grad` over all processes, as DDP would have (a parameter without a gradient counts as 0).

    Flattened into buckets of one dtype (at most `bucket_elems` elements, 128 MiB in fp32) so a step costs a
    few collectives, not one per tensor. Every process passes the same parameters in the same order.
    """
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[Any, list[Any]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        start = 0
        while start < len(grads):
            bucket, n = [], 0
            while start < len(grads) and (not bucket or n + grads[start].numel() <= bucket_elems):
                bucket.append(grads[start])
                n += grads[start].numel()
                start += 1
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()


def _fingerprint(items: Sequence[Any]) -> str:
    """sha256 of the pairs' ids and token ids: what the cached reference log-probs were computed for."""
    import hashlib
    from array import array

    h = hashlib.sha256()
    for it in sorted(items, key=lambda it: it.pair_id):
        for ids in ([it.pair_id], it.prompt_ids, it.chosen_ids, it.rejected_ids):
            h.update(array("q", [len(ids), *ids]).tobytes())  # length-prefixed: no ambiguous joins
    return h.hexdigest()


def _why_dropped(reports: dict[str, Any]) -> str:
    """What removed the pairs (per reason, with one example), from the data reports of the train split."""
    counts: dict[str, int] = {}
    example = ""
    for key in ("train/load", "train/tokenize"):
        rep = reports.get(key) or {}
        for reason, n in (rep.get("dropped") or {}).items():
            counts[reason] = counts.get(reason, 0) + int(n)
            if not example and (rep.get("examples") or {}).get(reason):
                example = rep["examples"][reason][0]
    if not counts:
        return "the data has no rows"
    parts = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in counts.items())
    hint = (
        " (raise --max-length/--max-prompt-length or use --on-too-long truncate)"
        if "too_long" in counts
        else ""
    )
    return f"dropped: {parts}{hint}; e.g. {example}" if example else f"dropped: {parts}{hint}"


def _is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _lean_logps_module(model: Any) -> Any:
    """A module whose forward is `sequence_logps(model, ...)` (the response-only unembedding).

    Prepared for DDP *instead of* the model, DDP's forward (which arms the gradient all-reduce) runs
    the lean path. Its state dict is the model's own (no extra prefix), so its checkpoints are those
    of DDP over the model itself.
    """
    import torch

    from preflens.logprobs import sequence_logps

    class LeanLogps(torch.nn.Module):
        def __init__(self, lm: Any) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: Any, attention_mask: Any, response_mask: Any, **kw: Any) -> Any:
            return sequence_logps(self.lm, input_ids, attention_mask, response_mask, **kw)

        def state_dict(self, *args: Any, **kwargs: Any) -> Any:
            return self.lm.state_dict(*args, **kwargs)

        def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
            return self.lm.load_state_dict(state_dict, strict=strict, assign=assign)

    return LeanLogps(model)


def _through_forward(model: Any) -> Any:
    """`model` behind a module without `config`, so `sequence_logps` calls the model's own forward.

    Under DDP, FSDP or DeepSpeed the wrapper's forward does work that calling the decoder and the
    lm_head directly would skip (DDP: preparing the gradient all-reduce; FSDP/ZeRO-3: gathering
    sharded parameters). The price is the model's full-vocabulary logits instead of the response-only
    unembedding of the single-process path.
    """
    import torch

    class ThroughForward(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            object.__setattr__(self, "inner", inner)  # not a submodule: no second registration

        def forward(self, **kwargs: Any) -> Any:
            return self.inner(**kwargs)

    return ThroughForward(model)


@dataclass
class _Scored:
    """Per-pair statistics of a batch (local to this process)."""

    pair: Any  # PairLogps
    loss: Any  # Tensor [B]
    seq: Any  # SequenceLogps


# Columns of the per-pair stats tensor gathered once per micro-batch (one collective).
_STAT_COLS = ("pair_id", "chosen", "rejected", "ref_chosen", "ref_rejected", "chosen_len", "rejected_len", "loss",
              "d_w", "d_l", "tokens", "loss_dpo")  # fmt: skip


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
        if config.probe_every or config.step_entanglement:  # gradient probes (preflens.probes)
            from preflens.probes import ProbeCallback

            self.callbacks.append(
                ProbeCallback(config.probe_every, config.probe_pairs, config.step_entanglement)
            )
        self.state = TrainerState()
        self.run_dir = Path(str(config.output_dir))
        self._say = log_fn

    # -- set-up ---------------------------------------------------------------------------------

    def say(self, msg: str) -> None:
        if self._say is not None:
            self._say(msg)
        elif self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(msg)

    def _make_accelerator(self) -> Any:
        import torch
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            # Several runs in one Python process (tests, `preflens compare`): forget the previous run's
            # settings (accelerate keeps them in a singleton). Never inside a launched process group.
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        cfg = self.config
        log_with = "tensorboard" if cfg.report_to == "tensorboard" else None
        if log_with:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                try:
                    import tensorboardX  # noqa: F401
                except ImportError:
                    log_with = None
        import os

        # accelerate detects a CPU process group (torchrun/accelerate launch --cpu, gloo) only when told it
        # runs on CPU; a GPU machine keeps its default device selection.
        world = int(os.environ.get("WORLD_SIZE", "1"))
        on_cpu = world > 1 and not torch.cuda.is_available()
        return Accelerator(
            cpu=on_cpu,
            mixed_precision=cfg.mixed_precision,
            log_with=log_with,
            project_config=ProjectConfiguration(
                project_dir=str(self.run_dir),
                logging_dir=str(self.run_dir / "tb"),
                automatic_checkpoint_naming=False,
            ),
            dataloader_config=DataLoaderConfiguration(split_batches=True),
        )

    def _setup_run_dir(self) -> None:
        from preflens.tracking import prepare_run_dir

        acc = self.accelerator
        err: Exception | None = None
        if acc.is_main_process:
            try:
                prepare_run_dir(self.run_dir, overwrite=self.config.overwrite, resume=self.config.resume)
            except RunDirError as exc:
                err = exc
        msg = [str(err) if err is not None else None]
        if acc.num_processes > 1:  # every process stops, not only the main one (others would hang)
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(msg)
        if msg[0] is not None:
            raise RunDirError(msg[0])
        if not self.run_dir.is_dir():
            raise RunDirError(
                f"{self.run_dir}: not visible from process {acc.process_index} (a shared filesystem is needed)"
            )

    def _read_pairs(self) -> None:
        """Read and validate the rows first: a bad file fails before a large model is loaded."""
        from preflens.data.formats import load_pairs

        cfg = self.config
        read = dict(
            prompt_field=cfg.prompt_field,
            chosen_field=cfg.chosen_field,
            rejected_field=cfg.rejected_field,
            on_invalid=cfg.on_invalid,
        )
        self._reports: dict[str, Any] = {}
        self._pairs, rep = load_pairs(cfg.data, split=cfg.data_split, **read)
        self._reports["train/load"] = rep.to_dict()
        self._eval_pairs = None
        eval_source = cfg.eval_data
        if (
            not eval_source
            and cfg.eval_fraction > 0
            and cfg.eval_split != cfg.data_split
            and not self._held_out_before()
        ):
            # a dataset with its own held-out split (train/test, as TRL's datasets come): evaluate on it,
            # as TRL's scripts do, instead of holding out a share of train
            from preflens.data.formats import available_splits

            if cfg.eval_split in (available_splits(cfg.data) or []):
                eval_source = cfg.data
        if eval_source:
            self._eval_pairs, erep = load_pairs(eval_source, split=cfg.eval_split, **read)
            self._reports["eval/load"] = {**erep.to_dict(), "split": cfg.eval_split}
            if not cfg.eval_data:
                self.say(f"eval: the {cfg.eval_split!r} split of {cfg.data} ({len(self._eval_pairs)} pairs)")

    def _held_out_before(self) -> bool:
        """A resumed run that held out a share of --data keeps doing so (its cached reference is of those
        pairs), even if the dataset now offers a test split."""
        from preflens.tracking import DATA_REPORT_FILE

        report = self.run_dir / DATA_REPORT_FILE
        if not (self.config.resume and report.is_file()):
            return False
        try:
            return "eval/split" in json.loads(report.read_text())
        except (OSError, ValueError):
            return False

    def _load_data(self) -> None:
        """Tokenize; hold out the eval split; check the batch size against the data."""
        from preflens.data.collate import tokenize_pairs

        cfg = self.config
        tok_kw = dict(
            max_length=cfg.max_length,
            max_prompt_length=cfg.max_prompt_length,
            truncation_mode=cfg.truncation_mode,
            on_too_long=cfg.on_too_long,
            chat_template=cfg.chat_template,
        )
        reports = self._reports
        items, trep = tokenize_pairs(self._pairs, self.tokenizer, **tok_kw)
        reports["train/tokenize"] = trep.to_dict()
        if self._eval_pairs is not None:
            eval_items, etrep = tokenize_pairs(self._eval_pairs, self.tokenizer, **tok_kw)
            reports["eval/tokenize"] = etrep.to_dict()
            train_items = items
        elif cfg.eval_fraction > 0 and len(items) >= 2:
            n_eval = max(1, round(cfg.eval_fraction * len(items)))
            n_eval = min(n_eval, len(items) - 1)
            order = list(range(len(items)))
            random.Random(f"eval-split/{cfg.seed}").shuffle(order)
            held = set(order[:n_eval])
            eval_items = [it for i, it in enumerate(items) if i in held]
            train_items = [it for i, it in enumerate(items) if i not in held]
            reports["eval/split"] = {
                "held_out_of_data": n_eval,
                "fraction": cfg.eval_fraction,
                "seed": cfg.seed,
            }
        else:
            eval_items, train_items = [], items
        if not train_items:
            raise DataError(f"{cfg.data}: no pairs left for training; " + _why_dropped(reports))
        if len(train_items) < cfg.batch_size:
            raise PreflensError(
                f"--batch-size {cfg.batch_size} is larger than the {len(train_items)} train pairs of {cfg.data}; "
                "lower --batch-size"
            )
        n = self.accelerator.num_processes
        if cfg.batch_size % n:
            raise PreflensError(
                f"--batch-size {cfg.batch_size} (global, pairs per micro-batch) must be divisible by the "
                f"{n} processes so that each gets an equal shard"
            )
        self.train_items, self.eval_items = train_items, eval_items
        self.data_reports = reports
        k = min(cfg.pairs_train_subset, len(train_items))
        self.train_subset = sorted(
            random.Random(f"train-subset/{cfg.seed}").sample(train_items, k), key=lambda it: it.pair_id
        )

    def _build_model(self) -> None:
        import torch

        cfg = self.config
        if self._model_in is not None:
            model, tok = self._model_in, self._tokenizer_in
            if tok is None:
                raise PreflensError("Trainer(model=...) needs tokenizer=... too")
        else:
            model, tok = _load_model_and_tokenizer(cfg)
        from preflens.models import set_attention

        set_attention(model, cfg.attn_implementation)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token  # as TRL does; padded positions are masked anyway
        torch.manual_seed(cfg.seed)  # LoRA init and the learned mask head
        # With fresh adapters (B = 0) the reference is the base model: computed with the adapters off.
        # A model that arrives with adapters (a saved run's final/) is its own reference, as is.
        self._fresh_lora = False
        if cfg.lora_rank > 0 and not _is_peft(model):
            model = _apply_lora(model, cfg)
            self._fresh_lora = True
        if cfg.gradient_checkpointing:
            from preflens.models import enable_activation_checkpointing

            enable_activation_checkpointing(model)
        if _is_peft(model) and not any(p.requires_grad for p in model.parameters()):
            # a saved adapter (e.g. a run's final/) loads frozen: training it further is what was asked
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(True)
        if not any(p.requires_grad for p in model.parameters()):
            raise PreflensError("the model has no trainable parameters")
        self.mask_head = None
        if self.config.loss == "sparse" and self.loss_kwargs.get("mask") == "learned":
            hidden = model.get_input_embeddings().weight.shape[1]
            dtype = next(model.parameters()).dtype
            # SparsePO-style token mask (Christopoulou et al. 2024): a linear score on the last hidden state.
            self.mask_head = torch.nn.Linear(hidden, 1).to(dtype)
        self.model, self.tokenizer = model, tok

    # -- reference and evaluation passes --------------------------------------------------------

    def _distributed(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type != DistributedType.NO

    def _ddp_like(self) -> bool:
        """accelerate wraps the model in DistributedDataParallel (multi-GPU/CPU/XPU/..., not FSDP/DeepSpeed)."""
        name = str(self.accelerator.distributed_type).split(".")[-1]
        return name.startswith("MULTI_")

    def _forward_module(self) -> Any:
        """What `sequence_logps` runs: the bare model in one process (the lean path), else the wrapped
        model through its own forward (`_through_forward`)."""
        if self._distributed() and getattr(self, "_ddp", None) is None:
            return _through_forward(self.model)
        return self.accelerator.unwrap_model(self.model)

    def _policy_logps(self, ids: Any, am: Any, rm: Any, **kw: Any) -> Any:
        """The policy forward of a training micro-batch (through DDP's lean wrapper when there is one)."""
        from preflens.logprobs import sequence_logps

        kw["padding_free"] = self.config.padding_free
        if self._ddp is not None:
            return self._ddp(ids, am, rm, **kw)
        return sequence_logps(self._forward_module(), ids, am, rm, **kw)

    def _eval_batches(self, items: Sequence[Any]) -> list[list[Any]]:
        """Fixed batches for no-grad passes: sorted by length (little padding), this process's share.

        Every process runs the same number of forwards (the last batch repeated where the shares are
        uneven; results are keyed by pair id, so the repeat is harmless): FSDP and ZeRO-3 forwards are
        collectives that all processes must enter.
        """
        size = self.config.eval_batch_size or self.config.batch_size
        ordered = sorted(items, key=lambda it: (it.length, it.pair_id))
        batches = [ordered[i : i + size] for i in range(0, len(ordered), size)]
        acc = self.accelerator
        mine = batches[acc.process_index :: acc.num_processes]
        per = -(-len(batches) // acc.num_processes)
        while batches and len(mine) < per:
            mine.append(batches[-1])
        return mine

    def _score_items(self, items: Sequence[Any], *, reference: bool) -> dict[int, dict[str, Any]]:
        """No-grad per-pair log-probs of `items` (all processes share the work, all get the result)."""
        import torch
        from accelerate.utils import gather_object

        from preflens.data.collate import collate_pairs
        from preflens.logprobs import sequence_logps

        model = self.accelerator.unwrap_model(self.model)
        runner = self._forward_module()
        was_training = model.training
        model.eval()
        out: dict[int, dict[str, Any]] = {}
        ctx = model.disable_adapter() if (reference and self._fresh_lora) else contextlib.nullcontext()
        want_tokens = self.needs_tokens
        try:
            with torch.no_grad(), ctx, self.accelerator.autocast():
                for chunk in self._eval_batches(items):
                    batch = collate_pairs(chunk, self.tokenizer.pad_token_id)
                    batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
                    seq = sequence_logps(
                        runner,
                        batch["input_ids"],
                        batch["attention_mask"],
                        batch["response_mask"],
                        return_tokens=want_tokens,
                        return_hidden=self.mask_head is not None and not reference,
                        padding_free=self.config.padding_free,
                    )
                    b = len(chunk)
                    # one device-to-host copy per batch, not one per number
                    lp, ln = seq.logps.float().cpu().tolist(), seq.lengths.cpu().tolist()
                    if want_tokens:
                        tl, tm = seq.token_logps.float().cpu(), seq.token_mask.cpu()
                    for i, it in enumerate(chunk):
                        row = {
                            "chosen": lp[i],
                            "rejected": lp[b + i],
                            "chosen_len": ln[i],
                            "rejected_len": ln[b + i],
                        }
                        if want_tokens:
                            for side, r in (("chosen", i), ("rejected", b + i)):
                                row[f"{side}_tokens"] = tl[r][tm[r]]
                        out[it.pair_id] = row
                    if not reference and (self.mask_head is not None or want_tokens):
                        self._eval_token_loss_inputs(chunk, seq, out)
        finally:
            model.train(was_training)
        merged: dict[int, dict[str, Any]] = {}
        for part in gather_object([out]):
            merged.update(part)
        return merged

    def _eval_token_loss_inputs(self, chunk: Sequence[Any], seq: Any, out: dict[int, dict[str, Any]]) -> None:
        """Keep what the token-level loss needs at evaluation (token ids, learned-mask logits)."""
        b = len(chunk)
        ids, mask = seq.token_ids.cpu(), seq.token_mask.cpu()
        logits = None
        if self.mask_head is not None and seq.hidden is not None:
            logits = self.mask_head(seq.hidden).squeeze(-1).float().cpu()
        for i, it in enumerate(chunk):
            row = out[it.pair_id]
            for side, r in (("chosen", i), ("rejected", b + i)):
                row[f"{side}_token_ids"] = ids[r][mask[r]]
                if logits is not None:
                    row[f"{side}_mask_logits"] = logits[r][mask[r]]

    def _reference_pass(self) -> None:
        """Reference log-probs of every train and eval pair, once (or read back on resume)."""
        import torch

        path = self.run_dir / REFERENCE_FILE
        need = {
            "train": {it.pair_id for it in self.train_items},
            "eval": {it.pair_id for it in self.eval_items},
        }
        ref: dict[str, dict[int, dict[str, Any]]] | None = None
        prints = {"train": _fingerprint(self.train_items), "eval": _fingerprint(self.eval_items)}
        if path.is_file():
            saved = torch.load(path, weights_only=False)
            for split, fp in (saved.get("fingerprint") or {}).items():  # absent in older caches
                if split in prints and fp != prints[split]:
                    raise RunDirError(
                        f"{path}: the {split} pairs' token ids differ from those its reference log-probs were "
                        "computed for (was the data file edited, or --max-length, --max-prompt-length, the "
                        "chat template or the tokenizer changed?); resume with the same data and options, "
                        "or start a new run"
                    )
            ok = (
                all(need[s] <= set(saved.get(s, {})) for s in need)
                and saved.get("tokens", False) >= self.needs_tokens
            )
            if ok:
                ref = {s: saved[s] for s in need}
            else:
                raise RunDirError(
                    f"{path}: its pairs do not match the data of this run (was --data or --eval-data changed "
                    "since the run started?); resume with the same data, or start a new run"
                )
        if ref is None and self.config.resume and not self._fresh_lora:
            raise RunDirError(
                f"{path}: missing, and the reference cannot be recomputed from the resumed (trained) model; "
                "start a new run"
            )
        if ref is None:
            t0 = time.perf_counter()
            ref = {
                "train": self._score_items(self.train_items, reference=True),
                "eval": self._score_items(self.eval_items, reference=True) if self.eval_items else {},
            }
            if self.accelerator.is_main_process:
                torch.save({**ref, "tokens": self.needs_tokens, "fingerprint": prints}, path)
            self.say(
                f"reference log-probs of {len(self.train_items)} train + {len(self.eval_items)} eval pairs "
                f"in {time.perf_counter() - t0:.1f}s (cached in {path.name})"
            )
        self.reference = ref
        dev = self.accelerator.device
        # Dense [max_id + 1, 2] tables: the step looks its batch up by pair_index, no Python loop.
        self.ref_table: dict[str, Any] = {}
        self.ref_tokens: dict[str, dict[int, tuple[Any, Any]]] = {}
        for split, rows in ref.items():
            if not rows:
                continue
            top = max(rows) + 1
            t = torch.full((top, 2), float("nan"), dtype=torch.float32)
            for pid, r in rows.items():
                t[pid, 0], t[pid, 1] = r["chosen"], r["rejected"]
            self.ref_table[split] = t.to(dev)
            if self.needs_tokens:
                self.ref_tokens[split] = {
                    pid: (r["chosen_tokens"], r["rejected_tokens"]) for pid, r in rows.items()
                }

    def _ref_token_tensors(self, split: str, pair_ids: Sequence[int], width: int) -> tuple[Any, Any]:
        """Left-aligned [B, width] reference token log-probs of the batch (zeros on padding)."""
        import torch

        table = self.ref_tokens[split]
        b = len(pair_ids)
        cw = torch.zeros(b, width)
        cl = torch.zeros(b, width)
        for i, pid in enumerate(pair_ids):
            tw, tl = table[int(pid)]
            cw[i, : len(tw)] = tw[:width]
            cl[i, : len(tl)] = tl[:width]
        dev = self.accelerator.device
        return cw.to(dev), cl.to(dev)

    # -- the step -------------------------------------------------------------------------------

    @property
    def needs_tokens(self) -> bool:
        from preflens.losses import TOKEN_LEVEL_LOSSES

        return self.config.loss in TOKEN_LEVEL_LOSSES

    @property
    def needs_grad_norms(self) -> bool:
        return self.config.loss == "normalized"

    def forward_batch(self, batch: dict[str, Any], split: str = "train") -> _Scored:
        """Policy log-probs of a batch (one forward over chosen+rejected), its PairLogps and per-pair loss."""
        import torch

        from preflens.logprobs import pair_logps_from_batch

        ids, am, rm = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        pid = batch["pair_index"]
        norms = None
        if self.needs_grad_norms:
            # Normalized PO (seed 000, Sec. 5.1) divides by |grad log pi(y)| per sequence: exact from
            # one extra forward and an activation-only backward (diagnostics/gram.py), eval-free.
            from preflens.diagnostics.gram import sequence_grad_norms

            with self.accelerator.autocast():
                norms = sequence_grad_norms(self.accelerator.unwrap_model(self.model), ids, am, rm)
        with self.accelerator.autocast():
            seq = self._policy_logps(
                ids, am, rm, return_tokens=self.needs_tokens, return_hidden=self.mask_head is not None
            )
        ref = self.ref_table[split][pid]
        ref_tokens = None
        if self.needs_tokens:
            ref_tokens = self._ref_token_tensors(split, pid.tolist(), seq.token_logps.shape[1])
        pair = pair_logps_from_batch(seq, ref=(ref[:, 0], ref[:, 1]), ref_tokens=ref_tokens)
        if norms is not None:
            b = pid.shape[0]
            pair.chosen_grad_norm, pair.rejected_grad_norm = norms[:b].float(), norms[b:].float()
        if self.mask_head is not None:
            logits = self.mask_head(seq.hidden).squeeze(-1).float()
            b = pid.shape[0]
            pair.chosen_mask_logits, pair.rejected_mask_logits = logits[:b], logits[b:]
        loss = self.loss_fn(pair)
        if loss.shape != pid.shape:
            raise PreflensError(f"loss '{self.config.loss}' returned shape {tuple(loss.shape)}, expected [B]")
        return _Scored(pair=pair, loss=loss.to(torch.float32), seq=seq)

    def _pair_stats(self, scored: _Scored, pair_ids: Any, tokens: Any) -> Any:
        """[B, len(_STAT_COLS)] per-pair numbers of this process's micro-batch (detached, float64)."""
        import torch

        from preflens.losses import get_loss, margin_weights

        p = scored.pair
        d_w, d_l = margin_weights(self.loss_fn, p)
        if self.needs_grad_norms:  # the surrogate's value is not a likelihood: log DPO's beside it
            loss_dpo = get_loss("dpo", beta=self.loss_kwargs.get("beta", 0.1))(p).detach()
        else:
            loss_dpo = torch.full_like(p.chosen, float("nan"))
        cols = [
            pair_ids.to(torch.float64),
            p.chosen.detach(),
            p.rejected.detach(),
            p.ref_chosen,
            p.ref_rejected,
            p.chosen_len,
            p.rejected_len,
            scored.loss.detach(),
            d_w,
            d_l,
            tokens,
            loss_dpo,
        ]
        return torch.stack([c.to(torch.float64) for c in cols], dim=1)

    def _train_step(self) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches; returns the step's gathered per-pair stats."""
        import torch

        acc = self.accelerator
        cfg = self.config
        # Where this step starts (data position, RNG): an interrupt inside the step rewinds to it, so the
        # checkpoint written on Ctrl-C resumes exactly.
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self._step_start = (self.state.epoch, self.state.batch_in_epoch, torch.get_rng_state(), cuda_rng)
        self._phase = "forward"
        self.model.train()
        parts = []
        for k in range(cfg.grad_accum):
            batch = next(self._batches)
            last = k == cfg.grad_accum - 1
            wrapped = self._ddp if self._ddp is not None else self.model
            ddp_syncs = last and not self.manual_grad_sync
            sync = contextlib.nullcontext() if (ddp_syncs or acc.num_processes == 1) else acc.no_sync(wrapped)
            with contextlib.ExitStack() as stack:
                stack.enter_context(sync)
                for cb in self.callbacks:
                    c = cb.micro_batch_context(self, batch)
                    if c is not None:
                        stack.enter_context(c)
                scored = self.forward_batch(batch, "train")
                for cb in self.callbacks:
                    cb.on_logps(self, batch, scored.seq, scored.pair, scored.loss)
                loss = scored.loss.mean() / cfg.grad_accum
                acc.backward(loss)
            tokens = batch["attention_mask"].sum(1)
            b = batch["pair_index"].shape[0]
            local = self._pair_stats(scored, batch["pair_index"], tokens[:b] + tokens[b:])
            parts.append(acc.gather(local))
        if self.manual_grad_sync and acc.num_processes > 1:
            _all_reduce_mean_grads([p for p in self.model.parameters() if p.requires_grad])
        stats = torch.cat(parts).cpu()  # one device-to-host copy; metrics are computed on the host
        col = {name: stats[:, i] for i, name in enumerate(_STAT_COLS)}
        if not torch.isfinite(col["loss"]).all():
            bad = col["pair_id"][~torch.isfinite(col["loss"])].long().tolist()
            self._diverged(
                f"the loss is {'NaN' if col['loss'].isnan().any() else 'inf'} on pair(s) {bad[:10]}"
            )
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.mask_head is not None:
            params += list(self.mask_head.parameters())
        grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm else float("inf"))
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if not math.isfinite(grad_norm):
            self._diverged(f"the gradient norm is {grad_norm}")
        lr = self.scheduler.get_last_lr()[0]
        self._phase = "update"
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {"stats": col, "grad_norm": grad_norm, "lr": lr}
        # kept until the loop has written the step's row: an interrupt in between writes it instead
        self._last_step_out = out
        self.state.tokens += int(col["tokens"].sum())
        self.state.step += 1
        self._phase = "between"
        return out

    def _log_now(self, step: int) -> bool:
        return step % self.config.log_every == 0 or step == self.state.max_steps

    def _step_metrics(self, out: dict[str, Any]) -> dict[str, Any]:
        """The train row of a finished step (without callbacks' extra keys)."""
        state = self.state
        metrics = self._metrics(out["stats"])
        metrics.update(
            lr=out["lr"],
            grad_norm=out["grad_norm"],
            epoch=(state.epoch * self.batches_per_epoch + state.batch_in_epoch) / self.batches_per_epoch,
            tokens=state.tokens,
        )
        return metrics

    def _on_interrupt(self, pending_row: dict[str, Any] | None) -> None:
        """Ctrl-C: keep what the completed steps produced and checkpoint them, unless the interrupt hit
        the parameter update itself (then the last checkpoint stays the one to resume)."""
        import torch

        state = self.state
        if self._phase == "update":
            self.say("interrupted during the parameter update: resume from the last checkpoint")
            return
        if self._phase == "forward":  # rewind the half-done step: data position, RNG, gradients
            epoch, pos, rng, cuda_rng = self._step_start
            # the micro-batch iterator has moved on: rebuild it at the step's start
            state.epoch, state.batch_in_epoch = epoch, pos
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            self.optimizer.zero_grad(set_to_none=True)
            self._batches = self._micro_batches()
            self._phase = "between"
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
        where = f"step {step + 1}"
        kept = ""
        if step > 0:
            ckpt = self._save_checkpoint() if self._last_saved != step else self._ckpt_path(step)
            kept = f"; the last good state (after step {step}) is in {ckpt}"
        else:
            self.tracker.flush()
        raise TrainingDivergedError(
            f"training stopped at {where}: {what}{kept}. Lower --lr, check --beta and the data, then rerun "
            "(or --resume after changing them in config.yaml)."
        )

    # -- metrics --------------------------------------------------------------------------------

    def _metrics(self, col: dict[str, Any]) -> dict[str, float]:
        """TRL-compatible keys (ARCHITECTURE.md) from per-pair tensors over all processes.

        rewards/* are the implicit rewards beta (log pi - log pi_ref) with the loss's beta (1 for losses
        without one), also for reference-free losses, where they measure the move from the initial model;
        frac_chosen_fell is the share of pairs whose chosen log-prob is below its reference value (the
        model before step 1), i.e. likelihood displacement (seed 003).
        """
        import torch

        beta = float(self.loss_kwargs.get("beta", self._loss_defaults.get("beta", 1.0)))
        r_w = beta * (col["chosen"] - col["ref_chosen"])
        r_l = beta * (col["rejected"] - col["ref_rejected"])
        margin = r_w - r_l
        m = {
            "loss": float(col["loss"].mean()),
            "logps/chosen": float(col["chosen"].mean()),
            "logps/rejected": float(col["rejected"].mean()),
            "rewards/chosen": float(r_w.mean()),
            "rewards/rejected": float(r_l.mean()),
            "rewards/margins": float(margin.mean()),
            "rewards/accuracies": float((margin > 0).double().mean()),
            "margin_weights/dw": float(col["d_w"].mean()),
            "margin_weights/dl": float(col["d_l"].mean()),
            "frac_chosen_fell": float((col["chosen"] < col["ref_chosen"] - self._fell_tol).double().mean()),
        }
        if not torch.isnan(col["loss_dpo"]).all():
            m["loss/dpo"] = float(col["loss_dpo"].mean())
        try:
            from preflens.diagnostics.imbalance import ImbalanceStats, balanced_dpo_lambda, imbalance_metrics
        except ImportError:  # pragma: no cover
            return m
        dw, dl = col["d_w"].abs(), col["d_l"].abs()
        log_ratio = torch.log(dw) - torch.log(dl) + (col["rejected"] - col["chosen"])
        log_ratio = torch.where((dw == 0) & (dl == 0), torch.full_like(log_ratio, math.nan), log_ratio)
        lam = balanced_dpo_lambda(col["chosen"], col["rejected"])
        m.update(imbalance_metrics(ImbalanceStats(log_ratio, log_ratio.exp(), lam, col["d_w"], col["d_l"])))
        return m

    def _eval_tensors(self, split: str, rows: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """Per-pair eval columns, with the loss and margin weights of the configured loss."""
        import torch

        from preflens.losses import PairLogps, get_loss, margin_weights

        ids = sorted(rows)
        ref = self.reference[split]

        def col(key: str, src: dict[int, dict[str, Any]] = rows) -> Any:
            return torch.tensor([src[i][key] for i in ids], dtype=torch.float64)

        p = PairLogps(
            chosen=col("chosen"),
            rejected=col("rejected"),
            ref_chosen=col("chosen", ref),
            ref_rejected=col("rejected", ref),
            chosen_len=col("chosen_len"),
            rejected_len=col("rejected_len"),
        )
        loss_fn = self.loss_fn
        if self.needs_tokens:
            self._fill_tokens(p, ids, rows, ref)
        if self.needs_grad_norms:
            # the surrogate needs per-sequence gradients; at evaluation report DPO's loss (same beta)
            loss_fn = get_loss("dpo", beta=self.loss_kwargs.get("beta", 0.1))
        with torch.no_grad():
            loss = loss_fn(p).double()
        d_w, d_l = margin_weights(loss_fn, p)
        nan = torch.full_like(p.chosen, float("nan"))
        return {
            "pair_id": torch.tensor(ids, dtype=torch.float64),
            "chosen": p.chosen,
            "rejected": p.rejected,
            "ref_chosen": p.ref_chosen,
            "ref_rejected": p.ref_rejected,
            "chosen_len": p.chosen_len,
            "rejected_len": p.rejected_len,
            "loss": loss,
            "d_w": d_w.double(),
            "d_l": d_l.double(),
            # normalized: the eval loss above *is* DPO's; logged as loss/dpo too, the key its train rows use
            "loss_dpo": loss if self.needs_grad_norms else nan,
        }

    @staticmethod
    def _fill_tokens(
        p: Any, ids: list[int], rows: dict[int, dict[str, Any]], ref: dict[int, dict[str, Any]]
    ) -> None:
        import torch
        from torch.nn.utils.rnn import pad_sequence

        def pad(key: str, src: dict[int, dict[str, Any]], value: float = 0.0) -> Any:
            return pad_sequence([src[i][key].double() for i in ids], batch_first=True, padding_value=value)

        p.chosen_tokens, p.rejected_tokens = pad("chosen_tokens", rows), pad("rejected_tokens", rows)
        p.ref_chosen_tokens, p.ref_rejected_tokens = pad("chosen_tokens", ref), pad("rejected_tokens", ref)
        p.chosen_mask = pad_sequence(
            [torch.ones(len(rows[i]["chosen_tokens"]), dtype=torch.bool) for i in ids], batch_first=True
        )
        p.rejected_mask = pad_sequence(
            [torch.ones(len(rows[i]["rejected_tokens"]), dtype=torch.bool) for i in ids], batch_first=True
        )
        p.chosen_token_ids = pad_sequence(
            [rows[i]["chosen_token_ids"] for i in ids], batch_first=True, padding_value=-1
        )
        p.rejected_token_ids = pad_sequence(
            [rows[i]["rejected_token_ids"] for i in ids], batch_first=True, padding_value=-1
        )
        if "chosen_mask_logits" in rows[ids[0]]:
            p.chosen_mask_logits = pad("chosen_mask_logits", rows)
            p.rejected_mask_logits = pad("rejected_mask_logits", rows)

    def evaluate(self) -> dict[str, Any]:
        """Log-probs of the eval split and the fixed train subset: metrics row + pairs.parquet rows."""
        step = self.state.step
        scored = {"eval": self._score_items(self.eval_items, reference=False)} if self.eval_items else {}
        if self.train_subset:
            scored["train"] = self._score_items(self.train_subset, reference=False)
        rows: list[dict[str, Any]] = []
        metrics: dict[str, Any] = {}
        for split, per_pair in scored.items():
            ref = self.reference[split]
            for pid in sorted(per_pair):
                r = per_pair[pid]
                rows.append(
                    {
                        "step": step,
                        "split": split,
                        "pair_id": int(pid),
                        "chosen": r["chosen"],
                        "rejected": r["rejected"],
                        "ref_chosen": ref[pid]["chosen"],
                        "ref_rejected": ref[pid]["rejected"],
                        "chosen_len": r["chosen_len"],
                        "rejected_len": r["rejected_len"],
                    }
                )
            if split == "eval":
                metrics = self._metrics(self._eval_tensors(split, per_pair))
                metrics["n_pairs"] = len(per_pair)
                self.tracker.log({"step": step, "split": "eval", **metrics})
                self.say(self._eval_line(step, metrics, [r for r in rows if r["split"] == "eval"]))
        self.tracker.table("pairs").append(rows)
        for cb in self.callbacks:
            cb.on_eval(self, self.state, metrics, rows)
        return metrics

    @staticmethod
    def _eval_line(step: int, m: dict[str, Any], rows: list[dict[str, Any]]) -> str:
        """One line per evaluation for the console or a job's log (the row itself is in metrics.jsonl)."""
        n = max(1, len(rows))
        d_c = sum(r["chosen"] - r["ref_chosen"] for r in rows) / n
        d_r = sum(r["rejected"] - r["ref_rejected"] for r in rows) / n
        return (
            f"eval step {step}: loss {m['loss']:.4f} | accuracy {m['rewards/accuracies']:.0%} | "
            f"margin {m['rewards/margins']:+.4g} | chosen {m['logps/chosen']:.2f} ({d_c:+.3g}) "
            f"rejected {m['logps/rejected']:.2f} ({d_r:+.3g}) nats | chosen fell {m['frac_chosen_fell']:.0%}"
        )

    # -- checkpoints ----------------------------------------------------------------------------

    _adapter_ckpt = False

    def _adapter_only_checkpoint(
        self, models: list[Any], weights: list[dict[str, Any]], output_dir: str
    ) -> None:
        """accelerate save-state hook: with LoRA keep only the trainable (adapter) tensors of the policy.

        The frozen base weights never change, so writing them at every checkpoint (gigabytes for a 7B
        model) buys nothing; resume loads the adapter over the base loaded from --model.
        """
        acc = self.accelerator
        policy = acc.unwrap_model(self.model)
        trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
        for i, m in enumerate(models):
            u = acc.unwrap_model(m)
            if i < len(weights) and (u is policy or getattr(u, "lm", None) is policy):
                weights[i] = {
                    k: v
                    for k, v in weights[i].items()
                    if (k[7:] if k.startswith("module.") else k) in trainable
                }

    def _check_adapter_checkpoint(self, ckpt: Path) -> None:
        """strict=False must not hide a checkpoint that lacks the adapter (a different LoRA layout)."""
        from safetensors import safe_open

        f = ckpt / "model.safetensors"
        if not f.is_file():
            return
        with safe_open(str(f), "pt") as h:
            keys = {k[7:] if k.startswith("module.") else k for k in h.keys()}
        policy = self.accelerator.unwrap_model(self.model)
        missing = sorted(n for n, p in policy.named_parameters() if p.requires_grad and n not in keys)
        if missing:
            raise RunDirError(
                f"{f}: lacks {len(missing)} adapter tensor(s) of this model (e.g. {missing[0]}); was --lora-rank "
                "or --lora-target-modules changed since the run started?"
            )

    def _ckpt_path(self, step: int) -> Path:
        from preflens.tracking import checkpoint_dir

        return checkpoint_dir(self.run_dir, step)

    def _save_checkpoint(self) -> Path:
        from preflens.tracking import checkpoint_dir, prune_checkpoints, save_checkpoint

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

    def _save_final(self) -> Path:
        acc = self.accelerator
        final = self.run_dir / "final"
        acc.wait_for_everyone()
        model = acc.unwrap_model(self.model)
        state_dict = acc.get_state_dict(self.model)
        if acc.is_main_process:
            model.save_pretrained(final, state_dict=state_dict, safe_serialization=True)
            self.tokenizer.save_pretrained(final)
            if self.mask_head is not None:
                from safetensors.torch import save_file

                head = acc.unwrap_model(self.mask_head)
                save_file(
                    {k: v.contiguous() for k, v in head.state_dict().items()},
                    str(final / "mask_head.safetensors"),
                )
        acc.wait_for_everyone()
        return final

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

    def setup(self) -> None:
        """Everything before step 1: accelerator, run dir, model, data, optimizer, reference pass."""
        import torch
        from accelerate.utils import set_seed
        from torch.utils.data import DataLoader
        from transformers import get_scheduler

        from preflens.data.collate import PairCollator, PairDataset
        from preflens.losses import get_loss, loss_hparams
        from preflens.tracking import DATA_REPORT_FILE, RunTracker, latest_checkpoint, write_config

        cfg = self.config
        self.accelerator = acc = self._make_accelerator()
        self._setup_run_dir()
        if cfg.resume:
            self._check_resumed_data_order()
        set_seed(cfg.seed)
        self.loss_fn = get_loss(cfg.loss, **self.loss_kwargs)
        self._loss_defaults = loss_hparams(cfg.loss)
        self._read_pairs()
        self._build_model()
        self._load_data()
        self._fell_tol = fell_tolerance(cfg.dtype, cfg.mixed_precision)

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
        batches_per_epoch = len(self.sampler)
        steps = cfg.steps or max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))
        self.state.max_steps = steps
        self.batches_per_epoch = batches_per_epoch

        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": params}]
        if self.mask_head is not None:
            groups.append({"params": list(self.mask_head.parameters())})
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
            # One fused kernel over all tensors (HF/TRL's default optimizer since torch 2.8): several times
            # faster than the per-tensor loop torch picks on a CPU (BENCHMARKS.md). DeepSpeed/FSDP: unfused.
            fused=acc.distributed_type.value in ("NO", "MULTI_CPU", "MULTI_GPU")
            and all(
                p.is_floating_point() and p.device.type in ("cpu", "cuda")
                for g in groups
                for p in g["params"]
            ),
        )
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * steps)
        self.scheduler = get_scheduler(
            cfg.scheduler, self.optimizer, num_warmup_steps=warmup, num_training_steps=steps
        )
        # Under DDP the module DDP wraps is `_lean_logps_module(model)`, so the policy forward keeps the
        # response-only unembedding; `self.model` stays the bare model (probes, saving, no-grad passes).
        self._ddp = None
        # Set by a callback that writes the parameter gradients itself (fused `--step-entanglement`):
        # autograd then skips them, so DDP's all-reduce hooks would never fire. The trainer keeps DDP
        # out of the step (no_sync) and all-reduces the gradients once after the last micro-batch.
        self.manual_grad_sync = False
        lean = self._ddp_like()
        first = _lean_logps_module(self.model) if lean else self.model
        objs = [first] + ([self.mask_head] if self.mask_head is not None else [])
        prepared = acc.prepare(*objs, self.optimizer, loader, self.scheduler)
        if self.mask_head is not None:
            self.mask_head = prepared[1]
        self.optimizer, self.train_loader, self.scheduler = prepared[-3:]
        if lean:
            self._ddp = prepared[0]
        else:
            self.model = prepared[0]
        acc.register_for_checkpointing(self.state)
        if _is_peft(acc.unwrap_model(self.model)):
            self._adapter_ckpt = True
            acc.register_save_state_pre_hook(self._adapter_only_checkpoint)

        self.tracker = RunTracker(self.run_dir, acc)
        resolved = {**cfg.to_dict(), "loss_kwargs_resolved": {**self._loss_defaults, **self.loss_kwargs}}
        resolved.update(num_processes=acc.num_processes, steps_resolved=steps, warmup_steps_resolved=warmup)
        self._last_saved = -1
        if cfg.resume:
            ckpt = latest_checkpoint(self.run_dir)
            # LoRA checkpoints hold the adapter only (the frozen base comes from --model)
            acc.load_state(str(ckpt), **({"strict": False} if self._adapter_ckpt else {}))
            if self._adapter_ckpt:
                self._check_adapter_checkpoint(Path(ckpt))
            if self.state.step > steps:
                raise RunDirError(f"{ckpt}: the run is at step {self.state.step}, beyond --steps {steps}")
            self._lr_from_schedule()
            self.tracker.resume_at(self.state.step)
            self._last_saved = self.state.step
            self.say(f"resumed from {ckpt} (step {self.state.step} of {steps})")
            if acc.is_main_process:  # the next plain --resume must read this length, not the first one
                write_config(self.run_dir, resolved)
        elif acc.is_main_process:
            write_config(self.run_dir, resolved)
            (self.run_dir / DATA_REPORT_FILE).write_text(json.dumps(self.data_reports, indent=2, default=str))
        if acc.log_with:
            hp = {k: v for k, v in resolved.items() if isinstance(v, (int, float, str, bool))}
            # on resume TensorBoard drops the events logged after the checkpoint (as metrics.jsonl does)
            kw = {"tensorboard": {"purge_step": self.state.step + 1}} if cfg.resume else {}
            acc.init_trackers("preflens", config=hp, init_kwargs=kw)
        if cfg.padding_free:
            self._check_padding_free()
        self._reference_pass()
        self._batches = self._micro_batches()

    def _check_resumed_data_order(self) -> None:
        """Refuse to resume with options that change which pairs each step sees.

        The checkpoint stores a data position (epoch, batches done) in the saved run's batch order; with
        another batch size, seed or length grouping that position points into a different order, and the
        run would silently skip some pairs and repeat others.
        """
        from preflens.tracking import CONFIG_FILE, read_config

        if not (self.run_dir / CONFIG_FILE).is_file():
            return
        saved = read_config(self.run_dir)
        changed = [
            f"--{k.replace('_', '-')} {getattr(self.config, k)!r} (the run used {saved[k]!r})"
            for k in _DATA_ORDER_OPTIONS
            if k in saved and saved[k] != getattr(self.config, k)
        ]
        if changed:
            raise RunDirError(
                f"{self.run_dir}: cannot resume with " + "; ".join(changed) + ": the checkpoint's data "
                "position counts batches of the saved order. Keep the run's values, or start a new run "
                "in another --output-dir."
            )

    def _lr_from_schedule(self) -> None:
        """After `load_state`, set the learning rate to what *this* run's schedule gives at the resumed step.

        The checkpoint restores the optimizer's lr as the saved run's schedule left it and the scheduler's
        step count, while the schedule itself (`--steps`, `--lr`, warm-up) is rebuilt from the current
        config. Unchanged, both agree and this is a no-op; extending a finished run (`--resume --steps
        N`) would otherwise apply the exhausted schedule's final lr (0 for linear decay) to the next step.
        """
        sched = getattr(self.scheduler, "scheduler", self.scheduler)  # accelerate's wrapper
        lambdas = getattr(sched, "lr_lambdas", None)
        if lambdas is None:  # not a LambdaLR (every transformers.get_scheduler schedule is one)
            return
        groups = self.optimizer.param_groups
        sched.base_lrs = [self.config.lr] * len(groups)
        lrs = [base * lam(sched.last_epoch) for base, lam in zip(sched.base_lrs, lambdas)]
        for group, lr in zip(groups, lrs):
            group["lr"] = lr
            group["initial_lr"] = self.config.lr
        sched._last_lr = lrs

    def _check_padding_free(self) -> None:
        """Refuse to train packed unless packing is exact for this model (`logprobs.check_padding_free`)."""
        import torch

        from preflens.data.collate import collate_pairs
        from preflens.logprobs import check_padding_free

        items = self.train_items[:4]
        batch = collate_pairs(items, self.tokenizer.pad_token_id)
        ids, am, rm = (
            batch[k].to(self.accelerator.device) for k in ("input_ids", "attention_mask", "response_mask")
        )
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                diffs = check_padding_free(self._forward_module(), ids, am, rm)
        finally:
            model.train(was_training)
        self.say(
            f"padding-free: packed log-probs match padded ones (largest difference {diffs['max_abs']:.2g}) "
            f"and stay isolated per sequence ({diffs['isolation']:.2g})"
        )

    def train(self) -> Path:
        """Run set-up, the loop and the final save; returns the run directory."""
        from tqdm.auto import tqdm

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
        pending: dict[str, Any] | None = None
        self._phase = "between"
        stack = contextlib.ExitStack()
        stack.enter_context(sigterm_as_interrupt())
        try:
            if state.step == 0:
                self.evaluate()
            while state.step < state.max_steps and not state.should_stop:
                out = self._train_step()
                col = out["stats"]
                metrics = self._step_metrics(out)
                batch_stats = {"per_pair": col, "metrics": metrics}
                log_now = self._log_now(state.step)
                pending = {"step": state.step, "split": "train", **metrics} if log_now else None
                self._last_step_out = None  # from here on `pending` holds the step's row
                for cb in self.callbacks:
                    extra = cb.on_step_end(self, state, batch_stats)
                    if extra:
                        metrics.update(extra)
                if log_now:
                    self.tracker.log({"step": state.step, "split": "train", **metrics})
                    pending = None
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", margin=f"{metrics['rewards/margins']:.3f}",
                                acc=f"{metrics['rewards/accuracies']:.2f}", refresh=False)  # fmt: skip
                done = state.step == state.max_steps or state.should_stop
                if (cfg.eval_every and state.step % cfg.eval_every == 0) or done:
                    self.evaluate()
                if (cfg.save_every and state.step % cfg.save_every == 0) or done:
                    self._save_checkpoint()
            if state.step == state.max_steps and self._last_saved != state.step:
                self._save_checkpoint()
        except KeyboardInterrupt:
            self._on_interrupt(pending)
            raise
        finally:
            stack.close()
            bar.close()
            self.tracker.flush()
        self._save_final()
        for cb in self.callbacks:
            cb.on_train_end(self, state)
        self.tracker.close()
        return self.run_dir


class Terminated(KeyboardInterrupt):
    """SIGTERM during training, handled as Ctrl-C (the last finished step is checkpointed)."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into `Terminated` while the loop runs.

    Why: cluster schedulers preempt (SLURM, Kubernetes), `timeout` and `kill` stop a run with SIGTERM,
    whose default action ends the process at once, losing every step since the last --save-every
    checkpoint. Raised in the loop, it takes Ctrl-C's path instead. Later SIGTERMs are ignored so they
    cannot cut that checkpoint short. Only the main thread can install handlers; elsewhere, nothing.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(
    config: TrainConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> Path:
    """Train per `config`; returns the run directory (see the module docstring for what it holds)."""
    return Trainer(config, model=model, tokenizer=tokenizer, callbacks=callbacks).train()
