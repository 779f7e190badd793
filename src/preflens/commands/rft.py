"""`preflens rft`: policy-gradient finetuning (RLOO) that tracks per-prompt reward std (vanishing
gradients; Razin et al. 2024, arXiv 2310.20703).

`--initial-sft N` runs N SFT steps on the prompts' `reference` completions (a `--sft-fraction` of
them) first, the paper's remedy for vanishing gradients; the summary reports the small-std fraction
before and after it. The work is `preflens.training.rft.rft_from_files`; this module is flags -> that
call -> a few printed lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from preflens.commands import options as opt
from preflens.commands.reward_std import SAMPLER

# RFTConfig's defaults, repeated here so that `preflens --help` does not import torch (a test checks they agree)
DEFAULTS: dict[str, Any] = {
    "steps": 100,
    "k": 8,
    "prompts_per_step": 8,
    "lr": 1e-6,
    "optimizer": "adamw",
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "kl_coef": 0.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "max_new_tokens": 64,
    "std_threshold": 0.1,
    "eval_every": 0,
    "save_every": 0,
    "initial_sft": 0,
    "sft_fraction": 1.0,
    "sft_batch_size": 8,
    "seed": 0,
    "grad_method": "auto",
    "report_to": "tensorboard",
    "sampler": "hf",
}


def _load(name: str | None) -> tuple[Any, Any]:
    from preflens.models import load_model

    return load_model(name)


def run_rft(
    *,
    model: str | None,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    prompts: Path,
    reward: str,
    output_dir: Path,
    resume: bool = False,
    overwrite: bool = False,
    prompt_field: str = "prompt",
    reference_field: str = "reference",
    **cfg: Any,
) -> dict[str, Any]:
    """The command's work, callable from Python: `cfg` holds `RFTConfig` fields; the `*_field`
    names pick the prompts file's columns (`load_prompts`); see `preflens.training.rft.rft_from_files`."""
    from preflens.training.rft import RFTConfig, rft_from_files

    return rft_from_files(
        load_model=lambda: _load(model),
        prompts=prompts,
        reward=reward,
        output_dir=output_dir,
        config=RFTConfig(**cfg),
        resume=resume,
        overwrite=overwrite,
        prompt_field=prompt_field,
        reference_field=reference_field,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        extra_config={"model": model},
        log_fn=typer.echo,
    )


def _pct(x: float | None) -> str:
    return "n/a (pass --low-reward)" if x is None else f"{x:.1%}"


