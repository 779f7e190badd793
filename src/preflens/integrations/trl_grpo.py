"""Per-prompt reward std, stuck vs solved prompts and per-prompt policy-gradient norms inside TRL's
`GRPOTrainer`: a `TrainerCallback`.

Why (Razin et al. 2024, "Vanishing Gradients in Reinforcement Finetuning of Language Models", ICLR 2024,
arXiv 2310.20703, Sec. 3-4): the expected gradient of a prompt vanishes with the std of its reward under
the model, whatever that reward is. GRPO's group-normalised advantage makes this literal: a group whose
completions all get the same reward has advantage 0 everywhere and contributes exactly nothing to the
step. TRL logs one batch-level `reward_std` and `frac_reward_zero_std`; this callback shows, per prompt,
which prompts are *stuck* (small std and low reward: the ones the paper's remedy, a short initial SFT on a
few labelled examples, rescues), which are *solved* (small std, high reward) and which are *learning*, and
the norm of each prompt's share of the step's own policy gradient.

    trainer = GRPOTrainer(model=..., reward_funcs=[...], args=GRPOConfig(output_dir="out", ...), ...)
    trainer.add_callback(PreflensGRPOCallback(trainer, std_threshold=0.05, low_reward=0.5))
    trainer.train()
    # then: preflens report out

How it sees the groups: it wraps the trainer's `_generate_and_score_completions` (the one place where
TRL has the generation batch, its rewards per function and its advantages together) and records, before
the batch is split into micro-batches and before any update, per group of `num_generations` completions:
- reward mean and std (ddof=1, as TRL's `nanstd`) of the combined reward (TRL's weighted `nansum` over the
  reward functions) and of each reward function;
- the per-prompt policy-gradient norm ||d L_p / d theta|| where L_p is the prompt's part of TRL's loss.
  On-policy (the ratio is 1 at the parameters that generated the batch), the loss's gradient is
  -sum_i c_i grad log pi(y_i|x) with c_i = A_i times the loss type's normaliser (`sequence_weights`), so
  the norms are the within-group block sums of the Gram of the weighted per-sequence gradients, from ONE
  forward and one activation-only backward over the batch (`preflens.grad.GramCapture`, exactly as
  `preflens.diagnostics.reward_std` does): no per-prompt backward, no gradient materialised, the model's
  `.grad` untouched. A group whose rewards are all equal has A = 0 and norm exactly 0.
  The norm is of the advantage term only (a KL term, `beta > 0`, is not included) and is computed at
  the parameters that generated the batch; it is NaN (with one warning) where the loss's per-token
  weights are not sequence constants (`vespo`, sequence-level importance sampling, entropy or off-policy
  masks, vLLM importance ratios) or `temperature != 1`.

What it writes into `args.output_dir` (preflens's run-directory format; `preflens report` reads it):
- `metrics.jsonl`: TRL's logs (split "train", `learning_rate` -> `lr`) and one split "groups" row per
  generation batch: `groups/frac_zero_std` (share of completions in zero-std groups: TRL's
  `frac_reward_zero_std`), `groups/frac_small_std`, `groups/frac_stuck`, `groups/frac_solved`,
  `groups/reward_mean`, `groups/reward_std_mean`, `groups/grad_norm_median_small_std`, `groups/grad_norm_median_other`;
- `prompts.parquet`: per generation batch and prompt: step, phase "grpo", prompt_id, prompt,
  reward_mean, reward_std, `reward_mean/<func>`, `reward_std/<func>`, grad_norm, small_std, zero_std,
  status (stuck / solved / learning), times_seen (the prompt's history across steps is its rows);
- `samples.parquet`: every completion (step, prompt_id, sample, completion, reward, advantage);
- `grpo.json`: the settings (thresholds and where the low-reward bar came from, loss type, group size).
Only the main process writes; groups split across processes get a NaN gradient norm.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from preflens.grad import GramCapture
from preflens.logprobs import sequence_logps
from preflens.tracking import METRICS_FILE, MetricsWriter, TableWriter

__all__ = [
    "GRPO_FILE",
    "PreflensGRPOCallback",
    "group_grad_norms",
    "group_stats",
    "prompt_status",
    "sequence_weights",
]

GRPO_FILE = "grpo.json"
SEQUENCE_CONSTANT_LOSSES = ("grpo", "sapo", "bnpo", "dr_grpo", "dapo", "cispo", "luspo")


def group_stats(rewards: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """Per-group nan-aware mean and std (ddof=1) of a flat reward vector in groups of `group` rows."""
    r = rewards.double().view(-1, group)
    ok = ~torch.isnan(r)
    n = ok.sum(1)
    mean = torch.where(ok, r, 0).sum(1) / n.clamp_min(1)
    var = torch.where(ok, (r - mean[:, None]) ** 2, 0).sum(1) / (n - 1).clamp_min(1)
    mean = torch.where(n > 0, mean, torch.nan)
    std = torch.where(n > 1, var.sqrt(), torch.zeros_like(var))
    return mean, std


def prompt_status(mean: float, std: float, std_threshold: float, low_reward: float | None) -> str:
    """stuck: std below the threshold and mean below the low-reward bar; solved: small std, mean at or
    above it; learning: the rest (a std large enough for the prompt to receive a gradient)."""
    if not std < std_threshold:
        return "learning"
    if low_reward is None or math.isnan(mean):
        return "small_std"
    return "stuck" if mean < low_reward else "solved"


def sequence_weights(trainer: Any, out: dict[str, Any]) -> Tensor | None:
    """c_i with d L / d theta = -sum_i c_i grad log pi(y_i|x) for TRL's loss at ratio 1, summed over the
    micro-batches the generation batch is split into and averaged over processes (None: not a sequence
    constant for this configuration, see the module docstring)."""
    args = trainer.args
    if (
        trainer.loss_type not in SEQUENCE_CONSTANT_LOSSES
        or getattr(trainer, "importance_sampling_level", "token") != "token"
        or getattr(trainer, "top_entropy_quantile", 1.0) < 1.0
        or getattr(trainer, "off_policy_mask_threshold", None) is not None
        or "importance_sampling_ratio" in out
        or float(getattr(trainer, "temperature", 1.0)) != 1.0
    ):
        return None
    adv = out["advantages"].detach().double()
    if adv.dim() != 1:
        return None
    mask = out["completion_mask"].double()
    if "tool_mask" in out:
        mask = mask * out["tool_mask"].double()
    ga, procs = args.gradient_accumulation_steps, trainer.accelerator.num_processes
    spg, bmb = args.steps_per_generation, args.per_device_train_batch_size
    lengths = mask.sum(1).clamp_min(1.0)
    if trainer.loss_type in ("grpo", "sapo"):
        scale = 1.0 / (lengths * bmb * ga * procs)
    elif trainer.loss_type == "bnpo":  # tokens of the micro-batch: exact when steps_per_generation == 1
        scale = torch.full_like(adv, spg / (float(mask.sum().clamp_min(1.0)) * ga * procs))
    elif trainer.loss_type == "dr_grpo":
        scale = torch.full_like(adv, 1.0 / (bmb * args.max_completion_length * ga * procs))
    elif trainer.loss_type == "luspo":
        scale = torch.full_like(adv, 1.0 / (bmb * ga * procs))
    else:  # dapo, cispo: normalised by the generation batch's active tokens, all processes
        items = float(torch.as_tensor(out["num_items_in_batch"]).clamp_min(1.0))
        scale = torch.full_like(adv, spg / (items * ga))
    return adv * scale


def group_grad_norms(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    weights: Tensor,
    group: int,
    *,
    params: list[nn.Parameter] | None = None,
    groups_per_pass: int | None = None,
) -> Tensor:
    """||sum_{i in group p} w_i grad log pi(y_i|x_p)|| for each group of `group` consecutive rows [P].

    One forward and one activation-only backward per pass of `groups_per_pass` groups (default: all),
    with the per-sequence Gram hooks; the within-group blocks of the Gram of w_s grad logp_s summed give
    each group's squared norm. Groups whose weights are all 0 get exactly 0 (and are not run).
    """
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    n_groups = input_ids.shape[0] // group
    w = weights.view(n_groups, group)
    norms = torch.zeros(n_groups, dtype=torch.float64)
    live = [g for g in range(n_groups) if bool(torch.any(w[g] != 0))]
    step = groups_per_pass or max(1, len(live))
    for start in range(0, len(live), step):
        chunk = live[start : start + step]
        rows = torch.cat([torch.arange(g * group, (g + 1) * group) for g in chunk]).to(input_ids.device)
        ids, am, rm = input_ids[rows], attention_mask[rows], response_mask[rows].bool()
        cw = w[chunk].reshape(-1).to(ids.device)
        cap = GramCapture(model, am, rm, params, compute_dtype=torch.float64, anchor=True)
        with torch.enable_grad(), cap:
            logps = sequence_logps(model, ids, am, rm).logps
            cap.check_graph(logps)
            torch.autograd.grad((cw.to(logps.dtype) * logps).sum(), cap.anchors)
        gram = cap.finish()
        k = len(chunk)
        blocks = gram.view(k, group, k, group).diagonal(dim1=0, dim2=2)  # [group, group, k]
        norms[chunk] = blocks.sum((0, 1)).clamp_min(0).sqrt().cpu()
    return norms


def _prompt_key(row: dict[str, Any]) -> str:
    if row.get("prompt_id") is not None:
        return str(row["prompt_id"])
    text = json.dumps(row.get("prompt"), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):  # conversational: the last user turn
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1] if users else prompt)
    return str(prompt)


def _median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if not math.isnan(x))
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


class PreflensGRPOCallback(TrainerCallback):
    """Per-prompt reward std, stuck/solved/learning and gradient norms for TRL's `GRPOTrainer`.

    Args:
        trainer: the `GRPOTrainer` (its generation step is wrapped at construction).
        std_threshold: a group whose reward std is below this is "small std" (reward units).
        low_reward: the bar below which a small-std prompt is stuck; default: the midpoint of the
            smallest and largest reward seen so far in the run (0.5 for a 0/1 reward), as `grpo.json` says.
        grad_norms: compute the per-prompt policy-gradient norms (one extra forward + backward per batch).
        groups_per_pass: groups per Gram pass (memory); default all of the local batch.
        output_dir: where to write (default: the trainer's `args.output_dir`).
    """

    def __init__(
        self,
        trainer: Any,
        *,
        std_threshold: float = 0.05,
        low_reward: float | None = None,
        grad_norms: bool = True,
        groups_per_pass: int | None = None,
        output_dir: str | Path | None = None,
    ) -> None:
        self.trainer = trainer
        self.out = Path(output_dir if output_dir is not None else trainer.args.output_dir)
        self.std_threshold = float(std_threshold)
        self.low_reward = low_reward
        self.grad_norms = grad_norms
        self.groups_per_pass = groups_per_pass
        self.reward_range: list[float] = [math.inf, -math.inf]
        self.seen: dict[str, int] = {}
        self.warned = False
        main = trainer.accelerator.is_main_process
        self.main = main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsWriter(self.out / METRICS_FILE, enabled=main)
        self.prompts = TableWriter(self.out / "prompts.parquet", enabled=main)
        self.samples = TableWriter(self.out / "samples.parquet", enabled=main)
        original = trainer._generate_and_score_completions

        def wrapped(inputs: list[dict[str, Any]]) -> dict[str, Any]:
            out = original(inputs)
            if trainer.model.training:
                self.record(inputs, out)
            return out

        trainer._generate_and_score_completions = wrapped

    # -- the measurement -------------------------------------------------------------------------

    def _bar(self) -> tuple[float | None, str]:
        if self.low_reward is not None:
            return float(self.low_reward), "given (low_reward)"
        lo, hi = self.reward_range
        if not lo < hi:
            return None, "undefined: every reward so far is equal; pass low_reward"
        return (lo + hi) / 2, f"midpoint of the rewards seen so far [{lo:.4g}, {hi:.4g}]"

    def _local_norms(self, out: dict[str, Any], n_local: int, group: int) -> list[float]:
        """The local groups' gradient norms (NaN where not exact: split groups, unsupported loss)."""
        tr = self.trainer
        start = tr.accelerator.process_index * n_local
        whole = n_local % group == 0 and start % group == 0
        weights = sequence_weights(tr, out) if self.grad_norms else None
        if weights is None or not whole:
            if self.grad_norms and not self.warned:
                warnings.warn(
                    "PreflensGRPOCallback: per-prompt gradient norms are not exact for this configuration "
                    f"(loss_type={tr.loss_type!r}, whole groups per process: {whole}); they are left NaN",
                    stacklevel=2,
                )
                self.warned = True
            return [math.nan] * (n_local // group if whole else 0)
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        am = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        resp = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
        rm = torch.cat([torch.zeros_like(out["prompt_mask"]), resp], 1).bool()
        model = tr.accelerator.unwrap_model(tr.model)
        with (
            tr.compute_loss_context_manager()
        ):  # the loss's autocast, if any (bf16: agrees to bf16 round-off)
            norms = group_grad_norms(model, ids, am, rm, weights, group, groups_per_pass=self.groups_per_pass)
        return [float(x) for x in norms]

    def record(self, inputs: list[dict[str, Any]], out: dict[str, Any]) -> None:
        """Log the groups of one training generation batch (called by the wrapped generation step)."""
        from accelerate.utils import gather_object

        tr = self.trainer
        group, n_local = tr.num_generations, len(inputs)
        n = n_local * tr.accelerator.num_processes
        names = list(tr.reward_func_names)
        per_func = torch.tensor([list(tr._logs["rewards"][k])[-n:] for k in names], dtype=torch.float64).T
        w = tr.reward_weights.detach().cpu().double()
        combined = (per_func * w).nansum(1)
        combined[torch.isnan(per_func).all(1)] = torch.nan
        adv = list(tr._logs["advantages"])[-n:]
        completions = list(tr._logs["completion"])[-n:]
        keys = gather_object([_prompt_key(x) for x in inputs])
        texts = gather_object([_prompt_text(x.get("prompt")) for x in inputs])
        norms = gather_object(self._local_norms(out, n_local, group))
        finite = combined[~torch.isnan(combined)]
        if finite.numel():
            self.reward_range = [
                min(self.reward_range[0], float(finite.min())),
                max(self.reward_range[1], float(finite.max())),
            ]
        bar, _ = self._bar()
        mean, std = group_stats(combined, group)
        func_stats = {k: group_stats(per_func[:, j].contiguous(), group) for j, k in enumerate(names)}
        step = int(tr.state.global_step) + 1
        rows = []
        for p in range(n // group):
            key = keys[p * group]
            self.seen[key] = self.seen.get(key, 0) + 1
            row = {
                "step": step,
                "split": "train",
                "phase": "grpo",
                "prompt_id": key,
                "prompt": texts[p * group],
                "reward_mean": float(mean[p]),
                "reward_std": float(std[p]),
                "grad_norm": float(norms[p]) if p < len(norms) else math.nan,
                "small_std": bool(std[p] < self.std_threshold),
                "zero_std": bool(torch.isclose(std[p], torch.zeros((), dtype=std.dtype))),
                "status": prompt_status(float(mean[p]), float(std[p]), self.std_threshold, bar),
                "times_seen": self.seen[key],
            }
            for k, (fm, fs) in func_stats.items():
                row[f"reward_mean/{k}"], row[f"reward_std/{k}"] = float(fm[p]), float(fs[p])
            rows.append(row)
        self.prompts.append(rows)
        self.samples.append(
            {
                "step": step,
                "prompt_id": keys[i],
                "sample": i % group,
                "completion": str(completions[i]),
                "reward": float(combined[i]),
                "advantage": float(adv[i]),
            }
            for i in range(n)
        )
        self.metrics.write(self._summary_row(step, rows, group))
        self._write_settings()

    def _summary_row(self, step: int, rows: list[dict[str, Any]], group: int) -> dict[str, Any]:
        n = max(1, len(rows))
        small = [r for r in rows if r["small_std"]]
        rest = [r for r in rows if not r["small_std"]]
        return {
            "step": step,
            "split": "groups",
            "groups/num_prompts": len(rows),
            "groups/reward_mean": sum(r["reward_mean"] for r in rows) / n,
            "groups/reward_std_mean": sum(r["reward_std"] for r in rows) / n,
            "groups/frac_zero_std": sum(r["zero_std"] for r in rows) / n,
            "groups/frac_small_std": len(small) / n,
            "groups/frac_stuck": sum(r["status"] == "stuck" for r in rows) / n,
            "groups/frac_solved": sum(r["status"] == "solved" for r in rows) / n,
            "groups/grad_norm_median_small_std": _median([r["grad_norm"] for r in small]),
            "groups/grad_norm_median_other": _median([r["grad_norm"] for r in rest]),
        }

    def _write_settings(self) -> None:
        if not self.main:
            return
        bar, how = self._bar()
        tr = self.trainer
        settings = {
            "kind": "grpo",
            "std_threshold": self.std_threshold,
            "low_reward_threshold": bar,
            "low_reward_threshold_from": how,
            "num_generations": tr.num_generations,
            "loss_type": tr.loss_type,
            "beta": float(tr.beta),
            "reward_funcs": list(tr.reward_func_names),
            "reward_weights": [float(x) for x in tr.reward_weights],
            "grad_norm": "||d L_p/d theta||, the prompt's share of TRL's loss (advantage term), at the "
            "parameters that generated the batch",
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / GRPO_FILE).write_text(json.dumps(settings, indent=2))

    # -- TrainerCallback hooks -------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        """On a resumed run, drop what was logged after the checkpoint (it is logged again)."""
        if state.global_step > 0:
            self.metrics.truncate_after(int(state.global_step))
            for table in (self.prompts, self.samples):
                table.load(up_to_step=int(state.global_step))
            for r in self.prompts.rows:
                self.seen[r["prompt_id"]] = max(self.seen.get(r["prompt_id"], 0), int(r["times_seen"]))

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if not logs:
            return
        row: dict[str, Any] = {"step": int(state.global_step), "split": "train"}
        for k, v in logs.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                row["lr" if k == "learning_rate" else k] = float(v)
        self.metrics.write(row)
        self.flush()

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.flush()

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.flush()

    def flush(self) -> None:
        self.prompts.flush()
        self.samples.flush()
