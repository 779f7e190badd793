"""What makes `--resume` exact for the preference trainer, beyond `tracking.save_checkpoint`'s atomic write.

- LoRA checkpoints hold the adapter only (`adapter_only_hook`): the frozen base never changes, so writing
  it at every checkpoint (gigabytes for a 7B model) buys nothing; resume loads the adapter over the base
  from --model, and `check_adapter_checkpoint` makes sure `strict=False` hides no missing adapter tensor.
- `check_data_order`: the saved data position counts batches of the saved order, so a resume with another
  batch size, seed or length grouping is refused instead of silently skipping and repeating pairs.
- `lr_from_schedule`: extending a finished run (`--resume --steps N`) uses the new schedule's lr.
- `save_final`: `final/` as `save_pretrained` (plus the learned mask head, if any).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from preflens.errors import RunDirError
from preflens.tracking import CONFIG_FILE, latest_checkpoint, read_config
from preflens.training.config import DATA_ORDER_OPTIONS, TrainConfig

__all__ = [
    "load_latest",
    "adapter_only_hook",
    "check_adapter_checkpoint",
    "check_data_order",
    "lr_from_schedule",
    "save_final",
]


def _strip_module(key: str) -> str:
    return key[7:] if key.startswith("module.") else key


def adapter_only_hook(accelerator: Any, policy_of: Any) -> Any:
    """An accelerate save-state pre-hook keeping only the trainable (adapter) tensors of the policy.

    `policy_of()` returns the prepared policy; the lean DDP wrapper (`distributed.lean_logps_module`)
    counts as the policy too.
    """

    def hook(models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
        policy = accelerator.unwrap_model(policy_of())
        trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
        for i, m in enumerate(models):
            u = accelerator.unwrap_model(m)
            if i < len(weights) and (u is policy or getattr(u, "lm", None) is policy):
                weights[i] = {k: v for k, v in weights[i].items() if _strip_module(k) in trainable}

    return hook


def check_adapter_checkpoint(ckpt: Path, policy: Any) -> None:
    """strict=False must not hide a checkpoint that lacks the adapter (a different LoRA layout)."""
    f = ckpt / "model.safetensors"
    if not f.is_file():
        return
    with safe_open(str(f), "pt") as h:
        keys = {_strip_module(k) for k in h.keys()}
    missing = sorted(n for n, p in policy.named_parameters() if p.requires_grad and n not in keys)
    if missing:
        raise RunDirError(
            f"{f}: lacks {len(missing)} adapter tensor(s) of this model (e.g. {missing[0]}); was --lora-rank "
            "or --lora-target-modules changed since the run started?"
        )


def load_latest(accelerator: Any, run_dir: Path, *, adapter_only: bool, policy: Any) -> Path:
    """`accelerator.load_state` of the newest complete checkpoint that can be read; LoRA checkpoints hold the
    adapter only (the frozen base comes from --model), checked to hold all of it.

    A checkpoint that cannot be read (a file truncated or overwritten after the atomic rename: a disk
    error, a copy cut short, a user's edit) is skipped with a warning naming it and the reason, and the one
    before it is loaded (load_state restores every part, so nothing of the skipped one survives); the
    metrics rows after the loaded step are dropped by the trainer's `resume_at`. A checkpoint of another
    model layout (`RunDirError`) is not skipped: it is the user's option that changed, not the file.
    """
    found = list(reversed(_complete_checkpoints(run_dir)))
    if not found:
        raise RunDirError(f"{run_dir}: nothing to resume (no complete checkpoints/step-N inside)")
    skipped: list[str] = []
    for ckpt in found:
        try:
            accelerator.load_state(str(ckpt), **({"strict": False} if adapter_only else {}))
            if adapter_only:
                check_adapter_checkpoint(ckpt, accelerator.unwrap_model(policy))
        except RunDirError:
            raise
        except Exception as exc:  # safetensors, torch.load, json: each raises its own type for a bad file
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            skipped.append(f"{ckpt} ({type(exc).__name__}: {reason})")
            warnings.warn(
                f"{ckpt}: cannot be read ({type(exc).__name__}: {reason}); resuming from the checkpoint "
                "before it",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        return ckpt
    raise RunDirError(f"{run_dir}: no checkpoint can be read: " + "; ".join(skipped))


def _complete_checkpoints(run_dir: Path) -> list[Path]:
    """checkpoints/step-N directories (no `.partial`), oldest first."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return []
    root = Path(latest).parent
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def check_data_order(run_dir: Path, config: TrainConfig) -> None:
    """Refuse to resume with options that change which pairs each step sees.

    The checkpoint stores a data position (epoch, batches done) in the saved run's batch order; with
    another batch size, seed or length grouping that position points into a different order, and the
    run would silently skip some pairs and repeat others.
    """
    if not (run_dir / CONFIG_FILE).is_file():
        return
    saved = read_config(run_dir)
    changed = [
        f"--{k.replace('_', '-')} {getattr(config, k)!r} (the run used {saved[k]!r})"
        for k in DATA_ORDER_OPTIONS
        if k in saved and saved[k] != getattr(config, k)
    ]
    if changed:
        raise RunDirError(
            f"{run_dir}: cannot resume with " + "; ".join(changed) + ": the checkpoint's data "
            "position counts batches of the saved order. Keep the run's values, or start a new run "
            "in another --output-dir."
        )


def lr_from_schedule(optimizer: Any, scheduler: Any, lr: float) -> None:
    """After `load_state`, set the learning rate to what *this* run's schedule gives at the resumed step.

    The checkpoint restores the optimizer's lr as the saved run's schedule left it and the scheduler's
    step count, while the schedule itself (`--steps`, `--lr`, warm-up) is rebuilt from the current
    config. Unchanged, both agree and this is a no-op; extending a finished run (`--resume --steps
    N`) would otherwise apply the exhausted schedule's final lr (0 for linear decay) to the next step.
    """
    sched = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper
    lambdas = getattr(sched, "lr_lambdas", None)
    if lambdas is None:  # not a LambdaLR (every transformers.get_scheduler schedule is one)
        return
    groups = optimizer.param_groups
    sched.base_lrs = [lr] * len(groups)
    lrs = [base * lam(sched.last_epoch) for base, lam in zip(sched.base_lrs, lambdas)]
    for group, value in zip(groups, lrs):
        group["lr"] = value
        group["initial_lr"] = lr
    sched._last_lr = lrs


def save_final(accelerator: Any, model: Any, tokenizer: Any, mask_head: Any, run_dir: Path) -> Path:
    """`run_dir/final`: the trained model or adapter and the tokenizer (all processes call this)."""
    acc = accelerator
    final = run_dir / "final"
    acc.wait_for_everyone()
    bare = acc.unwrap_model(model)
    state_dict = acc.get_state_dict(model)
    if acc.is_main_process:
        bare.save_pretrained(final, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(final)
        if mask_head is not None:
            head = acc.unwrap_model(mask_head)
            save_file(
                {k: v.contiguous() for k, v in head.state_dict().items()},
                str(final / "mask_head.safetensors"),
            )
    acc.wait_for_everyone()
    return final
