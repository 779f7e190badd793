"""Reinforcement finetuning (REINFORCE with a leave-one-out baseline, RLOO) that tracks reward std.

Why this module exists (seed 003; Razin et al., ICLR 2024): policy-gradient finetuning stalls on
prompts whose reward has a small standard deviation under the model, because ||grad V_x|| =
O(STD[r]^(2/3)). TRL's RLOO/GRPO trainers log a batch-level reward std; here every step records,
*per prompt*, the reward mean and std and the norm of the prompt's policy-gradient estimate, so the
stall is visible prompt by prompt, and an optional short initial SFT phase (the talk's fix: "a few
steps of SFT on a small number of labelled samples") can be compared before/after.

The update, for a batch of P prompts with K samples each (Kool et al. 2019; TRL RLOOTrainer):
    loss = -1/P sum_p sum_i w_{p,i} log pi(y_{p,i} | x_p),   w = rloo_weights(r')  (see reward_std.py)
with the KL penalty to the reference (the model at the start of RFT) folded into the reward as in
Ziegler et al. 2019 / InstructGPT: r'_i = r_i - kl_coef (log pi(y_i|x) - log pi_ref(y_i|x)), the log
ratio detached (its gradient term E[grad log pi] is zero in expectation). The update and the per-prompt
gradient norms come from the same backward: one batched backward with Gram hooks (`grad_method=gram`),
or one backward per prompt (`loop`, gradient accumulation with one prompt per micro-batch).

Run directory (like `preflens train`, through preflens.tracking): `config.yaml`, `metrics.jsonl` (keys: step, split, phase,
reward/mean, reward/std, frac_small_std, grad_norm, kl, loss, lr), `prompts.parquet` (step, split,
phase, prompt_id, reward_mean, reward_std, grad_norm), `checkpoints/step-N/` (accelerate save_state:
model, optimizers, RNG, loop position), `sft/` (the model after the initial SFT phase), `final/`,
`summary.json`, `tb/` (TensorBoard). Single process for now: the per-prompt backward passes bypass DDP's gradient hooks.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preflens.diagnostics.reward_std import (
    PromptRow,
    encode_prompt,
    policy_gradient_norms,
    reward_mean_std,
    reward_std_diagnostic,
    rloo_weights,
    sample_completions,
    summarize,
)
from preflens.errors import PreflensError, RunDirError
from preflens.logprobs import sequence_logps
from preflens.rewards import Reward, RewardError, score
from preflens.tracking import (
    RunTracker,
    checkpoint_dir,
    latest_checkpoint,
    prepare_run_dir,
    write_config,
)
from preflens.tracking import save_checkpoint as save_checkpoint_atomically

__all__ = ["RFTConfig", "train_rft", "prepare_run_dir", "latest_checkpoint"]


@dataclass
class RFTConfig:
    """Hyper-parameters of `preflens rft` (flag names match the fields)."""

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
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    chat_template: bool | None = None
    std_threshold: float = 0.1
    """A prompt's reward std below this (in reward units) counts as small."""
    low_reward: float | None = None
    eval_every: int = 0
    """Evaluate (sample, score, gradient norms, no update) every N RFT steps; 0: start, after SFT, end."""
    eval_prompts: int | None = None
    """Evaluate on the first N prompts (None: all)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end and when a reward fails)."""
    initial_sft: int = 0
    """SFT steps on the `reference` completions before RFT."""
    sft_fraction: float = 1.0
    """Fraction of the prompts (with a reference) used by the initial SFT phase."""
    sft_lr: float | None = None
    sft_batch_size: int = 8
    seed: int = 0
    grad_method: str = "auto"
    """How per-prompt gradient norms are computed: `auto` | `gram` (one batched backward with Gram
    hooks) | `loop` (one backward per prompt); see `reward_std.policy_gradient_norms`."""


