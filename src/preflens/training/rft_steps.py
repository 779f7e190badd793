"""One step of each phase of reinforcement finetuning, and the data order both draw from.

- `sft_step`: the initial SFT phase, mean token NLL of the prompts' `reference` completions (the remedy
  Razin et al. 2024, arXiv 2310.20703 propose for prompts whose reward std is too small to learn from).
- `rft_step`: one RLOO step (REINFORCE with a leave-one-out baseline; Kool et al. 2019, TRL's
  RLOOTrainer) over `prompts_per_step` prompts with K samples each,
      loss = -1/P sum_p sum_i w_{p,i} log pi(y_{p,i} | x_p),   w = rloo_weights(r'),
  the KL penalty to the reference folded into the reward (Ziegler et al. 2019 / InstructGPT):
  r'_i = r_i - kl_coef (log pi(y_i|x) - log pi_ref(y_i|x)), the log ratio detached. The update and the
  per-prompt gradient norms come from the same backward (`reward_std.policy_gradient_norms`).
- `LoopState` / `next_indices`: where the loop is (saved in checkpoints) and a seeded per-epoch
  permutation of the prompts, so that a resumed run draws the same prompts as an uninterrupted one.

The loop around them (evaluations, checkpoints, interrupts) is `preflens.training.rft`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from preflens.data.prompts import PromptRow
from preflens.diagnostics.reward_std import (
    Samples,
    policy_gradient_norms,
    reward_mean_std,
    rloo_weights,
    sample_completions,
)
from preflens.errors import PreflensError
from preflens.logprobs import sequence_logps
from preflens.rewards import Reward, score
from preflens.training.rft_config import RFTConfig

__all__ = ["LoopState", "next_indices", "sft_batch", "sft_step", "rft_step"]


class LoopState:
    """Where the loop is (optimizer steps done, data position): saved with accelerate's checkpoint."""

    def __init__(self) -> None:
        self.step = 0
        self.pos = {"sft": [0, 0], "rft": [0, 0]}  # phase -> [epoch, cursor]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "pos": copy.deepcopy(self.pos)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = int(sd["step"])
        self.pos = {k: list(v) for k, v in sd["pos"].items()}


def next_indices(state: LoopState, phase: str, pool: list[int], size: int, seed: int) -> list[int]:
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


def sft_batch(
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


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def sft_step(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[PromptRow],
    encoded: list[list[int]],
    pool: list[int],
    state: LoopState,
    config: RFTConfig,
    opt: torch.optim.Optimizer,
    device: torch.device,
) -> tuple[float, float]:
    """One SFT step: mean token NLL of the references given their prompts; (loss, gradient norm)."""
    idx = next_indices(state, "sft", pool, min(config.sft_batch_size, len(pool)), config.seed)
    refs = [rows[i].reference or "" for i in idx]
    b = sft_batch(tokenizer, [encoded[i] for i in idx], refs, tokenizer.eos_token_id)
    out = sequence_logps(model, *(b[k].to(device) for k in ("input_ids", "attention_mask", "response_mask")))
    loss = -out.logps.sum() / out.lengths.sum()
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(_trainable(model), config.max_grad_norm or float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach()), float(gnorm)


def _sample_and_score(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[PromptRow],
    encoded: list[list[int]],
    state: LoopState,
    config: RFTConfig,
    reward: Reward,
    sampler: Any = None,
) -> tuple[list[int], Samples, torch.Tensor]:
    """The step's prompts, their K samples each and the [P, K] rewards.

    The data position is advanced only on success (a failing reward leaves `state` as it was, so the
    emergency checkpoint resumes at the same prompts).
    """
    saved_pos = copy.deepcopy(state.pos)
    idx = next_indices(state, "rft", list(range(len(rows))), config.prompts_per_step, config.seed)
    try:
        samples = sample_completions(
            model,
            tokenizer,
            [encoded[i] for i in idx],
            config.k,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            sampler=sampler,
        )
        group = [i // config.k for i in range(len(samples.completions))]
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
    return idx, samples, torch.tensor(values, dtype=torch.float64).view(len(idx), config.k)


@torch.no_grad()
def _reference_logps(ref_model: nn.Module, samples: Samples, device: torch.device) -> torch.Tensor:
    """log pi_ref of every sample [P*K], on the CPU, one prompt's K rows at a time."""
    parts = [
        sequence_logps(ref_model, *(t.to(device) for t in samples.rows(p))).logps.cpu()
        for p in range(samples.num_prompts)
    ]
    return torch.cat(parts)


def rft_step(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[PromptRow],
    encoded: list[list[int]],
    state: LoopState,
    config: RFTConfig,
    opt: torch.optim.Optimizer,
    reward: Reward,
    ref_model: nn.Module | None,
    device: torch.device,
    sampler: Any = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One RLOO step over `prompts_per_step` prompts; returns the metrics row and per-prompt rows
    (`sampler`: `reward_std.make_sampler`'s, None for transformers' generate)."""
    t0 = time.perf_counter()
    k = config.k
    idx, samples, rewards = _sample_and_score(model, tokenizer, rows, encoded, state, config, reward, sampler)
    mean, std = reward_mean_std(rewards)
    ref_logps = _reference_logps(ref_model, samples, device) if ref_model is not None else None
    weights: list[torch.Tensor] = []
    kls: list[torch.Tensor] = []

    def weight_fn(p: int, logps: torch.Tensor) -> torch.Tensor:
        """RLOO weights of prompt p's samples, the KL penalty folded into their rewards."""
        r = rewards[p].to(logps.device, torch.float64)
        if ref_logps is not None:
            kl = logps.double() - ref_logps[p * k : (p + 1) * k].to(logps.device).double()
            kls.append(kl.cpu())
            r = r - config.kl_coef * kl
        w = rloo_weights(r.unsqueeze(0))[0].float()
        weights.append(w.cpu())
        return w

    params = _trainable(model)
    norms, logps = policy_gradient_norms(
        model, samples, weight_fn, params=params, accumulate_scale=1.0 / len(idx), method=config.grad_method
    )
    gnorm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss = float(-(torch.cat(weights) * logps).sum() / len(idx))
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
