"""Reward std per prompt and the expected policy-gradient norm: the vanishing-gradients diagnostic.

Why this module exists (Razin et al. 2024, "Vanishing Gradients in Reinforcement Finetuning of Language
Models", arXiv 2310.20703, ICLR 2024): the expected reward of a prompt x is
V_x(theta) = E_{y ~ pi_theta(.|x)}[r(x, y)], and its gradient is bounded by the reward's standard
deviation under the model,

    ||grad V_x(theta)|| = O( STD_{y ~ pi_theta(.|x)}[r(x, y)]^{2/3} )      (the paper's theorem),

so a prompt whose completions all get about the same reward receives almost no gradient, *even if
that reward is poor*. RFT then cannot fix it; a short initial SFT phase can. The theorem is an upper
bound: small std forces a small gradient, a large std does not force a large one. Nothing here
asserts the 2/3 relation; we measure both sides and let the user see them.

What we compute, per prompt x with K samples y_1..y_K ~ pi_theta(.|x) and rewards r_1..r_K:
- reward mean and std (std with Bessel's correction, ddof=1: the unbiased variance estimate; K >= 2);
- the REINFORCE estimate of grad V_x with the leave-one-out baseline (RLOO; Kool et al. 2019,
  "Buy 4 REINFORCE samples, get a baseline for free!"), which is unbiased:
      g = 1/K sum_i (r_i - b_i) grad log pi(y_i|x),   b_i = 1/(K-1) sum_{j != i} r_j,
  and its norm. Since r_i - b_i = K/(K-1) (r_i - mean(r)), g = 0 exactly when all rewards are equal.

The norms come either from one backward of the surrogate sum_i w_i log pi(y_i|x) per prompt
(w_i = (r_i - b_i)/K; gradient accumulation with one prompt per micro-batch), or, by default, from ONE
batched backward over all prompts with the per-sequence Gram hooks of `preflens.grad`:
||g_p||^2 is the sum of the prompt's block of the Gram of the weighted per-sample gradients, so no
per-sample or per-prompt gradient is ever materialised (`policy_gradient_norms`).

The prompts (`PromptRow`, `load_prompts`, `encode_prompt`) live in `preflens.data.prompts` and are
re-exported here for older importers; writing a diagnostic run to a directory (parquet tables, summary,
resume) is `preflens.diagnostics.reward_std_run`.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from preflens.data.prompts import PROMPT_SUFFIXES, PromptRow, encode_prompt, load_prompts  # noqa: F401
from preflens.errors import PreflensError
from preflens.grad import GramCapture, GramError
from preflens.grad.memory import estimate_gram_memory, plan_rows, resolve_budget
from preflens.logprobs import sequence_logps
from preflens.rewards import Reward, score

__all__ = [
    "PromptRow",
    "load_prompts",
    "encode_prompt",
    "Samples",
    "check_sampling",
    "sample_completions",
    "SAMPLERS",
    "make_sampler",
    "check_sampler",
    "sampler_name",
    "rloo_weights",
    "reward_mean_std",
    "exact_reward_std",
    "policy_gradient_norms",
    "grad_norm_prompts_per_pass",
    "RewardStdResult",
    "reward_std_diagnostic",
    "summarize",
    "THEOREM_NOTE",
]

THEOREM_NOTE = (
    "||grad V_x|| = O(STD[r]^(2/3)) (Razin et al. 2024, arXiv 2310.20703) is an upper bound: prompts "
    "with small reward std get small expected gradients even when their reward is low; a large std "
    "does not guarantee a large gradient."
)


@dataclass
class Samples:
    """K sampled completions for each of P prompts, laid out for `sequence_logps` (right-padded).

    Rows p*K .. p*K+K-1 belong to prompt p. `response_mask` marks the generated tokens (up to and
    including the first EOS).
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    completions: list[str]
    k: int
    completion_ids: list[list[int]] = field(default_factory=list)

    @property
    def num_prompts(self) -> int:
        return self.input_ids.shape[0] // self.k

    def rows(self, p: int) -> tuple[Tensor, Tensor, Tensor]:
        """The K rows of prompt p, trimmed to their longest sequence."""
        sl = slice(p * self.k, (p + 1) * self.k)
        am = self.attention_mask[sl]
        t = int(am.sum(1).max())
        return self.input_ids[sl, :t], am[:, :t], self.response_mask[sl, :t]


