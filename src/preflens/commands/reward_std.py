"""`preflens reward-std`: which prompts will RFT fail to move? (vanishing gradients; Razin et al. 2024,
arXiv 2310.20703).

Samples K completions per prompt, scores them, and writes per prompt the reward mean/std and the
norm of the RLOO policy-gradient estimate (`reward_std.parquet`), every sample (`samples.parquet`),
and `summary.json` (fractions of prompts with small std, low reward, both). Results are written after
every batch of prompts, so a reward that fails on prompt 900 keeps the first 899. The work is
`preflens.diagnostics.reward_std_run.run_reward_std_dir`; this module is flags -> that call -> a table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from preflens.commands import options as opt

SAMPLER = typer.Option(
    "hf",
    "--sampler",
    help="hf (transformers generate, batched, KV cache) | vllm (where vLLM is installed; needs a GPU)",
)
"""`--sampler`, shared with `preflens rft`."""


def _load(name: str | None, device: str = "auto", dtype: str = "float32") -> tuple[Any, Any]:
    """Model + tokenizer through preflens.models (None: the embedded SmolLM2)."""
    from preflens.models import load_model

    return load_model(name, device=device, dtype=dtype)


def run_reward_std(
    *,
    model: str | None,
    prompts: Path,
    reward: str,
    k: int = 8,
    output_dir: Path,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    std_threshold: float = 0.1,
    low_reward: float | None = None,
    chat_template: bool | None = None,
    grad_norm: bool = True,
    grad_method: str = "auto",
    device: str = "auto",
    dtype: str = "float32",
    overwrite: bool = False,
    prompt_field: str = "prompt",
    reference_field: str = "reference",
    resume: bool = False,
    sampler: str = "hf",
    max_memory: int | None = None,
) -> dict[str, Any]:
    """The command's work, callable from Python; returns the summary dict (see `run_reward_std_dir`:
    `resume` continues a partial run with the same settings)."""
    from preflens.diagnostics.reward_std_run import run_reward_std_dir

    return run_reward_std_dir(
        load_model=lambda: _load(model, device, dtype),
        prompts=prompts,
        reward=reward,
        output_dir=output_dir,
        k=k,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        std_threshold=std_threshold,
        low_reward=low_reward,
        chat_template=chat_template,
        grad_norm=grad_norm,
        grad_method=grad_method,
        overwrite=overwrite,
        prompt_field=prompt_field,
        reference_field=reference_field,
        resume=resume,
        sampler=sampler,
        max_memory=max_memory,
    )


def _print(summary: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from preflens.diagnostics.reward_std_run import flagged_prompts

    console = Console()
    t = Table(
        title=f"reward std over {summary['num_prompts']} prompts (K={summary['k']}, reward {summary['reward']})"
    )
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("mean reward", f"{summary['reward_mean']:.4f}")
    t.add_row("mean per-prompt reward std", f"{summary['reward_std_mean']:.4f}")
    t.add_row(f"small std (< {summary['std_threshold']})", f"{summary['frac_small_std']:.1%}")
    if summary["low_reward_threshold"] is None:  # every prompt has the same mean and no range is known
        t.add_row("low reward", "n/a: all means equal; pass --low-reward")
        t.add_row("small std AND low reward", "n/a")
    else:
        t.add_row(
            f"low reward (< {summary['low_reward_threshold']:.4g})", f"{summary['frac_low_reward']:.1%}"
        )
        t.add_row("small std AND low reward", f"{summary['frac_small_std_and_low_reward']:.1%}")
    for key, label in (
        ("grad_norm_median_small_std", "median grad norm, small std"),
        ("grad_norm_median_other", "median grad norm, others"),
    ):
        if summary.get(key) is not None:
            t.add_row(label, f"{summary[key]:.4g}")
    console.print(t)
    count, lowest = flagged_prompts(out, limit=5)
    if count:
        console.print(f"{count} prompts flagged (small std and low reward), lowest reward first:")
        for r in lowest:
            text = r["prompt"] if len(r["prompt"]) <= 70 else r["prompt"][:67] + "..."
            console.print(
                f"  id {r['prompt_id']}: reward {r['reward_mean']:.3f}, std {r['reward_std']:.3f}, "
                f"||g|| {r['grad_norm']:.2e}  {text!r}"
            )
    console.print(f"[dim]{summary['note']}[/dim]")
    console.print(f"wrote {out}/reward_std.parquet, samples.parquet, summary.json")


def register(app: typer.Typer) -> None:
    @app.command("reward-std")
    def reward_std(
        prompts: Path = opt.PROMPTS,
        prompt_field: str = opt.PROMPT_FIELD,
        reference_field: str = opt.REFERENCE_FIELD,
        reward: str = opt.REWARD,
        model: str = opt.MODEL,
        k: int = typer.Option(8, "-k", "--k", help="samples per prompt (apple/ml-rlgrad use 10)"),
        output_dir: Path = typer.Option(Path("reward_std"), "--output-dir", "-o"),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
        temperature: float = typer.Option(1.0, "--temperature", help="1.0 samples from the model itself"),
        top_p: float = typer.Option(1.0, "--top-p"),
        seed: int = typer.Option(0, "--seed"),
        batch_size: int = typer.Option(8, "--batch-size", help="prompts per generation call"),
        std_threshold: float = typer.Option(
            0.1, "--std-threshold", help="reward std below this counts as small"
        ),
        low_reward: float = typer.Option(
            None,
            "--low-reward",
            help="mean reward below this counts as low (default: range midpoint or median)",
        ),
        chat_template: bool = opt.CHAT_TEMPLATE,
        grad_norm: bool = typer.Option(
            True, "--grad-norm/--no-grad-norm", help="also estimate ||grad V_x|| (one backward per prompt)"
        ),
        grad_method: str = typer.Option(
            "auto",
            "--grad-method",
            help="auto | gram (one batched backward) | loop (one backward per prompt)",
        ),
        device: str = typer.Option("auto", "--device", help="auto (a GPU if there is one) | cpu | cuda[:N]"),
        dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16 | auto"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace the results in --output-dir"),
        resume: bool = typer.Option(
            False, "--resume", help="continue a partial run in --output-dir (same settings): keep its prompts"
        ),
        sampler: str = SAMPLER,
        max_memory: str = opt.MAX_MEMORY,
    ) -> None:
        """Per-prompt reward mean/std and expected policy-gradient norm; flags prompts RFT cannot move."""
        budget = opt.parse_bytes(max_memory, "--max-memory")
        summary = run_reward_std(
            model=model,
            prompts=prompts,
            reward=reward,
            k=k,
            output_dir=output_dir,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            batch_size=batch_size,
            std_threshold=std_threshold,
            low_reward=low_reward,
            chat_template=chat_template,
            grad_norm=grad_norm,
            grad_method=grad_method,
            device=device,
            dtype=dtype,
            overwrite=overwrite,
            prompt_field=prompt_field,
            reference_field=reference_field,
            resume=resume,
            sampler=sampler,
            max_memory=budget,
        )
        _print(summary, output_dir)
