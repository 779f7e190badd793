"""Reward-std diagnostic: sampling layout, std and RLOO gradient norms vs an explicit per-sample loop."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from _say_word import make_tiny
from preflens.data.prompts import PromptRow, encode_prompt, load_prompts
from preflens.diagnostics.reward_std import (
    exact_reward_std,
    policy_gradient_norms,
    reward_std_diagnostic,
    rloo_weights,
    sample_completions,
    summarize,
)
from preflens.errors import DataError
from preflens.rewards import RewardError, get_reward

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return make_tiny()


def _explicit_logp(model, seq: list[int], n_prompt: int) -> torch.Tensor:
    """log pi(y|x) of one unpadded sequence from a plain full forward (independent of preflens.logprobs)."""
    ids = torch.tensor([seq])
    logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return sum(lp[t - 1, seq[t]] for t in range(n_prompt, len(seq)))


def test_sampling_layout(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    prompts = [encode_prompt(tok, "say apple"), encode_prompt(tok, "x")]
    s = sample_completions(model, tok, prompts, 3, max_new_tokens=4)
    assert s.input_ids.shape[0] == 6 and s.num_prompts == 2
    for i in range(6):
        p = prompts[i // 3]
        n = int(s.attention_mask[i].sum())
        resp = s.input_ids[i, len(p) : n].tolist()
        assert s.input_ids[i, : len(p)].tolist() == p
        assert s.response_mask[i].nonzero().flatten().tolist() == list(range(len(p), n))
        assert resp == s.completion_ids[i]
        assert 1 <= len(resp) <= 4
        assert 2 not in resp[:-1]  # nothing after the first EOS
        assert s.completions[i] == tok.decode([t for t in resp if t != 2], skip_special_tokens=True)


@pytest.mark.parametrize("method", ["loop", "gram"])
def test_grad_norms_and_std_match_explicit_per_sample_loop(tiny, method):
    model, tok = tiny
    torch.manual_seed(1)
    prompts = [encode_prompt(tok, "say the word apple"), encode_prompt(tok, "please say banana")]
    k = 4
    s = sample_completions(model, tok, prompts, k, max_new_tokens=5)
    rewards = torch.tensor([[1.0, 0.0, 0.5, 2.0], [0.3, -1.0, 0.3, 0.7]])
    norms, logps = policy_gradient_norms(model, s, rloo_weights(rewards), method=method)

    params = [p for p in model.parameters() if p.requires_grad]
    for p in range(2):
        per_sample = []
        for i in range(k):
            row = p * k + i
            seq = s.input_ids[row, : int(s.attention_mask[row].sum())].tolist()
            lp = _explicit_logp(model, seq, len(prompts[p]))
            assert float(lp.detach()) == pytest.approx(float(logps[row]), abs=1e-4)
            per_sample.append(torch.autograd.grad(lp, params))
        r = rewards[p].tolist()
        # RLOO (Kool et al. 2019): g = 1/K sum_i (r_i - mean of the other K-1 rewards) grad log pi(y_i|x)
        g = [torch.zeros_like(q) for q in params]
        for i in range(k):
            b_i = (sum(r) - r[i]) / (k - 1)
            for acc, gi in zip(g, per_sample[i]):
                acc += (r[i] - b_i) / k * gi
        want = math.sqrt(sum(float((x**2).sum()) for x in g))
        assert float(norms[p]) == pytest.approx(want, rel=1e-4)
        assert statistics.stdev(r) == pytest.approx(float(rewards[p].std()), rel=1e-6)


@pytest.mark.parametrize("method", ["loop", "gram"])
def test_equal_rewards_give_zero_gradient(tiny, method):
    model, tok = tiny
    torch.manual_seed(2)
    s = sample_completions(model, tok, [encode_prompt(tok, "say apple")] * 2, 4, max_new_tokens=3)
    rewards = torch.tensor([[0.7] * 4, [1.0, 0.0, 0.0, 0.0]])
    assert torch.equal(rloo_weights(rewards)[0], torch.zeros(4))
    norms, _ = policy_gradient_norms(model, s, rloo_weights(rewards), method=method)
    assert float(norms[0]) == 0.0
    assert float(norms[1]) > 0.0


@pytest.mark.parametrize("method", ["loop", "gram"])
def test_accumulated_gradient_is_the_mean_of_per_prompt_estimates(tiny, method):
    model, tok = tiny
    torch.manual_seed(3)
    s = sample_completions(
        model, tok, [encode_prompt(tok, "x"), encode_prompt(tok, "y")], 3, max_new_tokens=3
    )
    w = rloo_weights(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]]))
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    norms, _ = policy_gradient_norms(model, s, w, accumulate_scale=0.5, method=method)
    got = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    # reference: the loss -1/P sum_p sum_i w_pi log pi(y_pi|x_p), each sequence forwarded on its own
    loss = 0.0
    for row in range(6):
        seq = s.input_ids[row, : int(s.attention_mask[row].sum())].tolist()
        n_prompt = 1  # "x" and "y" are one-token prompts
        loss = loss - 0.5 * w.flatten()[row] * _explicit_logp(model, seq, n_prompt)
    want = torch.autograd.grad(loss, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)
    # and the per-prompt norms returned beside the update are those of each prompt's own estimate
    for p in range(2):
        g_p = torch.autograd.grad(
            sum(
                w[p, i]
                * _explicit_logp(
                    model, s.input_ids[3 * p + i, : int(s.attention_mask[3 * p + i].sum())].tolist(), 1
                )
                for i in range(3)
            ),
            params,
        )
        assert float(norms[p]) == pytest.approx(math.sqrt(sum(float((x**2).sum()) for x in g_p)), rel=1e-4)


def test_exact_std_of_pm1_reward_is_bernoulli_formula():
    # r = +1 w.p. q, -1 otherwise: std = 2 sqrt(q (1 - q))
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.5, 0.3]])
    rewards = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0]])
    want = torch.tensor([2 * math.sqrt(0.9 * 0.1), 2 * math.sqrt(0.5 * 0.5)])
    torch.testing.assert_close(exact_reward_std(probs, rewards), want)


def test_diagnostic_rows_and_summary(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    rows = [PromptRow(i, p) for i, p in enumerate(["say apple", "say banana", "x y", "please"])]
    res = reward_std_diagnostic(
        model, tok, rows, get_reward("keyword:apple"), k=4, batch_size=3, max_new_tokens=3
    )
    assert [r["prompt_id"] for r in res.rows] == [0, 1, 2, 3]
    assert len(res.samples) == 16
    for r in res.rows:
        rs = [s["reward"] for s in res.samples if s["prompt_id"] == r["prompt_id"]]
        assert r["reward_mean"] == pytest.approx(statistics.mean(rs))
        assert r["reward_std"] == pytest.approx(statistics.stdev(rs))
        if r["reward_std"] == 0:
            assert r["grad_norm"] == 0.0
    summ = summarize(
        [
            {"reward_mean": 0.0, "reward_std": 0.0, "grad_norm": 0.0},
            {"reward_mean": 0.9, "reward_std": 0.01, "grad_norm": 0.1},
            {"reward_mean": 0.2, "reward_std": 0.4, "grad_norm": 2.0},
            {"reward_mean": 0.6, "reward_std": 0.5, "grad_norm": 3.0},
        ],
        std_threshold=0.1,
        value_range=(0.0, 1.0),
    )
    assert summ["frac_small_std"] == 0.5
    assert summ["frac_low_reward"] == 0.5
    assert summ["frac_small_std_and_low_reward"] == 0.25
    assert summ["low_reward_threshold"] == 0.5


def test_load_prompts_errors(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "a", "reference": "b"}) + "\n\n" + json.dumps({"prompt": "c"}) + "\n")
    rows = load_prompts(p)
    assert [(r.prompt_id, r.prompt, r.reference) for r in rows] == [(0, "a", "b"), (1, "c", None)]
    with pytest.raises(DataError, match=r"p.jsonl:3: the reward compares against a reference"):
        load_prompts(p, need_reference=True)
    p.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: field `prompt`"):
        load_prompts(p)
    p.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: not valid JSON"):
        load_prompts(p)


def _write_prompts(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p, "reference": "apple"}) + "\n" for p in prompts))


def test_cli_reward_std_writes_parquet_and_summary(tiny, tmp_path, monkeypatch):
    import pandas as pd

    from preflens.commands.reward_std import run_reward_std

    model, tok = tiny
    monkeypatch.setattr("preflens.commands.reward_std._load", lambda name, *a: (model, tok))
    prompts = tmp_path / "prompts.jsonl"
    _write_prompts(prompts, ["say apple", "say banana", "x", "y z"])
    out = tmp_path / "out"
    summary = run_reward_std(
        model=None,
        prompts=prompts,
        reward="keyword:apple",
        k=4,
        output_dir=out,
        max_new_tokens=3,
        batch_size=2,
    )
    df = pd.read_parquet(out / "reward_std.parquet")
    assert list(df["prompt_id"]) == ["0", "1", "2", "3"]
    assert {"reward_mean", "reward_std", "grad_norm", "small_std"} <= set(df.columns)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["num_prompts"] == 4 == summary["num_prompts"]
    assert on_disk["frac_small_std"] == pytest.approx(float((df["reward_std"] < 0.1).mean()))
    assert len(pd.read_parquet(out / "samples.parquet")) == 16


def test_cli_reward_failure_keeps_partial_results(tiny, tmp_path, monkeypatch):
    import pandas as pd

    from preflens.commands.reward_std import run_reward_std

    model, tok = tiny
    monkeypatch.setattr("preflens.commands.reward_std._load", lambda name, *a: (model, tok))
    (tmp_path / "bad_reward_mod.py").write_text(
        "def reward(prompts, completions):\n"
        "    if any(p == 'boom' for p in prompts):\n"
        "        raise RuntimeError('reward server down')\n"
        "    return [1.0] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "prompts.jsonl"
    _write_prompts(prompts, ["say apple", "x", "y", "boom"])
    out = tmp_path / "out"
    with pytest.raises(RewardError, match=r"prompt 3 \('boom'\).*reward server down.*2 of 4 prompts.*saved"):
        run_reward_std(
            model=None,
            prompts=prompts,
            reward="bad_reward_mod:reward",
            k=2,
            output_dir=out,
            max_new_tokens=2,
            batch_size=2,
        )
    df = pd.read_parquet(out / "reward_std.parquet")
    assert list(df["prompt_id"]) == ["0", "1"]
    assert json.loads((out / "summary.json").read_text())["partial"] is True


def test_cli_main_reward_std_prints_and_flags(tiny, tmp_path, monkeypatch, capsys):
    import sys

    import pandas as pd

    from preflens import cli

    model, tok = tiny
    monkeypatch.setattr("preflens.commands.reward_std._load", lambda name, *a: (model, tok))
    prompts = tmp_path / "prompts.jsonl"
    _write_prompts(prompts, ["say apple", "say banana", "x", "y z", "please", "the word"])
    out = tmp_path / "out"
    argv = ["preflens", "reward-std", "--prompts", str(prompts), "--reward", "keyword:apple", "-k", "3"]
    monkeypatch.setattr(sys, "argv", argv + ["-o", str(out), "--max-new-tokens", "2"])
    cli.main()
    df = pd.read_parquet(out / "reward_std.parquet")
    # keyword rewards lie in [0, 1]: "low" means below the midpoint 0.5
    assert (df["flagged"] == ((df["reward_std"] < 0.1) & (df["reward_mean"] < 0.5))).all()
    printed = capsys.readouterr().out
    assert "small std AND low reward" in printed
    if df["flagged"].any():
        assert "prompts flagged" in printed
    with pytest.raises(SystemExit) as exc:  # output exists: refused without --overwrite
        cli.main()
    assert exc.value.code == 2


@pytest.mark.slow
def test_embedded_model_gram_and_loop_norms_agree():
    """On the real SmolLM2 (tied embeddings, RMSNorm, chat template) both gradient paths agree."""
    from preflens.models import load_model

    model, tok = load_model(None)
    torch.manual_seed(0)
    prompts = [encode_prompt(tok, "Name a fruit."), encode_prompt(tok, "Say hello.")]
    s = sample_completions(model, tok, prompts, 3, max_new_tokens=6)
    w = rloo_weights(torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 0.0]]))
    loop, lp_loop = policy_gradient_norms(model, s, w, method="loop")
    gram, lp_gram = policy_gradient_norms(model, s, w, method="gram")
    torch.testing.assert_close(lp_loop, lp_gram, rtol=1e-4, atol=1e-4)
    assert float(loop[0]) > 0 and float(loop[1]) == 0.0 == float(gram[1])
    assert float(gram[0]) == pytest.approx(float(loop[0]), rel=1e-3)


def test_preflens_tiny_model_chat_template_and_tied_embeddings():
    """The ChatML path (prompt through the template, EOS = <|im_end|>) and tied input/output embeddings."""
    from preflens.models import tiny_model

    model, tok = tiny_model(tie_word_embeddings=True, seed=3)
    ids = encode_prompt(tok, "say yes")
    text = tok.decode(ids)
    assert "<|im_start|>" in text and "say yes" in text and text.rstrip().endswith("assistant")
    torch.manual_seed(0)
    s = sample_completions(model, tok, [ids], 4, max_new_tokens=4)
    rewards = torch.tensor([[1.0, 0.0, 2.0, 0.5]])
    w = rloo_weights(rewards)
    loop, _ = policy_gradient_norms(model, s, w, method="loop")
    gram, _ = policy_gradient_norms(model, s, w, method="gram")
    params = [p for p in model.parameters() if p.requires_grad]
    total = 0.0
    for i in range(4):
        seq = s.input_ids[i, : int(s.attention_mask[i].sum())].tolist()
        total = total + w[0, i] * _explicit_logp(model, seq, len(ids))
    want = math.sqrt(sum(float((g**2).sum()) for g in torch.autograd.grad(total, params)))
    assert float(loop[0]) == pytest.approx(want, rel=1e-4)
    assert float(gram[0]) == pytest.approx(want, rel=1e-4)


class _ScriptedSampler:
    """A stand-in for vLLM: returns fixed token rows (one stops at EOS=2 with junk after it, one does not)."""

    name = "scripted"

    def generate(self, prompt_ids, k, *, max_new_tokens, temperature, top_p, eos):
        assert eos == [2] and max_new_tokens == 3
        return [[4, 2, 5] if j % 2 == 0 else [6, 7, 8] for _ in prompt_ids for j in range(k)]


def test_sampler_seam_builds_the_same_layout(tiny):
    """Token rows from another sampler are cut at the first EOS and laid out as the hf path lays them out."""
    model, tok = tiny
    prompts = [encode_prompt(tok, "say apple"), encode_prompt(tok, "x")]
    s = sample_completions(model, tok, prompts, 2, max_new_tokens=3, sampler=_ScriptedSampler())
    assert s.completion_ids == [[4, 2], [6, 7, 8]] * 2
    for i in range(4):
        p, n = prompts[i // 2], int(s.attention_mask[i].sum())
        assert s.input_ids[i, :n].tolist() == p + s.completion_ids[i]
        assert s.response_mask[i].nonzero().flatten().tolist() == list(range(len(p), n))
    assert s.completions[0] == tok.decode([4]) and s.completions[1] == tok.decode([6, 7, 8])


def test_sampler_choice_is_logged_and_checked_before_loading(tiny, tmp_path, monkeypatch):
    import importlib.util

    from preflens.commands.reward_std import run_reward_std
    from preflens.errors import PreflensError

    model, tok = tiny
    loads = []
    monkeypatch.setattr(
        "preflens.commands.reward_std._load", lambda name, *a: loads.append(1) or (model, tok)
    )
    prompts = tmp_path / "prompts.jsonl"
    _write_prompts(prompts, ["say apple", "x"])
    kw = dict(model=None, prompts=prompts, reward="keyword:apple", k=2, max_new_tokens=2, batch_size=2)
    run_reward_std(output_dir=tmp_path / "a", **kw)
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["sampler"] == "hf"
    with pytest.raises(PreflensError, match="--sampler must be one of hf, vllm"):
        run_reward_std(output_dir=tmp_path / "b", sampler="sglang", **kw)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "vllm" else real(n, *a))
    with pytest.raises(PreflensError, match=r"^--sampler vllm: the vllm package is not installed"):
        run_reward_std(output_dir=tmp_path / "c", sampler="vllm", **kw)
    assert len(loads) == 1  # the refusals came before any model load


@pytest.mark.slow
def test_vllm_sampler_where_it_imports(tmp_path):
    """--sampler vllm (only where vLLM imports, on a GPU): the samples come from the torch model's weights,
    so a prompt the model answers deterministically gets the same completion from both samplers."""
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    from preflens.diagnostics.reward_std import make_sampler
    from preflens.models import tiny_model

    model, tok = tiny_model(seed=0)
    model = model.cuda()
    sampler = make_sampler("vllm", model, tok)
    prompts = [encode_prompt(tok, "the cat"), encode_prompt(tok, "a dog")]
    torch.manual_seed(0)
    v = sample_completions(model, tok, prompts, 2, max_new_tokens=4, temperature=1e-4, sampler=sampler)
    h = sample_completions(model, tok, prompts, 2, max_new_tokens=4, temperature=1e-4)
    assert v.completion_ids == h.completion_ids