class _LoopState:
    """Where the loop is (optimizer steps done, data position): saved with accelerate's checkpoint."""

    def __init__(self) -> None:
        self.step = 0
        self.pos = {"sft": [0, 0], "rft": [0, 0]}  # phase -> [epoch, cursor]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "pos": copy.deepcopy(self.pos)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = int(sd["step"])
        self.pos = {k: list(v) for k, v in sd["pos"].items()}


def _next_indices(state: _LoopState, phase: str, pool: list[int], size: int, seed: int) -> list[int]:
    """The next `size` items of a seeded per-epoch permutation of `pool` (wrapping into new epochs)."""
    out: list[int] = []
    while len(out) < size:
        epoch, cursor = state.pos[phase]
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7919 + (phase == "sft"))
        order = torch.randperm(len(pool), generator=g).tolist()
        take = order[cursor : cursor + size - len(out)]
        out.extend(pool[i] for i in take)
        cursor += len(take)
        state.pos[phase] = [epoch + 1, 0] if cursor >= len(pool) else [epoch, cursor]
    return out


def _sft_batch(
    tokenizer: Any, prompt_ids: list[list[int]], refs: list[str], eos: int | None
) -> dict[str, torch.Tensor]:
    """prompt + reference (+ EOS) rows, right-padded, with the reference marked as the response."""
    seqs, starts = [], []
    for p, r in zip(prompt_ids, refs):
        resp = list(tokenizer(r, add_special_tokens=False)["input_ids"]) + ([eos] if eos is not None else [])
        if not resp:
            raise PreflensError(f"reference {r!r} tokenizes to no tokens")
        seqs.append(list(p) + resp)
        starts.append(len(p))
    t = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    am = torch.zeros((len(seqs), t), dtype=torch.long)
    rm = torch.zeros((len(seqs), t), dtype=torch.bool)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        ids[i, : len(s)] = torch.tensor(s)
        am[i, : len(s)] = 1
        rm[i, st : len(s)] = True
    return {"input_ids": ids, "attention_mask": am, "response_mask": rm}


class _Log:
    """metrics.jsonl (+ TensorBoard) rows and the per-prompt `prompts.parquet` table (preflens.tracking)."""

    def __init__(self, tracker: RunTracker) -> None:
        self.tracker = tracker

    def metrics(self, row: dict[str, Any]) -> None:
        self.tracker.log(row)

    def prompts(self, rows: list[dict[str, Any]]) -> None:
        # ids as strings: one parquet column type whatever the jsonl held
        self.tracker.table("prompts").append({**r, "prompt_id": str(r["prompt_id"])} for r in rows)

    def flush(self) -> None:
        self.tracker.flush()


