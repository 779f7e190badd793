"""RFT loop: learns a synthetic task, resumes exactly, keeps its work when the reward breaks, initial SFT."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from _say_word import make_tiny
from preflens.data.prompts import PromptRow
from preflens.errors import PreflensError, RunDirError
from preflens.rewards import Reward, RewardError, get_reward
from preflens.training.rft import RFTConfig, RFTRun, latest_checkpoint, train_rft

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["say apple", "say the word apple", "please say apple", "x y"]


def apple_fraction(prompts, completions):
    """Deterministic reward: the share of the completion's words that are 'apple'."""
    return [sum(w == "apple" for w in c.split()) / max(1, len(c.split())) for c in completions]


def _rows(refs: bool = True) -> list[PromptRow]:
    return [PromptRow(i, p, "apple" if refs else None) for i, p in enumerate(PROMPTS)]


def _metrics(run) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


FAST = dict(k=8, prompts_per_step=4, lr=1e-2, max_new_tokens=3)


def test_rft_raises_mean_reward_on_say_the_word(tmp_path):
    import pandas as pd

    model, tok = make_tiny()
    summary = train_rft(
        model, tok, _rows(), get_reward(apple_fraction), RFTConfig(steps=20, **FAST), tmp_path / "run"
    )
    init, final = summary["reward_mean"]["init"], summary["reward_mean"]["final"]
    assert init < 0.3
    assert final > 0.8
    rows = _metrics(tmp_path / "run")
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 21))
    for key in ("reward/mean", "reward/std", "frac_small_std", "grad_norm", "kl", "loss", "lr"):
        assert key in train[0]
    df = pd.read_parquet(tmp_path / "run" / "prompts.parquet")
    assert {"step", "prompt_id", "reward_mean", "reward_std", "grad_norm"} <= set(df.columns)
    assert len(df[df["split"] == "train"]) == 20 * 4
    # a prompt whose K rewards were all equal got exactly zero gradient
    assert (df.loc[df["reward_std"] == 0, "grad_norm"] == 0).all()
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    import pandas as pd

    # with a KL penalty, so the resumed run must also find the original reference model
    cfg = RFTConfig(steps=4, save_every=2, k=4, prompts_per_step=2, lr=1e-2, max_new_tokens=3, kl_coef=0.1)
    model, tok = make_tiny()
    train_rft(model, tok, _rows(), get_reward(apple_fraction), cfg, tmp_path / "a")
    # simulate a crash after step 2: copy the run and drop everything the last checkpoint does not cover
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-4")
    shutil.rmtree(tmp_path / "b" / "final")
    model_b, tok_b = make_tiny(seed=123)  # different initial weights: the checkpoint must override them
    train_rft(model_b, tok_b, _rows(), get_reward(apple_fraction), cfg, tmp_path / "b", resume=True)
    ma, mb = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    drop = {"step_time"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in ma] == [
        {k: v for k, v in r.items() if k not in drop} for r in mb
    ]
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "a" / "prompts.parquet"),
        pd.read_parquet(tmp_path / "b" / "prompts.parquet"),
    )
    for p, q in zip(model.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q)


def test_run_dir_is_refused_unless_overwrite_or_resume(tmp_path):
    model, tok = make_tiny()
    run = tmp_path / "run"
    run.mkdir()
    (run / "something").write_text("x")
    (run / "metrics.jsonl").write_text("{}\n")  # a previous run's: --overwrite replaces run directories only
    cfg = RFTConfig(steps=1, **FAST)
    with pytest.raises(RunDirError, match="--overwrite"):
        train_rft(model, tok, _rows(), get_reward(apple_fraction), cfg, run)
    with pytest.raises(RunDirError, match="no checkpoints"):
        train_rft(model, tok, _rows(), get_reward(apple_fraction), cfg, run, resume=True)
    with pytest.raises(RunDirError, match="nothing to resume"):
        train_rft(model, tok, _rows(), get_reward(apple_fraction), cfg, tmp_path / "missing", resume=True)
    train_rft(model, tok, _rows(), get_reward(apple_fraction), cfg, run, overwrite=True)
    assert not (run / "something").exists()


class _BreaksLater(Reward):
    """Works for the first `ok_calls` calls, then raises on any batch containing a 'banana' prompt."""

    name = "breaks-later"

    def __init__(self, ok_calls: int) -> None:
        self.calls, self.ok_calls = 0, ok_calls

    def __call__(self, prompts, completions, *, references=None):
        self.calls += 1
        if self.calls > self.ok_calls and any("banana" in p for p in prompts):
            raise ConnectionError("reward server unreachable")
        return apple_fraction(prompts, completions)


