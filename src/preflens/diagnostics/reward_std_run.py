"""The reward-std diagnostic written to a directory: what `preflens reward-std` produces and resumes.

Why its own module: the in-memory diagnostic (`reward_std.reward_std_diagnostic`) knows nothing of
files; a run over a large prompt set needs more around it. Results are written after every batch of
prompts, so a reward that fails on prompt 900 keeps the first 899, and `resume=True` keeps them and
samples only the rest (with the same settings, checked). Output directory:

| file | content |
|---|---|
| `reward_std.parquet` | per prompt: reward mean/std, RLOO gradient norm, `small_std`, and when a low-reward bar is defined `low_reward` and `flagged` (small std AND low reward: the prompts RFT is predicted to leave behind; Razin et al. 2024, arXiv 2310.20703) |
| `samples.parquet` | every sample: completion, reward, log-prob, token count |
| `summary.json` | `summarize`'s fractions, the settings, and `partial` |
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from preflens.data.prompts import PromptRow, load_prompts
from preflens.diagnostics.reward_std import (
    RewardStdResult,
    check_sampler,
    check_sampling,
    make_sampler,
    reward_std_diagnostic,
    summarize,
)
from preflens.errors import PreflensError, RunDirError
from preflens.models import with_trainable_adapters
from preflens.rewards import RewardError, get_reward

__all__ = ["run_reward_std_dir", "write_reward_std", "flagged_prompts"]

ModelLoader = Callable[[], tuple[Any, Any]]
"""Called once, after every check passed: returns (model, tokenizer)."""


def write_reward_std(out: Path, result: RewardStdResult, summary: dict[str, Any]) -> None:
    """`reward_std.parquet`, `samples.parquet` (each replaced atomically) and `summary.json`."""
    for name, rows in (("reward_std", result.rows), ("samples", result.samples)):
        df = pd.DataFrame(rows)
        if "prompt_id" in df:
            df["prompt_id"] = df["prompt_id"].astype(str)
        if name == "reward_std" and len(df) and summary.get("low_reward_threshold") is not None:
            # the prompts RFT is predicted to leave behind: small std AND low reward
            # (Razin et al. 2024, arXiv 2310.20703)
            df["low_reward"] = df["reward_mean"] < summary["low_reward_threshold"]
            df["flagged"] = df["small_std"] & df["low_reward"]
        tmp = out / f"{name}.parquet.tmp"
        df.to_parquet(tmp, index=False)
        os.replace(tmp, out / f"{name}.parquet")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def _saved(out: Path, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows and samples of a previous run in `out`, after checking it used `settings`."""
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


def _check_output_dir(out: Path, *, overwrite: bool, resume: bool) -> bool:
    """Whether `out` already holds results; refuses to replace them unless asked."""
    if overwrite and resume:
        raise PreflensError("--overwrite and --resume exclude each other: pick one")
    existing = (out / "reward_std.parquet").exists()
    if existing and not overwrite and not resume:
        raise RunDirError(
            f"{out} already holds reward_std.parquet; pass --resume to continue it (a partial run keeps "
            "its prompts) or --overwrite to replace it"
        )
    return existing


def run_reward_std_dir(
    *,
    load_model: ModelLoader,
    prompts: Path,
    reward: str,
    output_dir: Path,
    k: int = 8,
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
    overwrite: bool = False,
    prompt_field: str = "prompt",
    reference_field: str = "reference",
    resume: bool = False,
    sampler: str = "hf",
    max_memory: int | None = None,
) -> dict[str, Any]:
    """Sample, score and measure every prompt of a prompts file into `output_dir`; returns the summary.

    Every setting, the reward spec and the prompts file are checked before `load_model` is called (a
    typo costs no model load). `resume` continues a partial run in `output_dir` (stopped by a failing
    reward or Ctrl-C): its prompts are kept as saved and only the others are sampled, with the same
    settings (checked); the remaining prompts draw from a fresh random stream (seed + prompts done), so
    the numbers equal an uninterrupted run's in distribution, not bit for bit. `sampler` (hf | vllm,
    `reward_std.make_sampler`) is recorded in summary.json.
    """
    out = Path(output_dir)
    existing = _check_output_dir(out, overwrite=overwrite, resume=resume)
    if k < 2:
        raise PreflensError(
            f"-k must be at least 2 (reward std and the RLOO baseline need two samples), got {k}"
        )
    check_sampling(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        std_threshold=std_threshold,
    )
    check_sampler(sampler)
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
        "sampler": sampler,
    }
    result = RewardStdResult(rows=[], samples=[])
    todo: list[PromptRow] = rows
    if resume and existing:
        result.rows, result.samples = _saved(out, settings)
        done = {str(r["prompt_id"]) for r in result.rows}
        todo = [r for r in rows if str(r.prompt_id) not in done]
    lm, tok = load_model()
    lm = with_trainable_adapters(lm)  # a saved adapter (RUN/final): gradients over its LoRA matrices
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed + len(result.rows))  # resumed: a fresh stream for the prompts left
    smp = make_sampler(sampler, lm, tok, seed=seed)

    def summary(partial: bool) -> dict[str, Any]:
        s = summarize(
            result.rows, std_threshold=std_threshold, low_reward=low_reward, value_range=rew.value_range
        )
        return {**s, "partial": partial, **settings}

    try:
        reward_std_diagnostic(
            lm,
            tok,
            todo,
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
            on_batch=lambda res: write_reward_std(out, res, summary(partial=True)),
            result=result,
            sampler=smp,
            max_memory=max_memory,
        )
    except RewardError as exc:
        write_reward_std(out, result, summary(partial=True))
        raise RewardError(
            f"{exc}; results for the first {len(result.rows)} of {len(rows)} prompts are saved in {out} "
            "(fix the reward and rerun with --resume to do the rest)"
        ) from exc
    final = summary(partial=False)
    write_reward_std(out, result, final)
    return final


def flagged_prompts(out: Path, limit: int = 5) -> tuple[int, list[dict[str, Any]]]:
    """How many prompts of `out/reward_std.parquet` are flagged, and the `limit` lowest-reward ones."""
    df = pd.read_parquet(Path(out) / "reward_std.parquet")
    if "flagged" not in df or not df["flagged"].any():
        return 0, []
    flagged = df[df["flagged"]].sort_values("reward_mean").head(limit)
    return int(df["flagged"].sum()), flagged.to_dict("records")
