"""PreflensGRPOCallback on TRL's GRPOTrainer with a tiny Llama and a toy reward: the stuck/solved prompts
and the zero-std share match the rewards, and the per-prompt gradient norms equal an explicit per-prompt
autograd loop over TRL's own loss (`_compute_loss` with every other group's advantage zeroed)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

pytest.importorskip("trl")

STUCK, SOLVED = {"p0"}, {"p1"}
# 4 prompts, 2 per generation batch, no shuffling: steps 1-3 see (p0, p1), (p2, p3), (p0, p1) again


def _reward(prompts, completions, prompt_id, **kw):
    """0 for stuck prompts, 1 for solved ones, a completion-dependent value in [0, 1) otherwise."""
    out = []
    for c, pid in zip(completions, prompt_id):
        if pid in STUCK:
            out.append(0.0)
        elif pid in SOLVED:
            out.append(1.0)
        else:
            out.append((sum(map(ord, c)) * 7 % 97) / 97)
    return out


def _dataset():
    from datasets import Dataset

    words = ["the cat", "a dog", "my hat", "the sun"]
    return Dataset.from_list([{"prompt": w, "prompt_id": f"p{i}"} for i, w in enumerate(words)])


def _trainer_class():
    from trl import GRPOTrainer

    class Reference(GRPOTrainer):
        """Records, per generation batch, ||d L_p / d theta|| by one explicit backward per prompt."""

        reference: list[list[float]]

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            if not self.model.training:
                return out
            g = self.num_generations
            params = [p for p in self.model.parameters() if p.requires_grad]
            norms = []
            for p in range(out["advantages"].shape[0] // g):
                adv = torch.zeros_like(out["advantages"])
                adv[p * g : (p + 1) * g] = out["advantages"][p * g : (p + 1) * g]
                loss = self._compute_loss(self.model, {**out, "advantages": adv})
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                norms.append(math.sqrt(sum(float(x.double().pow(2).sum()) for x in grads if x is not None)))
            self.reference.append(norms)
            return out

    return Reference


def _run(tmp_path, *, lora: bool = False, loss_type: str = "dapo"):
    from trl import GRPOConfig

    from preflens.integrations.trl_grpo import PreflensGRPOCallback
    from preflens.models import apply_lora, tiny_model

    model, tok = tiny_model(seed=1)
    model.train()
    if lora:
        model = apply_lora(model, rank=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=0.0)
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        loss_type=loss_type,
        seed=0,
        shuffle_dataset=False,
        bf16=False,
    )
    trainer = _trainer_class()(
        model=model, reward_funcs=_reward, args=args, train_dataset=_dataset(), processing_class=tok
    )
    trainer.reference = []
    trainer.add_callback(PreflensGRPOCallback(trainer, std_threshold=0.05, low_reward=0.5))
    trainer.train()
    return trainer, tmp_path / "out"


def _check(trainer, out):
    prompts = pd.read_parquet(out / "prompts.parquet")
    assert len(prompts) == 3 * 2 and sorted(prompts["step"].unique()) == [1, 2, 3]
    for _, r in prompts.iterrows():
        want = "stuck" if r.prompt_id in STUCK else "solved" if r.prompt_id in SOLVED else "learning"
        assert r.status == want, (r.prompt_id, r.status)
        assert bool(r.zero_std) == (want != "learning")
    # each group's reward mean and std (ddof=1, as TRL) recomputed from its logged completions
    samples = pd.read_parquet(out / "samples.parquet")
    assert len(samples) == 3 * 8
    for _, r in prompts.iterrows():
        g = samples[(samples.step == r.step) & (samples.prompt_id == r.prompt_id)]
        want = torch.tensor(_reward(None, g.completion.tolist(), [r.prompt_id] * len(g)), dtype=torch.float64)
        assert len(g) == 4 and g.reward.tolist() == pytest.approx(want.tolist())
        assert r.reward_mean == pytest.approx(float(want.mean())) and r.reward_std == pytest.approx(
            float(want.std())
        )
        assert r["reward_mean/_reward"] == pytest.approx(r.reward_mean)
    # history: p0 and p1 come back at step 3, seen twice; the others once
    for pid, steps in {"p0": [1, 3], "p1": [1, 3], "p2": [2], "p3": [2]}.items():
        h = prompts[prompts.prompt_id == pid].sort_values("step")
        assert h.step.tolist() == steps and h.times_seen.tolist() == list(range(1, len(steps) + 1))
    # gradient norms: exactly 0 for equal-reward groups, else equal to the explicit loop
    ours = [prompts[prompts.step == s]["grad_norm"].tolist() for s in (1, 2, 3)]
    assert len(trainer.reference) == 3
    for mine, ref in zip(ours, trainer.reference):
        for a, b in zip(mine, ref):
            if b == 0:
                assert a == 0.0
            else:
                assert a == pytest.approx(b, rel=1e-4), (mine, ref)
    assert any(b > 0 for ref in trainer.reference for b in ref)
    assert (prompts[prompts.status != "learning"]["grad_norm"] == 0).all()
    # the per-step zero-std share: what the rewards say, and what TRL itself logged
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    groups = {r["step"]: r for r in rows if r["split"] == "groups"}
    trl_rows = {r["step"]: r for r in rows if r["split"] == "train" and "frac_reward_zero_std" in r}
    for s in (1, 2, 3):
        want = (prompts[prompts.step == s]["status"] != "learning").mean()
        assert groups[s]["groups/frac_zero_std"] == pytest.approx(want)
        assert trl_rows[s]["frac_reward_zero_std"] == pytest.approx(want)
        stuck = (prompts[prompts.step == s]["prompt_id"].isin(STUCK)).mean()
        assert groups[s]["groups/frac_stuck"] == pytest.approx(stuck)
    settings = json.loads((out / "grpo.json").read_text())
    assert settings["kind"] == "grpo" and settings["low_reward_threshold"] == 0.5
    return prompts


@pytest.mark.slow
def test_grpo_callback_full_finetuning_matches_explicit_loop(tmp_path):
    trainer, out = _run(tmp_path)
    _check(trainer, out)


@pytest.mark.slow
def test_grpo_callback_lora_grpo_loss(tmp_path):
    trainer, out = _run(tmp_path, lora=True, loss_type="grpo")
    _check(trainer, out)


def test_group_stats_and_status():
    from preflens.integrations.trl_grpo import group_stats, prompt_status

    r = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 3.0, float("nan"), 2.0])
    mean, std = group_stats(r, 4)
    assert mean.tolist() == pytest.approx([0.25, 2.0])
    assert std[0] == pytest.approx(torch.tensor([0.0, 0.0, 0.0, 1.0]).std().item())
    assert std[1] == pytest.approx(torch.tensor([1.0, 3.0, 2.0]).std().item())
    assert prompt_status(0.0, 0.0, 0.05, 0.5) == "stuck"
    assert prompt_status(1.0, 0.01, 0.05, 0.5) == "solved"
    assert prompt_status(0.0, 0.2, 0.05, 0.5) == "learning"
    assert prompt_status(0.0, 0.0, 0.05, None) == "small_std"