def check_sampling(
    *,
    k: int | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    batch_size: int | None = None,
    std_threshold: float | None = None,
) -> None:
    """Refuse settings with no meaning before any model is loaded (shared by reward-std and rft).

    Without this, `--max-new-tokens 0` or `--batch-size 0` surface as tracebacks from transformers or
    from `range()`, and `--top-p 0` or a negative `--std-threshold` run to the end with numbers that
    mean nothing (no token survives top-p 0; no std is below a negative threshold).
    """
    if k is not None and k < 2:
        raise PreflensError(
            f"-k must be at least 2 (the reward std and the RLOO baseline need K >= 2), got {k}"
        )
    if max_new_tokens is not None and max_new_tokens < 1:
        raise PreflensError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature is not None and not temperature > 0:
        raise PreflensError(f"--temperature must be > 0 (sampling), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise PreflensError(f"--top-p must be in (0, 1] (1: sample from the model itself), got {top_p}")
    if batch_size is not None and batch_size < 1:
        raise PreflensError(f"--batch-size must be >= 1, got {batch_size}")
    if std_threshold is not None and std_threshold < 0:
        raise PreflensError(
            f"--std-threshold must be >= 0 (a reward std in reward units), got {std_threshold}"
        )


def _eos_ids(tokenizer: Any, model: nn.Module) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    k: int,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    sampler: Any = None,
) -> Samples:
    """Sample K completions per prompt in one `model.generate` call (left-padded prompts).

    `sampler` (`make_sampler`): None samples with transformers' `generate` (batched, the model's KV
    cache); a `reward_std_vllm.VLLMSampler` samples with vLLM from the model's current weights. Either way
    the completions come back in the same layout, scored by the same `sequence_logps`.

    Uses a fresh GenerationConfig so that a checkpoint's own defaults (top_k=50, repetition penalty)
    do not silently change the sampling distribution: with temperature 1 and top_p 1 the samples come
    from pi_theta itself, which is what the std and the gradient estimate are about. Randomness comes
    from torch's global RNG (seed it, or let accelerate restore it on resume).
    """
    check_sampling(k=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    eos = _eos_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    if sampler is not None:
        gen_rows = sampler.generate(prompt_ids, k, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, eos=eos)  # fmt: skip
    else:
        gen_rows = _hf_generate(model, prompt_ids, k, (max_new_tokens, temperature, top_p), eos, pad)
    return _samples_from_rows(tokenizer, prompt_ids, gen_rows, k, eos, pad)


def _hf_generate(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    k: int,
    sampling: tuple[int, float, float],
    eos: list[int],
    pad: int,
) -> list[list[int]]:
    """transformers' `generate`: K samples per left-padded prompt; the generated token rows.
    `sampling` is (max_new_tokens, temperature, top_p)."""
    from transformers import GenerationConfig  # slow to import; only sampling needs it

    max_new_tokens, temperature, top_p = sampling
    device = next(model.parameters()).device
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    am = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        am[i, width - len(p) :] = 1
    cfg = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        max_new_tokens=max_new_tokens,
        num_return_sequences=k,
        pad_token_id=pad,
        eos_token_id=eos or None,
    )
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids.to(device), attention_mask=am.to(device), generation_config=cfg)
    finally:
        model.train(was_training)
    return out[:, width:].cpu().tolist()