def register(app: typer.Typer) -> None:
    @app.command("rft")
    def rft(
        prompts: Path = opt.PROMPTS,
        prompt_field: str = opt.PROMPT_FIELD,
        reference_field: str = opt.REFERENCE_FIELD,
        reward: str = opt.REWARD,
        output_dir: Path = typer.Option(..., "--output-dir", "-o", help="run directory"),
        model: str = opt.MODEL,
        lora_rank: int = typer.Option(
            0, "--lora-rank", help="LoRA rank on all linear layers; 0 trains all weights"
        ),
        lora_alpha: float = typer.Option(None, "--lora-alpha", help="LoRA alpha (default 2 x rank)"),
        steps: int = typer.Option(DEFAULTS["steps"], "--steps"),
        k: int = typer.Option(DEFAULTS["k"], "-k", "--k", help="samples per prompt"),
        prompts_per_step: int = typer.Option(DEFAULTS["prompts_per_step"], "--prompts-per-step"),
        lr: float = typer.Option(DEFAULTS["lr"], "--lr"),
        optimizer: str = typer.Option(DEFAULTS["optimizer"], "--optimizer", help="adamw | sgd"),
        weight_decay: float = typer.Option(DEFAULTS["weight_decay"], "--weight-decay"),
        max_grad_norm: float = typer.Option(
            DEFAULTS["max_grad_norm"], "--max-grad-norm", help="0 disables clipping"
        ),
        kl_coef: float = typer.Option(
            DEFAULTS["kl_coef"], "--kl-coef", help="KL penalty to the model at the start of RFT"
        ),
        temperature: float = typer.Option(DEFAULTS["temperature"], "--temperature"),
        top_p: float = typer.Option(DEFAULTS["top_p"], "--top-p"),
        max_new_tokens: int = typer.Option(DEFAULTS["max_new_tokens"], "--max-new-tokens"),
        chat_template: bool = opt.CHAT_TEMPLATE,
        std_threshold: float = typer.Option(DEFAULTS["std_threshold"], "--std-threshold"),
        low_reward: float = typer.Option(None, "--low-reward"),
        eval_every: int = typer.Option(
            DEFAULTS["eval_every"],
            "--eval-every",
            help="RFT steps between evaluations (0: start/after SFT/end)",
        ),
        eval_prompts: int = typer.Option(
            None, "--eval-prompts", help="evaluate on the first N prompts (default all)"
        ),
        save_every: int = typer.Option(DEFAULTS["save_every"], "--save-every"),
        initial_sft: int = typer.Option(
            DEFAULTS["initial_sft"], "--initial-sft", help="SFT steps on `reference` before RFT"
        ),
        sft_fraction: float = typer.Option(DEFAULTS["sft_fraction"], "--sft-fraction"),
        sft_lr: float = typer.Option(None, "--sft-lr", help="default: --lr"),
        sft_batch_size: int = typer.Option(DEFAULTS["sft_batch_size"], "--sft-batch-size"),
        seed: int = typer.Option(DEFAULTS["seed"], "--seed"),
        grad_method: str = typer.Option(
            DEFAULTS["grad_method"],
            "--grad-method",
            help="per-prompt gradient norms: auto | gram (one batched backward) | loop (one backward per prompt)",
        ),
        report_to: str = typer.Option(
            DEFAULTS["report_to"],
            "--report-to",
            help="trackers, comma-separated: tensorboard (RUN/tb), wandb (RUN/wandb; WANDB_MODE=offline keeps it "
            "local), mlflow (RUN/mlruns unless MLFLOW_TRACKING_URI is set), or none",
        ),
        sampler: str = SAMPLER,
        resume: bool = typer.Option(False, "--resume", help="continue from the run dir's latest checkpoint"),
        overwrite: bool = typer.Option(False, "--overwrite", help="delete an existing run dir first"),
    ) -> None:
        """Reinforcement finetuning (RLOO, optional KL and initial SFT) with per-prompt reward-std tracking."""
        from preflens.training.runtime import Terminated

        try:
            summary = run_rft(
                model=model,
                prompts=prompts,
                reward=reward,
                output_dir=output_dir,
                resume=resume,
                overwrite=overwrite,
                prompt_field=prompt_field,
                reference_field=reference_field,
                lora_rank=lora_rank,
                lora_alpha=lora_alpha,
                steps=steps,
                k=k,
                prompts_per_step=prompts_per_step,
                lr=lr,
                optimizer=optimizer,
                weight_decay=weight_decay,
                max_grad_norm=max_grad_norm or None,
                kl_coef=kl_coef,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                chat_template=chat_template,
                std_threshold=std_threshold,
                low_reward=low_reward,
                eval_every=eval_every,
                eval_prompts=eval_prompts,
                save_every=save_every,
                initial_sft=initial_sft,
                sft_fraction=sft_fraction,
                sft_lr=sft_lr,
                sft_batch_size=sft_batch_size,
                seed=seed,
                grad_method=grad_method,
                report_to=report_to,
                sampler=sampler,
            )
        except Terminated:  # SIGTERM: checkpointed like Ctrl-C; exit as a terminated process does
            raise typer.Exit(143) from None
        for phase, ev in summary["evals"].items():
            typer.echo(
                f"{phase:>9} (step {ev['step']}): reward {ev['reward_mean']:.4f}, small std {ev['frac_small_std']:.1%}, "
                f"small std & low reward {_pct(ev['frac_small_std_and_low_reward'])}"
            )
        typer.echo(f"wrote {output_dir}/metrics.jsonl, prompts.parquet, summary.json, final/")