def test_reward_failure_names_prompt_and_keeps_progress(tmp_path):
    rows = _rows() + [PromptRow(4, "say banana", "apple")]
    cfg = RFTConfig(steps=6, k=4, prompts_per_step=5, lr=1e-2, max_new_tokens=3)
    model, tok = make_tiny()
    run = tmp_path / "run"
    # calls: 1 = init eval (one batch of 5 prompts), 2..4 = RFT steps 1..3, 5 fails at step 4
    with pytest.raises(RewardError, match=r"prompt 4 \('say banana'\).*ConnectionError.*step 4.*--resume"):
        train_rft(model, tok, rows, _BreaksLater(ok_calls=4), cfg, run)
    assert [r["step"] for r in _metrics(run) if r["split"] == "train"] == [1, 2, 3]
    assert latest_checkpoint(run).name == "step-3"
    summary = train_rft(make_tiny()[0], tok, rows, get_reward(apple_fraction), cfg, run, resume=True)
    assert [r["step"] for r in _metrics(run) if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert summary["evals"]["final"]["step"] == 6


def test_nan_reward_in_first_evaluation_is_reported(tmp_path):
    model, tok = make_tiny()

    def nan_on_x(prompts, completions):
        return [float("nan") if p == "x y" else 0.0 for p in prompts]

    with pytest.raises(RewardError, match=r"returned nan for completion 0 of prompt 3 \('x y'\)"):
        train_rft(model, tok, _rows(), get_reward(nan_on_x), RFTConfig(steps=2, **FAST), tmp_path / "run")


def test_initial_sft_reduces_small_std_fraction(tmp_path):
    model, tok = make_tiny()
    cfg = RFTConfig(
        steps=1,
        initial_sft=8,
        sft_lr=1e-2,
        sft_fraction=1.0,
        k=8,
        prompts_per_step=4,
        max_new_tokens=1,
        lr=1e-3,
    )
    # exact match with the reference "apple": the random model rarely says it, so every sample gets 0
    summary = train_rft(model, tok, _rows(), get_reward("exact"), cfg, tmp_path / "run")
    eff = summary["sft_effect"]
    assert eff["frac_small_std_before"] >= 0.5
    assert eff["frac_small_std_after"] < eff["frac_small_std_before"]
    assert (
        summary["frac_small_std_and_low_reward"]["after_sft"]
        < summary["frac_small_std_and_low_reward"]["init"]
    )
    assert eff["reward_mean_after"] > eff["reward_mean_before"] + 0.2
    sft_rows = [r for r in _metrics(tmp_path / "run") if r.get("phase") == "sft"]
    assert [r["step"] for r in sft_rows] == list(range(1, 9))
    assert sft_rows[-1]["loss"] < sft_rows[0]["loss"]
    assert (tmp_path / "run" / "sft" / "config.json").exists()
    with pytest.raises(PreflensError, match="reference"):
        train_rft(model, tok, _rows(refs=False), get_reward(apple_fraction), cfg, tmp_path / "run2")


def test_kl_penalty_starts_at_zero(tmp_path):
    model, tok = make_tiny()
    cfg = RFTConfig(steps=3, kl_coef=0.1, **FAST)
    train_rft(model, tok, _rows(), get_reward(apple_fraction), cfg, tmp_path / "run")
    kl = [r["kl"] for r in _metrics(tmp_path / "run") if r["split"] == "train"]
    assert kl[0] == pytest.approx(0.0, abs=1e-5)  # the policy is the reference at step 1
    assert abs(kl[-1]) > 1e-4
    assert (tmp_path / "run" / "reference_model.pt").exists()


def test_cli_defaults_match_config():
    from preflens.commands.rft import DEFAULTS

    defaults = {f.name: f.default for f in dataclasses.fields(RFTConfig)}
    for key, value in DEFAULTS.items():
        assert defaults[key] == value, key


def test_cli_rft_end_to_end_and_user_errors(tmp_path, monkeypatch):
    """`preflens rft` through the real CLI entry point: flags reach the trainer, user errors exit 2."""
    import sys

    from preflens import cli

    model, tok = make_tiny()
    monkeypatch.setattr("preflens.commands.rft._load", lambda name: (model, tok))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "reference": "apple"}) + "\n" for p in PROMPTS))
    run = tmp_path / "run"
    argv = ["preflens", "rft", "--prompts", str(prompts), "--reward", "keyword:apple", "-o", str(run)]
    argv += [
        "--steps",
        "2",
        "-k",
        "4",
        "--prompts-per-step",
        "2",
        "--max-new-tokens",
        "2",
        "--initial-sft",
        "1",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    cli.main()
    cfg = (run / "config.yaml").read_text()
    assert "initial_sft: 1" in cfg and "k: 4" in cfg
    assert [r["step"] for r in _metrics(run) if r["split"] == "train"] == [1, 2, 3]
    # the same command again: the run dir exists -> a one-line error and exit code 2, no traceback
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    monkeypatch.setattr(sys, "argv", argv[:5] + ["exact", "-o", str(tmp_path / "r2")])
    prompts.write_text(json.dumps({"prompt": "say apple"}) + "\n")
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2


def test_gram_and_loop_gradient_methods_train_identically(tmp_path):
    """One batched backward with Gram hooks gives the same update and per-prompt norms as the loop."""
    import pandas as pd

    out = {}
    for method in ("loop", "gram"):
        model, tok = make_tiny()
        cfg = RFTConfig(steps=3, grad_method=method, kl_coef=0.05, **FAST)
        train_rft(model, tok, _rows(), get_reward(apple_fraction), cfg, tmp_path / method)
        out[method] = (
            model,
            _metrics(tmp_path / method),
            pd.read_parquet(tmp_path / method / "prompts.parquet"),
        )
    (ma, rows_a, pa), (mb, rows_b, pb) = out["loop"], out["gram"]
    for a, b in zip(rows_a, rows_b):
        for key in ("reward/mean", "reward/std", "grad_norm", "kl", "loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    pd.testing.assert_series_equal(pa["grad_norm"], pb["grad_norm"], rtol=1e-4)
    for p, q in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_reward_failure_in_post_sft_evaluation_resumes_there(tmp_path):
    rows = _rows() + [PromptRow(4, "say banana", "apple")]
    cfg = RFTConfig(steps=2, initial_sft=2, save_every=1, k=4, prompts_per_step=5, lr=1e-2, max_new_tokens=2)
    run = tmp_path / "run"
    model, tok = make_tiny()
    with pytest.raises(RewardError, match="post-SFT evaluation"):  # call 1: init eval; call 2 fails
        train_rft(model, tok, rows, _BreaksLater(ok_calls=1), cfg, run)
    assert latest_checkpoint(run).name == "step-2"
    summary = train_rft(make_tiny()[0], tok, rows, get_reward(apple_fraction), cfg, run, resume=True)
    assert "sft_effect" in summary and summary["evals"]["after_sft"]["step"] == 2
    assert [(r["step"], r["phase"]) for r in _metrics(run) if r["split"] == "train"] == [
        (1, "sft"),
        (2, "sft"),
        (3, "rft"),
        (4, "rft"),
    ]


def test_lora_rft_trains_only_adapters_and_resumes(tmp_path, monkeypatch):
    from preflens.commands.rft import run_rft

    base, tok = make_tiny()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    monkeypatch.setattr("preflens.commands.rft._load", lambda name: (base, tok))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    kw = dict(model=None, prompts=prompts, reward="keyword:apple", lora_rank=4, k=4, prompts_per_step=2)
    kw.update(max_new_tokens=2, lr=5e-2, save_every=2, kl_coef=0.1)
    run_rft(output_dir=tmp_path / "run", steps=2, **kw)
    # frozen base weights are untouched, the adapters moved
    after = base.state_dict()  # peft wrapped the modules in place: q_proj.weight -> q_proj.base_layer.weight
    frozen = {k.replace(".base_layer", ""): v for k, v in after.items() if "lora_" not in k}
    assert frozen.keys() == before.keys()
    assert all(torch.equal(before[k], frozen[k]) for k in before)
    assert any(v.abs().sum() > 0 for k, v in after.items() if "lora_B" in k)  # B starts at 0
    assert (tmp_path / "run" / "final" / "adapter_config.json").exists()
    # resume with more steps: the adapter and optimizer come back from checkpoints/step-2
    base2, _ = make_tiny()
    monkeypatch.setattr("preflens.commands.rft._load", lambda name: (base2, tok))
    run_rft(output_dir=tmp_path / "run", steps=4, resume=True, **kw)
    assert [r["step"] for r in _metrics(tmp_path / "run") if r["split"] == "train"] == [1, 2, 3, 4]


class _CtrlCAt(Reward):
    """apple_fraction, but the `at`-th call raises KeyboardInterrupt (Ctrl-C while a step scores)."""

    name = "ctrl-c"

    def __init__(self, at: int) -> None:
        self.calls, self.at = 0, at

    def __call__(self, prompts, completions, *, references=None):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return apple_fraction(prompts, completions)


def test_ctrl_c_checkpoints_the_last_step_and_resume_matches_the_uninterrupted_run(tmp_path):
    """Ctrl-C before a step's update rewinds it (data position, RNG, gradients) and checkpoints the last
    finished step: the resumed run equals one never interrupted. 2 of 4 prompts per step, so the data
    position matters; no --save-every checkpoint exists before the interrupt."""
    cfg = RFTConfig(steps=4, save_every=0, k=4, prompts_per_step=2, lr=1e-2, max_new_tokens=3, eval_every=0)
    model_a, tok = make_tiny()
    train_rft(model_a, tok, _rows(), get_reward(apple_fraction), cfg, tmp_path / "a")

    model_b, _ = make_tiny()
    # calls: 1-2 = initial evaluation (4 prompts in batches of 2), 3-4 = steps 1-2, 5 = step 3
    with pytest.raises(KeyboardInterrupt):
        train_rft(model_b, tok, _rows(), _CtrlCAt(5), cfg, tmp_path / "b")
    assert latest_checkpoint(tmp_path / "b").name == "step-2"
    assert [r["step"] for r in _metrics(tmp_path / "b") if r["split"] == "train"] == [1, 2]
    model_c, _ = make_tiny(seed=123)  # the checkpoint must override these weights
    train_rft(model_c, tok, _rows(), get_reward(apple_fraction), cfg, tmp_path / "b", resume=True)
    drop = {"step_time"}
    ma, mb = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ma] == [
        {k: v for k, v in r.items() if k not in drop} for r in mb
    ]
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        torch.testing.assert_close(p, q)


def test_old_import_paths_are_the_new_objects():
    """`preflens.rft` and the prompts names of `preflens.diagnostics.reward_std` are re-exports."""
    import preflens.data.prompts as prompts
    import preflens.diagnostics.reward_std as reward_std
    import preflens.rft as old
    import preflens.training.rft as new

    for name in ("RFTConfig", "train_rft", "prepare_run_dir", "latest_checkpoint", "REFERENCE_FILE"):
        assert getattr(old, name) is getattr(new, name), name
    for name in ("PromptRow", "load_prompts", "encode_prompt"):
        assert getattr(reward_std, name) is getattr(prompts, name), name


def test_ctrl_c_during_the_update_keeps_the_last_checkpoint(tmp_path):
    """Ctrl-C once the optimizer has started writing the parameters cannot be rewound: no checkpoint is
    written for the half-updated step: the last saved one (here: none) stays the resume point."""
    cfg = RFTConfig(steps=4, save_every=0, k=4, prompts_per_step=2, lr=1e-2, max_new_tokens=3)
    model, tok = make_tiny()
    run = RFTRun(model, tok, _rows(), get_reward(apple_fraction), cfg, tmp_path / "run")
    calls = [0]

    def ctrl_c_at_step_3(*_):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt

    run.opt_rft.optimizer.register_step_pre_hook(ctrl_c_at_step_3)  # after the step guard's own hook
    with pytest.raises(KeyboardInterrupt):
        run.run()
    assert run.guard.updating
    assert latest_checkpoint(tmp_path / "run") is None  # a rewound step would have saved step-2
    assert [r["step"] for r in _metrics(tmp_path / "run") if r["split"] == "train"] == [1, 2]


def test_rft_sampler_and_trackers_are_checked_and_logged(tmp_path):
    import yaml

    model, tok = make_tiny()
    for bad, msg in ((dict(sampler="sglang"), "--sampler must be one of hf, vllm"),
                     (dict(report_to="tensorboard,comet"), "unknown tracker 'comet'")):  # fmt: skip
        with pytest.raises(PreflensError, match=msg):
            train_rft(
                model,
                tok,
                _rows(),
                get_reward(apple_fraction),
                RFTConfig(steps=1, **FAST, **bad),
                tmp_path / "x",
            )
    assert not (tmp_path / "x").exists()
    said = []
    cfg = RFTConfig(steps=1, **FAST, report_to="none")
    train_rft(model, tok, _rows(), get_reward(apple_fraction), cfg, tmp_path / "run", log_fn=said.append)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["sampler"] == "hf" and saved["report_to"] == "none"
    assert any(s.startswith("sampler: hf (transformers generate") for s in said)
    assert not (tmp_path / "run" / "tb").exists()
