"""`RFTConfig`: the hyper-parameters of reinforcement finetuning (`preflens rft`), and their checks.

Why its own file: the command's flags, the experiments and the loop (`preflens.training.rft`) all read
it; the fields are documented in groups here, once (as TRL keeps `DPOConfig` apart from its trainer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from preflens.data.prompts import PromptRow
from preflens.diagnostics.reward_std import GRAD_METHODS, SAMPLERS, check_sampling
from preflens.errors import PreflensError
from preflens.training.runtime import parse_report_to

__all__ = ["RFTConfig", "validate_rft_config"]


@dataclass
class RFTConfig:
    """Hyper-parameters of `preflens rft` (flag names match the fields)."""

    # --- the RLOO update ---
    steps: int = 100
    """RFT optimizer steps (after the initial SFT steps)."""
    k: int = 8
    """Samples per prompt (apple/ml-rlgrad use 10 for reward statistics)."""
    prompts_per_step: int = 8
    lr: float = 1e-6
    optimizer: str = "adamw"
    """`adamw`, or `sgd` (plain gradient steps: Adam's per-coordinate normalization rescales tiny
    gradients, which can partly hide the vanishing-gradient effect the theorem is about)."""
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    kl_coef: float = 0.0
    """Penalty on log pi - log pi_ref in the reward; pi_ref is the model when RFT starts (after SFT)."""

    # --- sampling ---
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    chat_template: bool | None = None

    # --- what counts as stuck (reward units) ---
    std_threshold: float = 0.1
    """A prompt's reward std below this (in reward units) counts as small."""
    low_reward: float | None = None

    # --- evaluations and checkpoints ---
    eval_every: int = 0
    """Evaluate (sample, score, gradient norms, no update) every N RFT steps; 0: start, after SFT, end."""
    eval_prompts: int | None = None
    """Evaluate on the first N prompts (None: all)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end and when a reward fails)."""

    # --- the initial SFT phase (Razin et al. 2024, arXiv 2310.20703: the remedy for small reward std) ---
    initial_sft: int = 0
    """SFT steps on the `reference` completions before RFT."""
    sft_fraction: float = 1.0
    """Fraction of the prompts (with a reference) used by the initial SFT phase."""
    sft_lr: float | None = None
    sft_batch_size: int = 8

    # --- randomness and gradient norms ---
    seed: int = 0
    grad_method: str = "auto"
    """How per-prompt gradient norms are computed: `auto` | `gram` (one batched backward with Gram
    hooks) | `loop` (one backward per prompt); see `reward_std.policy_gradient_norms`."""

    # --- trackers and the sampler ---
    report_to: str = "tensorboard"
    """Trackers, comma-separated: tensorboard, wandb, mlflow, or none (`runtime.parse_report_to`)."""
    sampler: str = "hf"
    """`hf` (transformers `generate`, batched, with the model's KV cache) or `vllm` (where it is installed;
    the policy's weights are loaded into the vLLM engine before each sampling)."""


def validate_rft_config(config: RFTConfig, rows: Sequence[PromptRow]) -> None:
    """Refuse settings with no meaning, naming the flag, before the run directory is touched."""
    if config.k < 2:
        raise PreflensError(
            f"-k must be >= 2 (RLOO baseline and reward std need two samples), got {config.k}"
        )
    if config.steps < 0 or config.initial_sft < 0:
        raise PreflensError("--steps and --initial-sft must be >= 0")
    if config.prompts_per_step < 1 or config.sft_batch_size < 1:
        raise PreflensError("--prompts-per-step and --sft-batch-size must be >= 1")
    if not 0 < config.sft_fraction <= 1:
        raise PreflensError(f"--sft-fraction must be in (0, 1], got {config.sft_fraction}")
    if config.optimizer not in ("adamw", "sgd"):
        raise PreflensError(f"--optimizer must be adamw or sgd, got {config.optimizer!r}")
    if config.grad_method not in GRAD_METHODS:
        raise PreflensError(f"--grad-method must be auto, loop or gram, got {config.grad_method!r}")
    if config.sampler not in SAMPLERS:
        raise PreflensError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {config.sampler!r}")
    parse_report_to(config.report_to)
    if config.max_new_tokens < 1:
        raise PreflensError("--max-new-tokens must be >= 1")
    check_sampling(temperature=config.temperature, top_p=config.top_p, std_threshold=config.std_threshold)
    for name, lr in (("--lr", config.lr), ("--sft-lr", config.sft_lr)):
        if lr is not None and not lr > 0:
            raise PreflensError(f"{name} must be > 0, got {lr}")
    if config.kl_coef < 0:
        raise PreflensError(
            f"--kl-coef must be >= 0 (a penalty on log pi - log pi_ref), got {config.kl_coef}: "
            "a negative value rewards moving away from the reference"
        )
    if config.initial_sft and not any(r.reference is not None for r in rows):
        raise PreflensError(
            "--initial-sft needs labelled completions: add a `reference` field to (some of) the prompts"
        )
