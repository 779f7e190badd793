"""`preflens reward-std`: which prompts will RFT fail to move? (seed 003, vanishing gradients).

Samples K completions per prompt, scores them, and writes per prompt the reward mean/std and the
norm of the RLOO policy-gradient estimate (`reward_std.parquet`), every sample (`samples.parquet`),
and `summary.json` (fractions of prompts with small std, low reward, both). Results are written after
every batch of prompts, so a reward that fails on prompt 900 keeps the first 899.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from preflens.commands import options as opt
from preflens.errors import PreflensError, RunDirError


def _load(name: str | None, device: str = "auto", dtype: str = "float32") -> tuple[Any, Any]:
    """Model + tokenizer through preflens.models (None: the embedded SmolLM2)."""
    from preflens.models import load_model

    return load_model(name, device=device, dtype=dtype)


def _write(out: Path, result: Any, summary: dict[str, Any]) -> None:
    import pandas as pd

    for name, rows in (("reward_std", result.rows), ("samples", result.samples)):
        df = pd.DataFrame(rows)
        if "prompt_id" in df:
            df["prompt_id"] = df["prompt_id"].astype(str)
        if name == "reward_std" and len(df) and summary.get("low_reward_threshold") is not None:
            # the prompts RFT is predicted to leave behind: small std AND low reward (seed 003, Finding I)
            df["low_reward"] = df["reward_mean"] < summary["low_reward_threshold"]
            df["flagged"] = df["small_std"] & df["low_reward"]
        tmp = out / f"{name}.parquet.tmp"
        df.to_parquet(tmp, index=False)
        os.replace(tmp, out / f"{name}.parquet")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def _saved(out: Path, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows and samples of a previous run in `out`, after checking it used `settings`."""
    import pandas as pd

    path = out / "summary.json"
    prev = json.loads(path.read_text()) if path.exists() else {}
    diff = [f"{k} {prev[k]!r} -> {v!r}" for k, v in settings.items() if k in prev and prev[k] != v]
    if diff:
        raise PreflensError(
            f"{out} was sampled with other settings ({'; '.join(diff)}); --resume needs the same ones "
            "(or pass --overwrite to start again)"
        )
    rows = pd.read_parquet(out / "reward_std.parquet").drop(
        columns=["low_reward", "flagged"], errors="ignore"
    )
    samples_path = out / "samples.parquet"
    samples = pd.read_parquet(samples_path).to_dict("records") if samples_path.exists() else []
    return rows.to_dict("records"), samples


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
) -> dict[str, Any]:
    """The command's work, callable from Python; returns the summary dict.

    `resume` continues a partial run in `output_dir` (stopped by a failing reward or Ctrl-C): its
    prompts are kept as saved and only the others are sampled, with the same settings (checked);
    the remaining prompts draw from a fresh random stream (seed + prompts done), so the numbers
    equal an uninterrupted run's in distribution, not bit for bit.
    """
    import torch

    from preflens.diagnostics.reward_std import (
        RewardStdResult,
        check_sampling,
        load_prompts,
        reward_std_diagnostic,
        summarize,
    )
    from preflens.rewards import RewardError, get_reward

    out = Path(output_dir)
    if overwrite and resume:
        raise PreflensError("--overwrite and --resume exclude each other: pick one")
    existing = (out / "reward_std.parquet").exists()
    if existing and not overwrite and not resume:
        raise RunDirError(
            f"{out} already holds reward_std.parquet; pass --resume to continue it (a partial run keeps "
            "its prompts) or --overwrite to replace it"
        )
    if k < 2:
        raise PreflensError(
            f"-k must be at least 2 (reward std and the RLOO baseline need two samples), got {k}"
        )
    # before the model is loaded: a typo costs no model load
    check_sampling(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        std_threshold=std_threshold,
    )
    rew = get_reward(reward)
    rows = load_prompts(
        prompts,
        need_reference=rew.needs_reference,
        prompt_field=prompt_field,
        reference_field=reference_field,
    )
    settings = {
        "reward": rew.name,
        "k": k,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
    }
    saved_rows: list[dict[str, Any]] = []
    saved_samples: list[dict[str, Any]] = []
    if resume and existing:
        saved_rows, saved_samples = _saved(out, settings)
        done = {str(r["prompt_id"]) for r in saved_rows}
        rows_all, rows = rows, [r for r in rows if str(r.prompt_id) not in done]
    else:
        rows_all = rows
    lm, tok = _load(model, device, dtype)
    from preflens.models import with_trainable_adapters

    lm = with_trainable_adapters(lm)  # a saved adapter (RUN/final): gradients over its LoRA matrices
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed + len(saved_rows))  # resumed: a fresh stream for the prompts left
    result = RewardStdResult(rows=saved_rows, samples=saved_samples)

    def summary(partial: bool) -> dict[str, Any]:
        s = summarize(
            result.rows, std_threshold=std_threshold, low_reward=low_reward, value_range=rew.value_range
        )
        return {
            **s,
            "partial": partial,
            **settings,
        }

    try:
        reward_std_diagnostic(
            lm,
            tok,
            rows,
            rew,
            k=k,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            chat_template=chat_template,
            compute_grad_norm=grad_norm,
            grad_method=grad_method,
            std_threshold=std_threshold,
            on_batch=lambda res: _write(out, res, summary(partial=True)),
            result=result,
        )
    except RewardError as exc:
        _write(out, result, summary(partial=True))
        raise RewardError(
            f"{exc}; results for the first {len(result.rows)} of {len(rows_all)} prompts are saved in {out} "
            "(fix the reward and rerun with --resume to do the rest)"
        ) from exc
    final = summary(partial=False)
    _write(out, result, final)
    return final


def _print(summary: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

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
    import pandas as pd

    df = pd.read_parquet(out / "reward_std.parquet")
    if "flagged" in df and df["flagged"].any():
        flagged = df[df["flagged"]].sort_values("reward_mean").head(5)
        console.print(
            f"{int(df['flagged'].sum())} prompts flagged (small std and low reward), lowest reward first:"
        )
        for _, r in flagged.iterrows():
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
    ) -> None:
        """Per-prompt reward mean/std and expected policy-gradient norm; flags prompts RFT cannot move."""
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
        )
        _print(summary, output_dir)
