"""`TrainConfig`: every option of `preflens train`, in one dataclass whose field docs are the CLI help.

Why its own module (as TRL keeps `DPOConfig` in `dpo_config.py`): the command builds its flags from these
fields without importing torch, the YAML reader (`config_file`) merges files into it, and the trainer only
reads it. Fields are grouped as the help shows them: what to train on, the loss, the model, optimization,
logging/evaluation/checkpoints. `resolve_loss_kwargs` turns the loss flags into `get_loss` keyword arguments,
refusing a flag the chosen loss does not take.

torch-free at import (the loss registry and transformers are imported inside `validate`, which runs once).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from preflens.errors import PreflensError, RunDirError

__all__ = ["TrainConfig", "LOSS_HPARAM_FIELDS", "DATA_ORDER_OPTIONS", "resolve_loss_kwargs"]

# Options that decide which pairs each step sees; a resumed run must keep them (checkpoint.check_data_order).
DATA_ORDER_OPTIONS = ("batch_size", "seed", "group_by_length")

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
    # weighted loss combinations, TRL's loss_weights (losses, issue 12)
    loss_weights: list | None = _opt(
        None,
        "Weights of a comma-separated --loss, as TRL's loss_weights: --loss sigmoid,bco_pair,sft "
        "--loss-weights 0.8,0.2,1 (default: 1 each).",
    )

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
    # --- FSDP2 (issue 14: training/fsdp.py)
    fsdp: bool = _opt(
        False,
        "Shard the policy with FSDP2 (torch fully_shard: one unit per decoder layer plus the root) across the "
        "processes of torchrun/accelerate launch, on CPUs (gloo) or GPUs; implied by an accelerate FSDP config.",
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
    report_to: str = _opt(  # trackers (issue 15: training/runtime.parse_report_to)
        "tensorboard",
        "Trackers, comma-separated: tensorboard (in <output_dir>/tb), wandb (<output_dir>/wandb; WANDB_MODE=offline "
        "keeps it local), mlflow (<output_dir>/mlruns unless MLFLOW_TRACKING_URI is set), or none. Every "
        "metrics.jsonl key k of split s is logged as s/k.",
    )
    probe_every: int = _opt(0, "Gradient-entanglement probes every N steps (0: off).")
    probe_pairs: int = _opt(
        8,
        "Pairs in the fixed probe set: the first ones of the eval split, filled up from train if it has fewer.",
    )
    step_entanglement: bool = _opt(
        False, "Log entanglement statistics of every training batch from the step's own backward."
    )
    # --- in-run attribution of likelihood displacement (issue 17: training/attribution.py)
    attribute_every: int = _opt(
        0,
        "Every N steps, attribute the update to the batch's pairs: each pair's first-order effect on each "
        "probe pair's chosen/rejected log-prob (attribution.parquet; 0: off).",
    )
    attribute_pairs: int = _opt(
        16, "Probe pairs for --attribute-every, chosen as --probe-pairs chooses its own."
    )
    attribute_optimizer: str = _opt(
        "sgd",
        "Attribution form: sgd (-lr <grad l_i, grad logp_j>, exact), or adam (also each pair's share of the "
        "AdamW update through the step's actual denominator; keeps the step's activations until the update).",
    )
    # --- bounded memory of the diagnostics above (issue 18: training/memory_plan.py)
    max_memory: str | None = _opt(
        None,
        "Peak extra memory --probe-every / --step-entanglement / --attribute-every may use, e.g. 6GB or 500MiB "
        "(default: half the free RAM / GPU memory); estimated before step 1: chunked to fit, or refused.",
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
        from preflens.losses import loss_names

        if not self.data:
            raise PreflensError("--data is required (a file, directory or hub id of preference pairs)")
        if not self.output_dir:
            raise PreflensError("--output-dir is required (where the run's results go)")
        try:  # one name, or TRL's list as NAME,NAME,... (issue 12)
            loss_names(self.loss)
        except PreflensError as exc:
            raise PreflensError(f"--loss: {exc}") from None
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
            "attribute_every",  # issue 17
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
        from preflens.training.runtime import parse_report_to  # issue 15: names and installed packages

        parse_report_to(self.report_to)
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
        kwargs = resolve_loss_kwargs(self)
        if self.step_entanglement:  # before anything loads: where its statistics would be wrong (issue 12)
            from preflens.training.probes import check_step_entanglement

            check_step_entanglement(self.loss, kwargs)


def resolve_loss_kwargs(config: TrainConfig) -> dict[str, Any]:
    """The keyword arguments for `get_loss(config.loss, **kw)`: the per-hparam flags plus `loss_kwargs`.

    Only hyper-parameters the loss accepts are passed; a flag that does not apply to the loss is an
    error (a silently ignored `--gamma 0.5` on DPO would be a wrong experiment).
    """
    from preflens.losses import loss_hparams

    accepted = loss_hparams(config.loss, options=True)  # with TRL's objective options (ld_alpha, ...)
    accepted.pop("loss_weights", None)  # its own option, --loss-weights (below)
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
    if config.loss_weights is not None:
        try:
            merged["loss_weights"] = [float(w) for w in config.loss_weights]
        except (TypeError, ValueError):
            raise PreflensError(f"--loss-weights must be numbers, got {config.loss_weights!r}") from None
        if len(merged["loss_weights"]) != len(config.loss.split(",")):
            raise PreflensError(
                f"--loss-weights has {len(merged['loss_weights'])} weights for --loss {config.loss} "
                f"({len(config.loss.split(','))} losses): give one each"
            )
    return merged