def _accelerator(run_dir: Path) -> Any:
    """An Accelerator logging to TensorBoard in run_dir/tb when tensorboard is installed.

    Several runs in one Python process (tests, experiments) must not inherit the previous run's
    accelerate singleton state, so it is reset unless a process group is running.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    try:
        import tensorboard  # noqa: F401

        log_with = "tensorboard"
    except ImportError:
        log_with = None
    return Accelerator(
        log_with=log_with,
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / "tb"), automatic_checkpoint_naming=False
        ),
    )


def _set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


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
    log_fn: Any = None,
) -> dict[str, Any]:
    """Run (optionally) `config.initial_sft` SFT steps, then `config.steps` RLOO steps; return the summary.

    Evaluations (all or `eval_prompts` prompts: sample K, score, per-prompt gradient norms, no update)
    run at step 0 (`phase=init`), after SFT (`after_sft`), every `eval_every` RFT steps (`rft`) and at
    the end (`final`). A reward that raises/returns garbage stops the run with a `RewardError` naming the
    prompt, after saving the logs and a checkpoint of the last completed step (resume with `resume=True`).
    """
    _validate(config, rows)
    run_dir = Path(output_dir)
    prepare_run_dir(run_dir, overwrite=overwrite, resume=resume)
    say = log_fn or (lambda msg: None)

    accelerator = _accelerator(run_dir)
    if accelerator.num_processes > 1:
        raise PreflensError("preflens rft runs in a single process (launch it without accelerate/torchrun)")
    if resume is False:
        _set_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.SGD if config.optimizer == "sgd" else torch.optim.AdamW
    opt_sft = opt_cls(params, lr=config.sft_lr or config.lr, weight_decay=config.weight_decay)
    opt_rft = opt_cls(params, lr=config.lr, weight_decay=config.weight_decay)
    model, opt_sft, opt_rft = accelerator.prepare(model, opt_sft, opt_rft)
    state = _LoopState()
    accelerator.register_for_checkpointing(state)
    log = _Log(RunTracker(run_dir, accelerator))

    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise RunDirError(f"{run_dir}: no checkpoints/step-N to resume from")
        accelerator.load_state(str(ckpt))
        log.tracker.resume_at(state.step, tables=("prompts",))
        say(f"resumed from {ckpt} (step {state.step})")
    cfg = {**asdict(config), **(extra_config or {}), "reward": reward.name, "num_prompts": len(rows)}
    if not resume:
        write_config(run_dir, cfg)
    if accelerator.log_with:
        accelerator.init_trackers(
            "preflens-rft", config={k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool))}
        )

    device = accelerator.device
    encoded = [encode_prompt(tokenizer, r.prompt, config.chat_template, r.messages) for r in rows]
    eos = tokenizer.eos_token_id
    eval_rows = rows[: config.eval_prompts] if config.eval_prompts else rows
    with_ref = [i for i, r in enumerate(rows) if r.reference is not None]
    n_sft = max(1, math.ceil(config.sft_fraction * len(with_ref))) if config.initial_sft else 0
    sft_pool = sorted(
        with_ref[i]
        for i in torch.randperm(len(with_ref), generator=torch.Generator().manual_seed(config.seed))[:n_sft]
    )
    total = config.initial_sft + config.steps
    evals = _load_evals(run_dir, state.step) if resume else {}
    ref_model: nn.Module | None = None

    def save_checkpoint() -> None:
        log.flush()
        save_checkpoint_atomically(accelerator, checkpoint_dir(run_dir, state.step))

    def evaluate(phase: str) -> None:
        res = reward_std_diagnostic(
            accelerator.unwrap_model(model),
            tokenizer,
            eval_rows,
            reward,
            k=config.k,
            batch_size=config.prompts_per_step,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            chat_template=config.chat_template,
            std_threshold=config.std_threshold,
            grad_method=config.grad_method,
        )
        low, low_from = config.low_reward, None
        if low is None and reward.value_range is None:
            # A median threshold is relative to the evaluation it comes from: recomputed at every
            # evaluation, "small std & low reward" before and after SFT would be measured against
            # different bars. The first evaluation that defines one keeps it for the run.
            for ph, ev in sorted(evals.items(), key=lambda kv: kv[1]["step"]):
                if ev.get("low_reward_threshold") is not None:
                    low = ev["low_reward_threshold"]
                    low_from = f"median of the per-prompt mean rewards at the {ph} evaluation (step {ev['step']}), kept for the run"
                    break
        summ = summarize(
            res.rows,
            std_threshold=config.std_threshold,
            low_reward=low,
            value_range=reward.value_range,
            low_reward_from=low_from,
        )
        log.metrics(
            {
                "step": state.step,
                "split": "eval",
                "phase": phase,
                "reward/mean": summ["reward_mean"],
                "reward/std": summ["reward_std_mean"],
                "frac_small_std": summ["frac_small_std"],
                "frac_small_std_and_low_reward": summ["frac_small_std_and_low_reward"],
                "grad_norm": sum(r["grad_norm"] for r in res.rows) / len(res.rows),
            }
        )
        log.prompts(
            [
                {
                    "step": state.step,
                    "split": "eval",
                    "phase": phase,
                    "prompt_id": r["prompt_id"],
                    "reward_mean": r["reward_mean"],
                    "reward_std": r["reward_std"],
                    "grad_norm": r["grad_norm"],
                }
                for r in res.rows
            ]
        )
        key = f"rft-{state.step}" if phase == "rft" else phase
        evals[key] = {"step": state.step, "phase": phase, **{k: v for k, v in summ.items() if k != "note"}}
        (run_dir / "evals.json").write_text(json.dumps(evals, indent=2))
        say(
            f"[{phase} @ step {state.step}] reward {summ['reward_mean']:.4f}  "
            f"small-std {summ['frac_small_std']:.1%}  small-std & low reward {_pct(summ['frac_small_std_and_low_reward'])}"
        )

    # Set when an optimizer starts a parameter update: an interrupt after that point cannot be rewound
    # to the step's start, so no checkpoint is written for it (the last saved one stays the resume point).
    updating = [False]
    for o in (opt_sft, opt_rft):
        getattr(o, "optimizer", o).register_step_pre_hook(
            lambda *_: updating.__setitem__(0, True)
        )  # under accelerate's wrapper

    def guarded(fn: Any, what: str) -> Any:
        """Run one step (or evaluation) so that a failure or Ctrl-C loses nothing already done.

        A broken reward saves logs + a checkpoint of the last good step before the error. Ctrl-C (or
        SIGTERM, which the CLI turns into the same) before the parameter update rewinds the step (data
        position, RNG, gradients) and checkpoints the last finished step, so `--resume` continues as if
        uninterrupted; during or after the update the last saved checkpoint stays the resume point.
        """
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        pos = state.state_dict()
        updating[0] = False
        try:
            return fn()
        except KeyboardInterrupt:
            if updating[0]:
                say(
                    f"interrupted during the update of step {state.step + 1}: resume from the last checkpoint"
                )
                raise
            for o in (opt_sft, opt_rft):
                o.zero_grad(set_to_none=True)
            state.load_state_dict(pos)
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            if state.step:
                save_checkpoint()
                say(f"interrupted during {what}: saved checkpoints/step-{state.step}; continue with --resume")
            else:
                log.flush()
            raise
        except RewardError as exc:
            for o in (opt_sft, opt_rft):
                o.zero_grad(set_to_none=True)
            state.load_state_dict(pos)  # the step's prompts are drawn again on resume
            torch.set_rng_state(rng)  # the checkpoint replays the failed step's sampling on resume
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            saved = "" if state.step == 0 else f" and checkpoints/step-{state.step}"
            if state.step:
                save_checkpoint()
            else:
                log.flush()
            raise RewardError(
                f"{exc} [during {what} at step {state.step + 1}; the logs{saved} in {run_dir} keep everything "
                "computed so far; fix the reward and rerun with --resume]"
            ) from exc

    from preflens.train import sigterm_as_interrupt

    sigterm = sigterm_as_interrupt()  # SIGTERM (preemption, timeout, kill) takes Ctrl-C's path below
    sigterm.__enter__()
    try:
        if state.step == 0:
            guarded(lambda: evaluate("init"), "the initial evaluation")

        model.train()
        while state.step < config.initial_sft:
            loss, gnorm = guarded(
                lambda: _sft_step(
                    model, tokenizer, rows, encoded, sft_pool, state, config, opt_sft, eos, device
                ),
                "an SFT step",
            )
            state.step += 1
            log.metrics(
                {
                    "step": state.step,
                    "split": "train",
                    "phase": "sft",
                    "loss": loss,
                    "grad_norm": gnorm,
                    "lr": opt_sft.param_groups[0]["lr"],
                }
            )
            if state.step == config.initial_sft:
                accelerator.unwrap_model(model).save_pretrained(run_dir / "sft")
            if config.save_every and state.step % config.save_every == 0:
                save_checkpoint()
        # outside the loop so that a run resumed right after SFT (e.g. the reward failed here) still does it
        if config.initial_sft and "after_sft" not in evals:
            guarded(lambda: evaluate("after_sft"), "the post-SFT evaluation")

        if config.kl_coef > 0:
            ref_model = _reference_model(model, accelerator, run_dir, config, state)
            ref_model.to(device).eval().requires_grad_(False)

        done = state.step - config.initial_sft
        if resume and config.eval_every and 0 < done and done % config.eval_every == 0 and state.step < total:
            if f"rft-{state.step}" not in evals:  # an interrupt cut this evaluation short
                guarded(lambda: evaluate("rft"), "an evaluation")
        while state.step < total:
            row = guarded(
                lambda: _rft_step(
                    model, tokenizer, rows, encoded, state, config, opt_rft, reward, ref_model, device
                ),
                "RFT sampling/scoring",
            )
            state.step += 1
            metrics, prompt_rows = row
            log.metrics({"step": state.step, "split": "train", "phase": "rft", **metrics})
            log.prompts([{"step": state.step, "split": "train", "phase": "rft", **r} for r in prompt_rows])
            rft_done = state.step - config.initial_sft
            if config.eval_every and rft_done % config.eval_every == 0 and state.step < total:
                guarded(lambda: evaluate("rft"), "an evaluation")
            if config.save_every and state.step % config.save_every == 0:
                save_checkpoint()

        if "final" not in evals or evals["final"]["step"] != state.step:
            guarded(lambda: evaluate("final"), "the final evaluation")
        save_checkpoint()
    finally:
        sigterm.__exit__(None, None, None)
        log.tracker.close()

    final_dir = run_dir / "final"
    accelerator.unwrap_model(model).save_pretrained(final_dir)
    tokenizer.save_pretrained(final_dir)
    summary = _summary(evals, config)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


REFERENCE_FILE = "reference_model.pt"


def _reference_model(
    model: nn.Module, accelerator: Any, run_dir: Path, config: RFTConfig, state: _LoopState
) -> nn.Module:
    """The KL reference: a frozen copy of the model when RFT starts (after the initial SFT, if any).

    Its weights are also saved in `reference_model.pt` (a plain state dict, so this works for any
    module: full models, peft adapters, tied embeddings) so that a run resumed after RFT started,
    whose weights came from a checkpoint, finds the same reference.
    """
    ref = copy.deepcopy(accelerator.unwrap_model(model))
    path = run_dir / REFERENCE_FILE
    if state.step > config.initial_sft:
        if not path.exists():
            raise RunDirError(f"{path}: the KL reference model of this run is missing; cannot resume")
        ref.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        torch.save({k: v.detach().cpu() for k, v in ref.state_dict().items()}, path)
    return ref


def _validate(config: RFTConfig, rows: list[PromptRow]) -> None:
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
    if config.grad_method not in ("auto", "loop", "gram"):
        raise PreflensError(f"--grad-method must be auto, loop or gram, got {config.grad_method!r}")
    if config.max_new_tokens < 1:
        raise PreflensError("--max-new-tokens must be >= 1")
    from preflens.diagnostics.reward_std import check_sampling

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


def _sft_step(
    model: nn.Module,
    tokenizer: Any,
    rows: list[PromptRow],
    encoded: list[list[int]],
    pool: list[int],
    state: _LoopState,
    config: RFTConfig,
    opt: torch.optim.Optimizer,
    eos: int | None,
    device: torch.device,
) -> tuple[float, float]:
    """One SFT step: mean token NLL of the references given their prompts."""
    idx = _next_indices(state, "sft", pool, min(config.sft_batch_size, len(pool)), config.seed)
    b = _sft_batch(tokenizer, [encoded[i] for i in idx], [rows[i].reference or "" for i in idx], eos)
    out = sequence_logps(model, *(b[k].to(device) for k in ("input_ids", "attention_mask", "response_mask")))
    loss = -out.logps.sum() / out.lengths.sum()
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.requires_grad], config.max_grad_norm or float("inf")
    )
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach()), float(gnorm)


def _rft_step(
    model: nn.Module,
    tokenizer: Any,
    rows: list[PromptRow],
    encoded: list[list[int]],
    state: _LoopState,
    config: RFTConfig,
    opt: torch.optim.Optimizer,
    reward: Reward,
    ref_model: nn.Module | None,
    device: torch.device,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One RLOO step over `prompts_per_step` prompts; returns the metrics row and per-prompt rows.

    The data position is advanced only on success (a failing reward leaves `state` as it was, so the
    emergency checkpoint resumes at the same prompts).
    """
    t0 = time.perf_counter()
    saved_pos = copy.deepcopy(state.pos)
    idx = _next_indices(state, "rft", list(range(len(rows))), config.prompts_per_step, config.seed)
    try:
        k = config.k
        samples = sample_completions(
            model,
            tokenizer,
            [encoded[i] for i in idx],
            k,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
        )
        group = [i // k for i in range(len(samples.completions))]
        values = score(
            reward,
            [rows[idx[g]].prompt for g in group],
            samples.completions,
            [rows[idx[g]].reference for g in group],
            group=group,
            prompt_ids=[rows[i].prompt_id for i in idx],
        )
    except Exception:
        state.pos = saved_pos
        raise
    rewards = torch.tensor(values, dtype=torch.float64).view(len(idx), k)
    mean, std = reward_mean_std(rewards)
    ref_logps = None
    if ref_model is not None:
        with torch.no_grad():
            ref_logps = torch.cat(
                [
                    sequence_logps(ref_model, *(t.to(device) for t in samples.rows(p))).logps.cpu()
                    for p in range(len(idx))
                ]
            )
    weights: list[torch.Tensor] = []
    kls: list[torch.Tensor] = []

    def weight_fn(p: int, logps: torch.Tensor) -> torch.Tensor:
        r = rewards[p].to(logps.device, torch.float64)
        if ref_logps is not None:
            kl = logps.double() - ref_logps[p * k : (p + 1) * k].to(logps.device).double()
            kls.append(kl.cpu())
            r = r - config.kl_coef * kl
        w = rloo_weights(r.unsqueeze(0))[0].float()
        weights.append(w.cpu())
        return w

    params = [p for p in model.parameters() if p.requires_grad]
    norms, logps = policy_gradient_norms(
        model, samples, weight_fn, params=params, accumulate_scale=1.0 / len(idx), method=config.grad_method
    )
    gnorm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    w_all = torch.cat(weights)
    loss = float(-(w_all * logps).sum() / len(idx))
    metrics = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(std.mean()),
        "frac_small_std": float((std < config.std_threshold).double().mean()),
        "grad_norm": float(gnorm),
        "kl": float(torch.cat(kls).mean()) if kls else 0.0,
        "loss": loss,
        "lr": opt.param_groups[0]["lr"],
        "step_time": time.perf_counter() - t0,
    }
    prompt_rows = [
        {
            "prompt_id": rows[i].prompt_id,
            "reward_mean": float(mean[p]),
            "reward_std": float(std[p]),
            "grad_norm": float(norms[p]),
        }
        for p, i in enumerate(idx)
    ]
    return metrics, prompt_rows


def _pct(x: float | None) -> str:
    """A fraction as a percentage; n/a when undefined (see `summarize`: all means equal, no range)."""
    return "n/a (pass --low-reward)" if x is None else f"{x:.1%}"


def _load_evals(run_dir: Path, step: int) -> dict[str, dict[str, Any]]:
    """Evaluations logged up to the resumed checkpoint's step (later ones will be redone)."""
    path = run_dir / "evals.json"
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