def _samples_from_rows(
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    gen_rows: Sequence[Sequence[int]],
    k: int,
    eos: list[int],
    pad: int,
) -> Samples:
    """Generated token rows (cut at the first EOS, which is kept) -> the right-padded `Samples` layout."""
    seqs: list[list[int]] = []
    resp_lens: list[int] = []
    completions: list[str] = []
    completion_ids: list[list[int]] = []
    eos_set = set(eos)
    for r, row in enumerate(gen_rows):
        toks = list(row)
        cut = next((j + 1 for j, t in enumerate(toks) if t in eos_set), len(toks))
        resp = toks[:cut]
        if not resp:  # max_new_tokens == 0 is rejected upstream; keep the layout valid anyway
            raise PreflensError("generation produced no tokens; use --max-new-tokens >= 1")
        body = resp[:-1] if resp[-1] in eos_set else resp
        completions.append(tokenizer.decode(body, skip_special_tokens=True))
        completion_ids.append(resp)
        seqs.append(list(prompt_ids[r // k]) + resp)
        resp_lens.append(len(resp))
    t = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, t), pad, dtype=torch.long)
    attention = torch.zeros((n, t), dtype=torch.long)
    response = torch.zeros((n, t), dtype=torch.bool)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        response[i, len(s) - resp_lens[i] : len(s)] = True
    return Samples(input_ids, attention, response, completions, k, completion_ids)


def rloo_weights(rewards: Tensor) -> Tensor:
    """w_i = (r_i - b_i) / K with the leave-one-out baseline b_i = (sum_j r_j - r_i) / (K - 1).

    `rewards` is [P, K]; the policy-gradient estimate for prompt p is sum_i w[p, i] grad log pi(y_i|x_p)
    (Kool et al. 2019; the RLOO estimator TRL's RLOOTrainer uses).
    """
    k = rewards.shape[-1]
    if k < 2:
        raise PreflensError("the leave-one-out baseline needs at least 2 samples per prompt")
    baseline = (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)
    return (rewards - baseline) / k


def reward_mean_std(rewards: Tensor) -> tuple[Tensor, Tensor]:
    """Per-prompt mean and std (ddof=1) of a [P, K] reward table."""
    return rewards.mean(-1), rewards.std(-1, correction=1)


def exact_reward_std(probs: Tensor, rewards: Tensor) -> Tensor:
    """Exact std under the model when the completions can be enumerated (apple/ml-rlgrad's setting):
    sqrt(sum_y p(y|x) (r(x,y) - sum_y' p(y'|x) r(x,y'))^2). `probs`, `rewards`: [..., Y]."""
    mean = (probs * rewards).sum(-1, keepdim=True)
    return ((probs * (rewards - mean) ** 2).sum(-1)).clamp_min(0).sqrt()


GRAD_METHODS = ("auto", "loop", "gram")
SAMPLERS = ("hf", "vllm")
"""`--sampler`: hf (transformers `generate` with the KV cache, batched) or vllm (`reward_std_vllm`)."""


def check_sampler(name: str) -> None:
    """Refuse an unknown `--sampler`, or vllm where it does not import (before any model is loaded)."""
    if name not in SAMPLERS:
        raise PreflensError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")
    if name == "vllm" and importlib.util.find_spec("vllm") is None:
        raise PreflensError(
            "--sampler vllm: the vllm package is not installed (pip install vllm; it needs a GPU)"
        )


def make_sampler(name: str, model: nn.Module, tokenizer: Any, *, seed: int = 0) -> Any:
    """The `sampler` argument of `sample_completions` for `--sampler NAME` (None: transformers)."""
    check_sampler(name)
    if name == "hf":
        return None
    from preflens.diagnostics.reward_std_vllm import VLLMSampler

    return VLLMSampler(model, tokenizer, seed=seed)


def sampler_name(sampler: Any) -> str:
    """What a run logs as its sampler."""
    return "hf" if sampler is None else str(getattr(sampler, "name", type(sampler).__name__))


def policy_gradient_norms(
    model: nn.Module,
    samples: Samples,
    weight_fn: Callable[[int, Tensor], Tensor] | Tensor,
    *,
    params: Sequence[nn.Parameter] | None = None,
    accumulate_scale: float | None = None,
    method: str = "loop",
    prompts_per_pass: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-prompt norms ||sum_i w_i grad log pi(y_i|x_p)|| and the samples' log-probs.

    `weight_fn` is a [P, K] weight table or `fn(p, logps_p) -> w_p [K]` (called with the detached
    log-probs of the prompt's samples, so a KL-shaped reward can use them). With `accumulate_scale` = c
    the gradient of the loss -c sum_p sum_i w_pi log pi(y_pi|x_p) is added to the parameters' `.grad`
    (gradient ascent on the reward as descent on that loss), so a trainer gets its update and the
    per-prompt norms from the same backward.

    `method`:
    - `loop`: one forward+backward per prompt (K rows each), i.e. gradient accumulation with one prompt
      per micro-batch; works for any model; activation memory of K sequences.
    - `gram`: ONE forward+backward over all P*K samples with `preflens.grad.GramCapture`
      hooks, which give the Gram matrix of the per-sample gradient contributions c_s grad logp_s
      (c_s = -scale w_s) without materialising them; then ||g_p||^2 = sum over p's block of that Gram.
      The Gram is accumulated in float64, so tiny norms (the small-std prompts this is about) are not
      lost to cancellation (the weights of a prompt sum to zero). Far fewer kernel launches on a GPU.
    - `auto`: `gram`, falling back to `loop` when the model has modules the Gram hooks do not cover.
    `prompts_per_pass` (`grad_norm_prompts_per_pass`, under a memory budget): the `gram` method runs over
    that many prompts at a time (a prompt's norm is its own diagonal block of the Gram: the same numbers).
    Returns (norms [P] float32, logps [P*K] detached, on the CPU).
    """
    if method not in GRAD_METHODS:
        raise PreflensError(f"gradient-norm method must be one of {GRAD_METHODS}, got {method!r}")
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise PreflensError("the model has no trainable parameters")
    if method != "loop":
        try:
            return _pg_norms_gram_chunked(
                model, samples, weight_fn, params, accumulate_scale, prompts_per_pass
            )
        except GramError:
            if method == "gram":
                raise
    return _pg_norms_loop(model, samples, weight_fn, params, accumulate_scale)


def _sub_samples(samples: Samples, p0: int, p1: int) -> Samples:
    """Prompts p0 .. p1-1 of `samples` (their K rows each)."""
    sl = slice(p0 * samples.k, p1 * samples.k)
    return Samples(
        input_ids=samples.input_ids[sl],
        attention_mask=samples.attention_mask[sl],
        response_mask=samples.response_mask[sl],
        completions=samples.completions[sl],
        k=samples.k,
        completion_ids=samples.completion_ids[sl],
    )


def _pg_norms_gram_chunked(
    model, samples, weight_fn, params, accumulate_scale, per_pass
) -> tuple[Tensor, Tensor]:
    n = samples.num_prompts
    if not per_pass or per_pass >= n:
        return _pg_norms_gram(model, samples, weight_fn, params, accumulate_scale)
    norms, logps = [], []
    for p0 in range(0, n, per_pass):
        p1 = min(n, p0 + per_pass)
        if callable(weight_fn):
            fn: Any = lambda q, lp, _p0=p0: weight_fn(_p0 + q, lp)  # noqa: E731
        else:
            fn = weight_fn[p0:p1]
        nm, lp = _pg_norms_gram(model, _sub_samples(samples, p0, p1), fn, params, accumulate_scale)
        norms.append(nm)
        logps.append(lp)
    return torch.cat(norms), torch.cat(logps)


def grad_norm_prompts_per_pass(
    model: nn.Module, longest: int, k: int, prompts: int, budget: int, method: str = "auto"
) -> int:
    """How many prompts (K sequences of up to `longest` tokens each) one gradient-norm pass may take under
    `budget` bytes, from the shapes (`grad.memory.estimate_gram_memory`; the Gram runs in float64); refuses
    in one line (layer, shape, bytes) when one prompt's K sequences cannot fit. The `loop` method runs one
    prompt at a time anyway, so only that check applies to it."""

    def est(m: int) -> Any:
        return estimate_gram_memory(model, [longest] * (m * k), compute_dtype=torch.float64)

    what = f"reward-std gradient norms: {k} completions of up to {longest} tokens per prompt (counted in prompts)"
    rows = plan_rows(est, 1 if method == "loop" else prompts, budget, min_rows=1, what=what)
    return max(1, rows)


def _weights(weight_fn: Callable[[int, Tensor], Tensor] | Tensor, p: int, logps: Tensor) -> Tensor:
    w = weight_fn(p, logps.detach()) if callable(weight_fn) else weight_fn[p]
    return w.to(logps.device, logps.dtype)


def _pg_norms_loop(model, samples, weight_fn, params, accumulate_scale) -> tuple[Tensor, Tensor]:
    norms, all_logps = [], []
    dev = params[0].device
    for p in range(samples.num_prompts):
        ids, am, rm = samples.rows(p)
        logps = sequence_logps(model, ids.to(dev), am.to(dev), rm.to(dev)).logps
        w = _weights(weight_fn, p, logps)
        all_logps.append(logps.detach().cpu())
        if not bool(torch.any(w != 0)):  # all rewards equal: the estimate is exactly zero
            norms.append(torch.zeros((), dtype=torch.float32))
            continue
        grads = torch.autograd.grad((w * logps).sum(), params, allow_unused=True)
        sq = sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
        norms.append(torch.tensor(math.sqrt(sq), dtype=torch.float32))
        if accumulate_scale is not None:
            for prm, g in zip(params, grads):
                if g is None:
                    continue
                upd = -accumulate_scale * g
                if prm.grad is None:
                    prm.grad = upd.detach().clone()
                else:
                    prm.grad.add_(upd)
    return torch.stack(norms), torch.cat(all_logps)


def _pg_norms_gram(model, samples, weight_fn, params, accumulate_scale) -> tuple[Tensor, Tensor]:
    dev = params[0].device
    t = int(samples.attention_mask.sum(1).max())
    ids, am, rm = (
        x[:, :t].to(dev) for x in (samples.input_ids, samples.attention_mask, samples.response_mask)
    )
    k, n_prompts = samples.k, samples.num_prompts
    train = accumulate_scale is not None
    scale = accumulate_scale if train else 1.0
    # the anchor drives an activation-only backward when no weight gradient is wanted
    cap = GramCapture(model, am, rm, params, compute_dtype=torch.float64, anchor=not train)
    with torch.enable_grad(), cap:
        logps = sequence_logps(model, ids, am, rm).logps
        cap.check_graph(logps)
        w = torch.cat([_weights(weight_fn, p, logps[p * k : (p + 1) * k]) for p in range(n_prompts)])
        loss = -(scale * w * logps).sum()
        if train:
            loss.backward()
        else:
            if cap.anchor is None:
                raise GramError("the input-embedding hook did not run")
            torch.autograd.grad(loss, cap.anchor)
    gram = cap.finish()
    blocks = gram.view(n_prompts, k, n_prompts, k).diagonal(dim1=0, dim2=2)  # [K, K, P]
    sq = blocks.sum((0, 1)).clamp_min(0) / (scale * scale)
    norms = sq.sqrt().float().cpu()
    zero = (w.view(n_prompts, k) == 0).all(1).cpu()
    norms[zero] = 0.0  # all rewards equal: exactly zero, not float round-off
    return norms, logps.detach().cpu()


@dataclass
class RewardStdResult:
    """Per-prompt diagnostic rows and the raw samples (for `samples.parquet`)."""

    rows: list[dict[str, Any]]
    samples: list[dict[str, Any]]


def reward_std_diagnostic(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[PromptRow],
    reward: Reward,
    *,
    k: int = 8,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    chat_template: bool | None = None,
    compute_grad_norm: bool = True,
    grad_method: str = "auto",
    std_threshold: float = 0.1,
    on_batch: Callable[[RewardStdResult], None] | None = None,
    result: RewardStdResult | None = None,
    sampler: Any = None,
    max_memory: int | None = None,
) -> RewardStdResult:
    """Sample, score and measure every prompt, `batch_size` prompts per generation call.

    `max_memory` (bytes; None: half the free memory): the gradient-norm pass is planned from the shapes
    before the first prompt is sampled (the longest prompt plus `max_new_tokens`, K completions each):
    cut into passes of fewer prompts to fit, or refused in one line (layer, shape, bytes) when one prompt's
    K completions cannot fit.
    Results accumulate in `result` (pass one in to keep what was computed if a later batch fails:
    the caller can save `result` from its exception handler) and `on_batch` is called after each
    batch (e.g. to write the partial parquet). `sampler`: see `sample_completions` (None: transformers).
    """
    check_sampling(
        k=k,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        std_threshold=std_threshold,
    )
    result = result if result is not None else RewardStdResult(rows=[], samples=[])
    encoded = [encode_prompt(tokenizer, r.prompt, chat_template, r.messages) for r in prompts]
    per_pass = None
    if compute_grad_norm and encoded:
        dev = next(model.parameters()).device
        longest = max(len(e) for e in encoded) + max_new_tokens
        per_pass = grad_norm_prompts_per_pass(
            model, longest, k, min(batch_size, len(encoded)), resolve_budget(max_memory, dev), grad_method
        )
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        samples = sample_completions(
            model,
            tokenizer,
            encoded[start : start + batch_size],
            k,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            sampler=sampler,
        )
        group = [i // k for i in range(len(samples.completions))]
        values = score(
            reward,
            [batch[g].prompt for g in group],
            samples.completions,
            [batch[g].reference for g in group],
            group=group,
            prompt_ids=[r.prompt_id for r in batch],
        )
        rewards = torch.tensor(values, dtype=torch.float64).view(len(batch), k)
        mean, std = reward_mean_std(rewards)
        if compute_grad_norm:
            norms, logps = policy_gradient_norms(
                model, samples, rloo_weights(rewards).float(), method=grad_method, prompts_per_pass=per_pass
            )
        else:
            norms, logps = torch.full((len(batch),), float("nan")), torch.full((len(group),), float("nan"))
        for p, row in enumerate(batch):
            result.rows.append(
                {
                    "prompt_id": row.prompt_id,
                    "prompt": row.prompt,
                    "reward_mean": float(mean[p]),
                    "reward_std": float(std[p]),
                    "grad_norm": float(norms[p]),
                    "small_std": bool(std[p] < std_threshold),
                    "k": k,
                }
            )
        for i, comp in enumerate(samples.completions):
            result.samples.append(
                {
                    "prompt_id": batch[group[i]].prompt_id,
                    "sample": i % k,
                    "completion": comp,
                    "reward": values[i],
                    "logp": float(logps[i]),
                    "num_tokens": len(samples.completion_ids[i]),
                }
            )
        if on_batch is not None:
            on_batch(result)
    return result


def summarize(
    rows: Sequence[dict[str, Any]],
    *,
    std_threshold: float,
    low_reward: float | None = None,
    value_range: tuple[float, float] | None = None,
    low_reward_from: str | None = None,
) -> dict[str, Any]:
    """Fractions of prompts with small std, low reward, and both (the paper's Finding I).

    "Low reward" is mean reward below `low_reward`; by default the midpoint of the reward's range when
    the reward is bounded, else the median of the per-prompt means (the summary says which;
    `low_reward_from` names where a given `low_reward` came from). The median cannot tell low from
    high when every prompt has the same mean (all rewards 0, or all 1): then the threshold and the
    two fractions that need it are None, and the summary asks for --low-reward, rather than
    reporting "0% small std and low reward" for prompts that may all be stuck.
    """
    if not rows:
        return {"num_prompts": 0}
    means = [r["reward_mean"] for r in rows]
    thr: float | None
    if low_reward is not None:
        thr, how = low_reward, low_reward_from or "given (--low-reward)"
    elif value_range is not None:
        thr, how = (value_range[0] + value_range[1]) / 2, f"midpoint of the reward range {list(value_range)}"
    elif min(means) == max(means):
        thr = None
        how = (
            f"undefined: every prompt has mean reward {means[0]:.4g} and the reward has no known range; "
            "pass --low-reward"
        )
    else:
        thr, how = statistics.median(means), "median of the per-prompt mean rewards"
    small = [r["reward_std"] < std_threshold for r in rows]
    low = [thr is not None and m < thr for m in means]
    n = len(rows)
    norms_small = [r["grad_norm"] for r, s in zip(rows, small) if s and not math.isnan(r["grad_norm"])]
    norms_rest = [r["grad_norm"] for r, s in zip(rows, small) if not s and not math.isnan(r["grad_norm"])]
    return {
        "num_prompts": n,
        "std_threshold": std_threshold,
        "low_reward_threshold": thr,
        "low_reward_threshold_from": how,
        "frac_small_std": sum(small) / n,
        "frac_low_reward": sum(low) / n if thr is not None else None,
        "frac_small_std_and_low_reward": sum(s and lo for s, lo in zip(small, low)) / n
        if thr is not None
        else None,
        "reward_mean": sum(means) / n,
        "reward_std_mean": sum(r["reward_std"] for r in rows) / n,
        "grad_norm_median_small_std": statistics.median(norms_small) if norms_small else None,
        "grad_norm_median_other": statistics.median(norms_rest) if norms_rest else None,
        "note": THEOREM_NOTE,
    }
