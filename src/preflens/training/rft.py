"""Reinforcement finetuning (REINFORCE with a leave-one-out baseline, RLOO) that tracks reward std.

Why this module exists (Razin et al. 2024, "Vanishing Gradients in Reinforcement Finetuning of Language
Models", arXiv 2310.20703, ICLR 2024): policy-gradient finetuning stalls on prompts whose reward has a
small standard deviation under the model, because ||grad V_x|| = O(STD[r]^(2/3)). TRL's RLOO/GRPO
trainers log a batch-level reward std; here every step records, *per prompt*, the reward mean and std
and the norm of the prompt's policy-gradient estimate, so the stall is visible prompt by prompt, and an
optional short initial SFT phase (the paper's remedy: a few SFT steps on a small number of labelled
samples) can be compared before/after.

The loop, read top to bottom in `RFTRun.run`:

    evaluate("init")                      # sample K, score, per-prompt gradient norms, no update
    while step < initial_sft: sft_step    # then save RUN/sft and evaluate("after_sft")
    while step < initial_sft + steps: rft_step, every eval_every steps evaluate("rft")
    evaluate("final"); checkpoint

Each step and evaluation runs `guarded`: a failing reward or Ctrl-C/SIGTERM before the parameter update
rewinds the step (`preflens.training.runtime.StepGuard`: data position, RNG, gradients) and checkpoints
the last finished one, so `resume=True` continues as if uninterrupted. The step math is
`preflens.training.rft_steps`, the hyper-parameters `preflens.training.rft_config`.

Run directory (like `preflens train`, through preflens.tracking): `config.yaml`, `metrics.jsonl` (keys:
step, split, phase, reward/mean, reward/std, frac_small_std, grad_norm, kl, loss, lr), `prompts.parquet`
(step, split, phase, prompt_id, reward_mean, reward_std, grad_norm; evaluation rows also the prompt),
`samples.parquet` (every evaluation's completions: step, split, phase, prompt_id, sample, completion,
reward), `evals.json`, `checkpoints/step-N/`
(accelerate save_state: model, optimizers, RNG, loop position), `sft/` (the model after the initial SFT
phase), `reference_model.pt` (with a KL penalty), `final/`, `summary.json`, and the `--report-to` trackers'
files: `tb/` (TensorBoard), `wandb/`, `mlruns/` (MLflow's local store).
Single process for now: the per-prompt backward passes bypass DDP's gradient hooks.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preflens.data.prompts import PromptRow, encode_prompt, load_prompts
from preflens.diagnostics.reward_std import make_sampler, reward_std_diagnostic, summarize
from preflens.errors import PreflensError, RunDirError
from preflens.models import with_trainable_adapters
from preflens.rewards import Reward, RewardError, get_reward
from preflens.tracking import (
    RunTracker,
    checkpoint_dir,
    latest_checkpoint,
    prepare_run_dir,
    save_checkpoint,
    write_config,
)
from preflens.training.rft_config import RFTConfig, validate_rft_config
from preflens.training.rft_steps import LoopState, rft_step, sft_step
from preflens.training.runtime import (
    StepGuard,
    init_trackers,
    make_accelerator,
    seed_everything,
    sigterm_as_interrupt,
)

__all__ = [
    "RFTConfig",
    "RFTRun",
    "train_rft",
    "rft_from_files",
    "prepare_run_dir",
    "latest_checkpoint",
    "REFERENCE_FILE",
]

REFERENCE_FILE = "reference_model.pt"
SAMPLER_NOTES = {
    "hf": "transformers generate, batched, KV cache",
    "vllm": "vLLM, the policy's weights loaded before each sampling",
}
EVALS_FILE = "evals.json"


def _pct(x: float | None) -> str:
    """A fraction as a percentage; n/a when undefined (see `summarize`: all means equal, no range)."""
    return "n/a (pass --low-reward)" if x is None else f"{x:.1%}"


class RFTRun:
    """One reinforcement-finetuning run: its model and optimizers, run directory, position and logs.

    `__init__` sets everything up (run directory, Accelerator, optimizers, resume from the latest
    checkpoint); `run()` does the loop and returns the summary. One object per run, not reusable.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        rows: list[PromptRow],
        reward: Reward,
        config: RFTConfig,
        output_dir: str | Path,
        *,
        resume: bool = False,
        overwrite: bool = False,
        extra_config: dict[str, Any] | None = None,
        log_fn: Callable[[str], None] | None = None,
    ) -> None:
        validate_rft_config(config, rows)
        self.run_dir = Path(output_dir)
        prepare_run_dir(self.run_dir, overwrite=overwrite, resume=resume)
        self.tokenizer, self.rows, self.reward, self.config = tokenizer, rows, reward, config
        self.resume = resume
        self.say: Callable[[str], None] = log_fn or (lambda msg: None)

        self.accelerator = make_accelerator(self.run_dir, report_to=config.report_to)
        if self.accelerator.num_processes > 1:
            raise PreflensError(
                "preflens rft runs in a single process (launch it without accelerate/torchrun)"
            )
        if not resume:
            seed_everything(config.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        opt_cls = torch.optim.SGD if config.optimizer == "sgd" else torch.optim.AdamW
        opt_sft = opt_cls(params, lr=config.sft_lr or config.lr, weight_decay=config.weight_decay)
        opt_rft = opt_cls(params, lr=config.lr, weight_decay=config.weight_decay)
        self.model, self.opt_sft, self.opt_rft = self.accelerator.prepare(model, opt_sft, opt_rft)
        self.state = LoopState()
        self.accelerator.register_for_checkpointing(self.state)
        self.tracker = RunTracker(self.run_dir, self.accelerator)
        if resume:
            self._load_checkpoint()
        self._start_logs(extra_config or {})

        self.device = self.accelerator.device
        self.encoded = [encode_prompt(tokenizer, r.prompt, config.chat_template, r.messages) for r in rows]
        self.eval_rows = rows[: config.eval_prompts] if config.eval_prompts else rows
        self.sft_pool = self._sft_pool()
        self.total = config.initial_sft + config.steps
        self.evals: dict[str, dict[str, Any]] = _load_evals(self.run_dir, self.state.step) if resume else {}
        self.ref_model: nn.Module | None = None
        self.guard = StepGuard([self.opt_sft, self.opt_rft])
        self.sampler = make_sampler(
            config.sampler, self.accelerator.unwrap_model(self.model), tokenizer, seed=config.seed
        )
        self.say(f"sampler: {config.sampler} ({SAMPLER_NOTES[config.sampler]}); trackers: {config.report_to}")

    # ----- set-up -----

    def _load_checkpoint(self) -> None:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            raise RunDirError(f"{self.run_dir}: no checkpoints/step-N to resume from")
        self.accelerator.load_state(str(ckpt))
        self.tracker.resume_at(self.state.step, tables=("prompts", "samples"))
        self.say(f"resumed from {ckpt} (step {self.state.step})")

    def _start_logs(self, extra_config: dict[str, Any]) -> None:
        """config.yaml (a new run only) and the --report-to trackers with the scalar settings."""
        cfg = {
            **asdict(self.config),
            **extra_config,
            "reward": self.reward.name,
            "num_prompts": len(self.rows),
        }
        if not self.resume:
            write_config(self.run_dir, cfg)
        step = self.state.step if self.resume else None
        init_trackers(self.accelerator, "preflens-rft", cfg, self.run_dir, resume_step=step)

    def _sft_pool(self) -> list[int]:
        """The prompts the initial SFT phase trains on: a seeded `sft_fraction` of those with a reference."""
        config = self.config
        with_ref = [i for i, r in enumerate(self.rows) if r.reference is not None]
        n_sft = max(1, math.ceil(config.sft_fraction * len(with_ref))) if config.initial_sft else 0
        chosen = torch.randperm(len(with_ref), generator=torch.Generator().manual_seed(config.seed))[:n_sft]
        return sorted(with_ref[i] for i in chosen)

    # ----- the loop -----

    def run(self) -> dict[str, Any]:
        """Initial evaluation, SFT phase, RFT phase, final evaluation; then RUN/final and the summary."""
        try:
            with sigterm_as_interrupt():  # SIGTERM (preemption, timeout, kill) takes Ctrl-C's path
                self._loop()
        finally:
            self.tracker.close()
        final_dir = self.run_dir / "final"
        self.accelerator.unwrap_model(self.model).save_pretrained(final_dir)
        self.tokenizer.save_pretrained(final_dir)
        summary = _summary(self.evals, self.config)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _loop(self) -> None:
        """The phases in order; a resumed run skips what its checkpoint and `evals.json` already hold."""
        config, state = self.config, self.state
        if state.step == 0:
            self.guarded("the initial evaluation", self.evaluate, "init")
        self.model.train()
        while state.step < config.initial_sft:
            self.sft_step()
        # outside the loop so that a run resumed right after SFT (e.g. the reward failed here) still does it
        if config.initial_sft and "after_sft" not in self.evals:
            self.guarded("the post-SFT evaluation", self.evaluate, "after_sft")
        if config.kl_coef > 0:
            self.ref_model = self._reference_model()
        done = state.step - config.initial_sft
        if self.resume and self._eval_due(done) and done > 0 and f"rft-{state.step}" not in self.evals:
            self.guarded("an evaluation", self.evaluate, "rft")  # an interrupt cut this evaluation short
        while state.step < self.total:
            self.rft_step()
        final = self.evals.get("final")
        if final is None or final["step"] != state.step:
            self.guarded("the final evaluation", self.evaluate, "final")
        self.checkpoint()

    def _eval_due(self, rft_done: int) -> bool:
        """Whether an evaluation follows the `rft_done`-th RFT step (none after the last one: `final`)."""
        every = self.config.eval_every
        return bool(every) and rft_done % every == 0 and self.state.step < self.total

    def sft_step(self) -> None:
        """One initial-SFT step, logged; RUN/sft after the last one."""
        loss, gnorm = self.guarded(
            "an SFT step",
            sft_step,
            self.model,
            self.tokenizer,
            self.rows,
            self.encoded,
            self.sft_pool,
            self.state,
            self.config,
            self.opt_sft,
            self.device,
        )
        self.state.step += 1
        lr = self.opt_sft.param_groups[0]["lr"]
        row = {"step": self.state.step, "split": "train", "phase": "sft", "loss": loss, "grad_norm": gnorm}
        self.tracker.log({**row, "lr": lr})
        if self.state.step == self.config.initial_sft:
            self.accelerator.unwrap_model(self.model).save_pretrained(self.run_dir / "sft")
        self._maybe_checkpoint()

    def rft_step(self) -> None:
        """One RLOO step, logged (metrics row and per-prompt rows); an evaluation when one is due."""
        metrics, prompt_rows = self.guarded(
            "RFT sampling/scoring",
            rft_step,
            self.model,
            self.tokenizer,
            self.rows,
            self.encoded,
            self.state,
            self.config,
            self.opt_rft,
            self.reward,
            self.ref_model,
            self.device,
            self.sampler,
        )
        self.state.step += 1
        where = {"step": self.state.step, "split": "train", "phase": "rft"}
        self.tracker.log({**where, **metrics})
        self._log_prompts([{**where, **r} for r in prompt_rows])
        if self._eval_due(self.state.step - self.config.initial_sft):
            self.guarded("an evaluation", self.evaluate, "rft")
        self._maybe_checkpoint()

    # ----- evaluations -----

    def evaluate(self, phase: str) -> None:
        """Sample K per evaluation prompt, score, per-prompt gradient norms (no update); log and keep."""
        config, step = self.config, self.state.step
        res = reward_std_diagnostic(
            self.accelerator.unwrap_model(self.model),
            self.tokenizer,
            self.eval_rows,
            self.reward,
            k=config.k,
            batch_size=config.prompts_per_step,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            chat_template=config.chat_template,
            std_threshold=config.std_threshold,
            grad_method=config.grad_method,
            sampler=self.sampler,
        )
        low, low_from = self._low_reward_bar()
        summ = summarize(
            res.rows,
            std_threshold=config.std_threshold,
            low_reward=low,
            value_range=self.reward.value_range,
            low_reward_from=low_from,
        )
        self.tracker.log(
            {
                "step": step,
                "split": "eval",
                "phase": phase,
                "reward/mean": summ["reward_mean"],
                "reward/std": summ["reward_std_mean"],
                "frac_small_std": summ["frac_small_std"],
                "frac_small_std_and_low_reward": summ["frac_small_std_and_low_reward"],
                "grad_norm": sum(r["grad_norm"] for r in res.rows) / len(res.rows),
            }
        )
        columns = ("prompt_id", "prompt", "reward_mean", "reward_std", "grad_norm")
        where = {"step": step, "split": "eval", "phase": phase}
        self._log_prompts([{**where, **{c: r[c] for c in columns}} for r in res.rows])
        self.tracker.table("samples").append(  # the evaluation's completions (the report's examples)
            {
                **where,
                **{c: s[c] for c in ("sample", "completion", "reward")},
                "prompt_id": str(s["prompt_id"]),
            }
            for s in res.samples
        )
        key = f"rft-{step}" if phase == "rft" else phase
        self.evals[key] = {"step": step, "phase": phase, **{k: v for k, v in summ.items() if k != "note"}}
        (self.run_dir / EVALS_FILE).write_text(json.dumps(self.evals, indent=2))
        self.say(
            f"[{phase} @ step {step}] reward {summ['reward_mean']:.4f}  "
            f"small-std {summ['frac_small_std']:.1%}  small-std & low reward {_pct(summ['frac_small_std_and_low_reward'])}"
        )

    def _low_reward_bar(self) -> tuple[float | None, str | None]:
        """The "low reward" threshold of this evaluation and where it comes from (None: `summarize` picks).

        A median threshold is relative to the evaluation it comes from: recomputed at every evaluation,
        "small std & low reward" before and after SFT would be measured against different bars. The
        first evaluation that defines one keeps it for the run.
        """
        if self.config.low_reward is not None or self.reward.value_range is not None:
            return self.config.low_reward, None
        for ph, ev in sorted(self.evals.items(), key=lambda kv: kv[1]["step"]):
            if ev.get("low_reward_threshold") is not None:
                where = f"the {ph} evaluation (step {ev['step']})"
                return ev[
                    "low_reward_threshold"
                ], f"median of the per-prompt mean rewards at {where}, kept for the run"
        return None, None

    # ----- logs, checkpoints, the KL reference -----

    def _log_prompts(self, rows: list[dict[str, Any]]) -> None:
        # ids as strings: one parquet column type whatever the jsonl held
        self.tracker.table("prompts").append({**r, "prompt_id": str(r["prompt_id"])} for r in rows)

    def checkpoint(self) -> None:
        """Flush the logs and save checkpoints/step-N (atomically) for the step just finished."""
        self.tracker.flush()
        save_checkpoint(self.accelerator, checkpoint_dir(self.run_dir, self.state.step))

    def _maybe_checkpoint(self) -> None:
        if self.config.save_every and self.state.step % self.config.save_every == 0:
            self.checkpoint()

    def _reference_model(self) -> nn.Module:
        """The KL reference: a frozen copy of the model when RFT starts (after the initial SFT, if any).

        Its weights are also saved in `reference_model.pt` (a plain state dict, so this works for any
        module: full models, peft adapters, tied embeddings) so that a run resumed after RFT started,
        whose weights came from a checkpoint, finds the same reference.
        """
        ref = copy.deepcopy(self.accelerator.unwrap_model(self.model))
        path = self.run_dir / REFERENCE_FILE
        if self.state.step > self.config.initial_sft:
            if not path.exists():
                raise RunDirError(f"{path}: the KL reference model of this run is missing; cannot resume")
            ref.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            torch.save({k: v.detach().cpu() for k, v in ref.state_dict().items()}, path)
        return ref.to(self.device).eval().requires_grad_(False)

    # ----- failures and interrupts -----

    def guarded(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one step (or evaluation) `fn(*args)` so that a failure or Ctrl-C loses nothing already done.

        A broken reward saves logs + a checkpoint of the last good step before the error. Ctrl-C (or
        SIGTERM, turned into the same) before the parameter update rewinds the step (data position,
        RNG, gradients) and checkpoints the last finished step, so `--resume` continues as if
        uninterrupted; during or after the update the last saved checkpoint stays the resume point.
        """
        self.guard.begin(self.state.state_dict())
        try:
            result = fn(*args)
        except KeyboardInterrupt:
            if self.guard.updating:
                self.say(
                    f"interrupted during the update of step {self.state.step + 1}: resume from the last checkpoint"
                )
                raise
            self._rewind()
            if self.state.step:
                self.checkpoint()
                self.say(
                    f"interrupted during {what}: saved checkpoints/step-{self.state.step}; continue with --resume"
                )
            else:
                self.tracker.flush()
            raise
        except RewardError as exc:
            self._rewind()  # the checkpoint replays the failed step's prompts and sampling on resume
            saved = "" if self.state.step == 0 else f" and checkpoints/step-{self.state.step}"
            if self.state.step:
                self.checkpoint()
            else:
                self.tracker.flush()
            raise RewardError(
                f"{exc} [during {what} at step {self.state.step + 1}; the logs{saved} in {self.run_dir} keep "
                "everything computed so far; fix the reward and rerun with --resume]"
            ) from exc
        self.guard.end()
        return result

    def _rewind(self) -> None:
        """Back to where the guarded step began: gradients zeroed, RNG and data position restored."""
        self.state.load_state_dict(self.guard.rewind())


def train_rft(
    model: nn.Module,
    tokenizer: Any,
    rows: list[PromptRow],
    reward: Reward,
    config: RFTConfig,
    output_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    extra_config: dict[str, Any] | None = None,
    log_fn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (optionally) `config.initial_sft` SFT steps, then `config.steps` RLOO steps; return the summary.

    Evaluations (all or `eval_prompts` prompts: sample K, score, per-prompt gradient norms, no update)
    run at step 0 (`phase=init`), after SFT (`after_sft`), every `eval_every` RFT steps (`rft`) and at
    the end (`final`). A reward that raises/returns garbage stops the run with a `RewardError` naming the
    prompt, after saving the logs and a checkpoint of the last completed step (resume with `resume=True`).
    """
    return RFTRun(
        model,
        tokenizer,
        rows,
        reward,
        config,
        output_dir,
        resume=resume,
        overwrite=overwrite,
        extra_config=extra_config,
        log_fn=log_fn,
    ).run()


def rft_from_files(
    *,
    load_model: Callable[[], tuple[Any, Any]],
    prompts: Path,
    reward: str,
    output_dir: Path,
    config: RFTConfig,
    resume: bool = False,
    overwrite: bool = False,
    prompt_field: str = "prompt",
    reference_field: str = "reference",
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    extra_config: dict[str, Any] | None = None,
    log_fn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """`preflens rft`'s work: a reward spec and a prompts file (`load_prompts`'s `*_field` columns).

    The reward, the prompts and the run directory are checked before `load_model` is called (a typo
    costs no model load). `lora_rank` > 0 trains LoRA adapters on all linear layers (alpha = 2 x rank by
    default, as `preflens train --lora-rank`); a saved adapter (RUN/final) is trained further as it is.
    """
    rew = get_reward(reward)
    rows = load_prompts(
        prompts,
        need_reference=rew.needs_reference,
        prompt_field=prompt_field,
        reference_field=reference_field,
    )
    # check the run dir before loading a model (fail fast); train_rft re-checks it
    out = Path(output_dir)
    if not resume and not overwrite and out.exists() and any(out.iterdir()):
        prepare_run_dir(out, overwrite=False, resume=False)
    lm, tok = load_model()
    lm = with_trainable_adapters(lm, lora_rank or 0, lora_alpha or None)
    files = {
        "prompts": str(prompts),
        "prompt_field": prompt_field,
        "reference_field": reference_field,
        "lora_rank": lora_rank,
        "lora_alpha": lora_alpha,
    }
    return train_rft(
        lm,
        tok,
        rows,
        rew,
        config,
        out,
        resume=resume,
        overwrite=overwrite,
        extra_config={**(extra_config or {}), **files},
        log_fn=log_fn,
    )


def _load_evals(run_dir: Path, step: int) -> dict[str, dict[str, Any]]:
    """Evaluations logged up to the resumed checkpoint's step (later ones will be redone)."""
    path = run_dir / EVALS_FILE
    evals = json.loads(path.read_text()) if path.exists() else {}
    return {ph: ev for ph, ev in evals.items() if ev["step"] <= step}


def _summary(evals: dict[str, dict[str, Any]], config: RFTConfig) -> dict[str, Any]:
    """Before/after numbers: how the small-std fraction and the reward moved through SFT and RFT."""
    out: dict[str, Any] = {"evals": evals}
    for key in ("frac_small_std", "frac_small_std_and_low_reward", "reward_mean"):
        out[key] = {ph: ev[key] for ph, ev in evals.items() if key in ev}
    if config.initial_sft and "init" in evals and "after_sft" in evals:
        out["sft_effect"] = {
            "frac_small_std_before": evals["init"]["frac_small_std"],
            "frac_small_std_after": evals["after_sft"]["frac_small_std"],
            "reward_mean_before": evals["init"]["reward_mean"],
            "reward_mean_after": evals["after_sft"]["reward_mean"],
        }
    return out
