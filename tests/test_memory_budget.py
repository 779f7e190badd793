"""Bounded memory of the gradient diagnostics (`preflens.grad.memory`): the estimate's arithmetic against
the shapes written out, chunked passes equal to one pass, and the one-line refusals.

Peak-memory measurements of a CPU process (tracemalloc, RSS) are too noisy to assert on; the measured peak
RSS beside the estimate is in BENCHMARKS.md ("Bounded memory").
"""

from __future__ import annotations

import json

import pytest
import torch

from preflens.grad import sequence_gram, token_gram
from preflens.grad.api import gram_rows_per_run, row_lengths, sequence_gram_and_logps
from preflens.grad.kernels import BLOCK_ELEMS
from preflens.grad.memory import (
    ACT_HIDDEN,
    ACT_INTERMEDIATE,
    WORKSPACE,
    MemoryBudgetError,
    estimate_gram_memory,
    memory_budget,
    resolve_budget,
)
from preflens.logprobs import DEFAULT_CHUNK_ROWS
from preflens.models import tiny_model


def _model(**kw):
    m, tok = tiny_model(hidden_size=32, intermediate_size=48, **kw)
    return m.double().eval(), tok


def _batch(n: int = 6, t: int = 12, vocab: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    att = torch.ones(n, t, dtype=torch.long)
    for i in range(n):  # right padding of different lengths
        att[i, t - (i % 4) :] = 0
    rm = torch.zeros(n, t, dtype=torch.bool)
    rm[:, 4:] = att[:, 4:].bool()
    return ids, att, rm


def test_estimate_is_the_shapes_written_out() -> None:
    model, _ = _model()
    cfg = model.config
    name = "model.layers.0.mlp.down_proj.weight"  # [hidden=32, intermediate=48]: d_in 48, d_out 32
    lengths = [10, 7, 3]
    est = estimate_gram_memory(model, lengths, params=[name], compute_dtype=torch.float64)
    n, longest, rows = 3, 10, 20
    by = {i.what.split(" ")[0]: i for i in est.items}
    act = cfg.num_hidden_layers * n * longest * (ACT_HIDDEN * 32 + ACT_INTERMEDIATE * 48) * 8  # float64 model
    assert by["activations"].bytes == act
    assert by["unembedding"].bytes == 3 * min(rows, DEFAULT_CHUNK_ROWS) * cfg.vocab_size * 4
    assert by["workspace"].bytes == WORKSPACE
    k = by["kernel"]
    # ghost costs R^2 (d_in + d_out) = 400 * 80; materialized R d_in d_out + N^2 d_in d_out = 20*1536 + 9*1536
    assert k.what == "kernel (ghost)" and k.layer == name
    assert k.bytes == (rows * (48 + 32) + 3 * min(rows * rows, BLOCK_ELEMS)) * 8
    assert est.total == act + by["unembedding"].bytes + WORKSPACE + k.bytes

    # long rows, few sequences: materialized is cheaper, N x L x (d_in + d_out) + 3 slices of N d_in d_out
    est = estimate_gram_memory(model, [400, 400], params=[name], compute_dtype=torch.float32)
    k = est.largest_kernel
    assert k is not None and k.what == "kernel (materialized)" and k.shape == (2, 48, 32)
    assert k.bytes == (2 * 400 * (48 + 32) + 3 * 2 * 48 * 32) * 4


def test_estimate_counts_every_trainable_parameter_and_grows_with_rows() -> None:
    model, _ = _model()
    est = estimate_gram_memory(model, [8, 8])
    kernels = [i.layer for i in est.items if i.what.startswith("kernel")]
    assert kernels == [n for n, p in model.named_parameters() if p.requires_grad]
    assert estimate_gram_memory(model, [8] * 4).total > est.total


def test_chunked_gram_equals_one_pass() -> None:
    model, _ = _model()
    ids, att, rm = _batch(n=4)
    g1, lp1 = sequence_gram_and_logps(model, ids, att, rm, compute_dtype=torch.float64, max_memory=1 << 40)
    lengths = row_lengths(att, rm)
    two = estimate_gram_memory(model, sorted(lengths)[-2:], compute_dtype=torch.float64).total
    rows, _ = gram_rows_per_run(model, lengths, max_memory=two, compute_dtype=torch.float64)
    assert rows == 2  # forced into passes over pairs of single rows: 6 passes
    g2, lp2 = sequence_gram_and_logps(model, ids, att, rm, compute_dtype=torch.float64, max_memory=two)
    torch.testing.assert_close(g2, g1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lp2, lp1, rtol=1e-12, atol=1e-12)
    # and against an explicit autograd loop over the sequences
    params = [p for p in model.parameters() if p.requires_grad]
    from preflens.logprobs import sequence_logps

    grads = []
    for s in range(ids.shape[0]):
        lp = sequence_logps(model, ids[s : s + 1], att[s : s + 1], rm[s : s + 1]).logps.sum()
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(lp, params)]))
    ref = torch.stack(grads) @ torch.stack(grads).T
    torch.testing.assert_close(g2, ref, rtol=1e-5, atol=1e-6)  # the log-softmax runs in fp32


def test_token_gram_chunked_equals_one_pass() -> None:
    model, _ = _model()
    ids, att, rm = _batch(n=2, t=8)
    g1, own1 = token_gram(model, ids, rm, max_memory=1 << 40)
    k = g1.shape[0]
    budget = estimate_gram_memory(model, [8] * 4).total  # four truncated rows per pass: blocks of 2
    g2, own2 = token_gram(model, ids, rm, max_memory=budget)
    assert k >= 6 and torch.equal(own1, own2)
    torch.testing.assert_close(g2, g1, rtol=2e-4, atol=1e-6)  # token_gram's kernels run in fp32


def test_refusal_names_layer_shape_and_bytes() -> None:
    model, _ = _model()
    ids, att, rm = _batch()
    lengths = row_lengths(att, rm)
    two = estimate_gram_memory(model, sorted(lengths)[-2:], compute_dtype=torch.float64)
    with pytest.raises(MemoryBudgetError) as err:
        sequence_gram(model, ids, att, rm, compute_dtype=torch.float64, max_memory=two.total - 1)
    msg = str(err.value)
    big = two.largest()
    assert "\n" not in msg
    assert big.layer in msg and str(list(big.shape)) in msg and f"({big.bytes} bytes)" in msg
    assert "--max-memory" in msg


def test_too_many_passes_is_refused_with_the_estimate() -> None:
    model, _ = _model()
    lengths = [12] * 40  # 40 rows cut into single-row blocks: 780 passes
    two = estimate_gram_memory(model, [12, 12]).total
    with pytest.raises(MemoryBudgetError, match=r"40 rows of up to 12 tokens need .* passes"):
        gram_rows_per_run(model, lengths, max_memory=two, what="token-level pair 0")


def test_budget_resolution(monkeypatch) -> None:
    monkeypatch.delenv("PREFLENS_MAX_MEMORY", raising=False)
    assert resolve_budget(12345) == 12345
    with memory_budget(777):
        assert resolve_budget("auto") == 777 and resolve_budget(None) == 777
        assert resolve_budget(5) == 5
    assert resolve_budget(None) > 0  # half the free memory
    monkeypatch.setenv("PREFLENS_MAX_MEMORY", "4096")
    assert resolve_budget(None) == 4096


def test_probe_refuses_up_front(tmp_path) -> None:
    """`preflens probe --max-memory` below one chunk: the one-line error before any pass runs."""
    from typer.testing import CliRunner

    from preflens.cli import app
    from preflens.data.synthetic import sentiment_pairs

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_pairs(4, seed=1, response_length=4)))
    model, tok = tiny_model(hidden_size=32, seed=0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    args = ["probe", "--model", str(tmp_path / "m"), "--data", str(data), "-o", str(tmp_path / "p.parquet")]
    res = CliRunner().invoke(app, [*args, "--max-memory", "1MB"], catch_exceptions=True)
    assert res.exit_code != 0
    assert isinstance(res.exception, MemoryBudgetError)
    assert "probe batch: even 2 row(s) need" in str(res.exception) and "over the memory budget" in str(
        res.exception
    )
    assert not (tmp_path / "p.parquet").exists()
    res = CliRunner().invoke(app, [*args, "--max-memory", "lots"])
    assert res.exit_code != 0
    res = CliRunner().invoke(app, [*args, "--max-memory", "4GB", "--token-level", "1", "--explain-memory"])
    assert res.exit_code == 0, res.output
    # the estimate, printed before the work, and the per-layer breakdown (forms of every layer)
    assert "memory: estimated peak extra" in res.output and "token-level pair 0:" in res.output
    assert "memory breakdown of the largest pass:" in res.output and "Gram forms per layer:" in res.output


# ---------------------------------------------------------------------------------------------
# the other diagnostics (issue 18 item 1): refused up front in one line, chunked == unchunked
# ---------------------------------------------------------------------------------------------

_ONE_LINE = r"largest: .+ of .+ with shape \[[0-9, ]+\] = .+ \(\d+ bytes\)"


def _assert_one_line_refusal(exc: BaseException, start: str) -> None:
    import re

    msg = str(exc)
    assert isinstance(exc, MemoryBudgetError) and "\n" not in msg
    assert msg.startswith(start), msg
    assert "over the memory budget" in msg and re.search(_ONE_LINE, msg), msg


def _train_config(tmp_path, **kw):
    from preflens.data.synthetic import sentiment_pairs
    from preflens.training.config import TrainConfig

    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_pairs(16, seed=0, response_length=4)))
    base = dict(data=str(data), output_dir=str(tmp_path / kw.pop("run", "run")), steps=2, batch_size=4,
                lr=1e-3, eval_every=0, save_every=0, report_to="none", progress=False, eval_fraction=0.2,
                max_length=32)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize(
    "flags,start",
    [
        ({"step_entanglement": True}, "--step-entanglement: a micro-batch of 8 rows"),
        ({"probe_every": 1, "probe_pairs": 3}, "--probe-every probe set: even 2 row(s) need"),
        ({"attribute_every": 1, "attribute_pairs": 3}, "--attribute-every: 6 probe rows against"),
    ],
)
def test_train_diagnostics_refuse_before_step_1(tmp_path, flags, start) -> None:
    from preflens.train import train

    model, tok = tiny_model(hidden_size=32, seed=0)
    with pytest.raises(MemoryBudgetError) as err:
        train(_train_config(tmp_path, max_memory="1MB", **flags), model=model, tokenizer=tok)
    _assert_one_line_refusal(err.value, start)
    metrics = tmp_path / "run" / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    assert not [r for r in rows if r.get("split") == "train"]  # refused in set-up, before step 1


@pytest.mark.slow
def test_train_probe_every_chunked_equals_unchunked(tmp_path, capsys) -> None:
    """--probe-every under a budget that fits two rows of --max-length but not the whole probe set: the
    probes run as several passes, and every probes.parquet number equals the one-pass run's."""
    import pandas as pd

    from preflens.train import train

    def run(name: str, budget: str) -> pd.DataFrame:
        model, tok = tiny_model(hidden_size=32, seed=0)
        cfg = _train_config(tmp_path, run=name, probe_every=1, probe_pairs=3, max_memory=budget)
        return pd.read_parquet(train(cfg, model=model, tokenizer=tok) / "probes.parquet")

    one = run("one", "1TB")
    assert "(probe set: 6 rows, 6 per pass)" in capsys.readouterr().out
    model, _ = tiny_model(hidden_size=32, seed=0)
    two_rows = estimate_gram_memory(model, [32, 32]).total  # rows are shorter than --max-length 32
    chunked = run("chunked", str(two_rows))
    out = capsys.readouterr().out
    assert "(probe set: 6 rows, " in out and "(probe set: 6 rows, 6 per pass)" not in out
    assert len(one) == len(chunked) == 9  # 3 probe pairs at steps 0, 1, 2
    num = [c for c in one.columns if pd.api.types.is_float_dtype(one[c])]
    assert {"cosine", "inner", "pred_delta_chosen"} <= set(num)
    pd.testing.assert_frame_equal(chunked[num], one[num], rtol=1e-4, atol=1e-7)


def _ches_data(tmp_path, n: int = 10):
    from preflens.data.synthetic import sentiment_pairs

    data = tmp_path / "ches.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_pairs(n, seed=4, response_length=5)))
    return data


def test_ches_refuses_up_front_and_chunked_equals_unchunked(tmp_path) -> None:
    import pandas as pd

    from preflens.data.collate import tokenize_pairs
    from preflens.data.formats import load_pairs
    from preflens.diagnostics.ches_scan import ches_pairs_per_batch, run_ches
    from preflens.grad.estimates import estimate_forward_memory

    model, tok = tiny_model(hidden_size=32, seed=0)
    data = _ches_data(tmp_path)
    kw = dict(model="m", data=data, batch_size=8, max_length=32, progress=False, _model_obj=(model, tok))
    with pytest.raises(MemoryBudgetError) as err:
        run_ches(output=tmp_path / "no.parquet", max_memory=1000, **kw)
    _assert_one_line_refusal(
        err.value, "ches: a forward over pairs of 32 tokens (counted in pairs): even 1 row(s)"
    )
    assert not (tmp_path / "no.parquet").exists()  # refused before the first chunk: only the scan's plan
    assert [p.name for p in (tmp_path / "no.parquet.parts").iterdir()] == ["meta.json"]

    run_ches(output=tmp_path / "one.parquet", max_memory=1 << 40, **kw)
    budget = estimate_forward_memory(model, [32] * 4).total  # two pairs of --max-length
    longest = max(it.length for it in tokenize_pairs(load_pairs(data)[0], tok, max_length=32)[0])
    assert ches_pairs_per_batch(model, longest, 8, budget) < 8  # the batches of 8 are cut
    run_ches(output=tmp_path / "chunked.parquet", max_memory=budget, **kw)
    one, chunked = pd.read_parquet(tmp_path / "one.parquet"), pd.read_parquet(tmp_path / "chunked.parquet")
    assert list(one["pair_index"]) == list(chunked["pair_index"]) == list(range(10))
    pd.testing.assert_series_equal(chunked["ches"], one["ches"], rtol=1e-5, atol=1e-6)
    pd.testing.assert_series_equal(chunked["ches_normalized"], one["ches_normalized"], rtol=1e-5, atol=1e-6)


def test_reward_std_refuses_up_front_and_chunked_equals_unchunked() -> None:
    """Per-prompt gradient norms over K completions: passes of one prompt give the batched pass's numbers
    and an explicit autograd loop's; a budget below one prompt's K completions refuses before sampling."""
    from preflens.data.prompts import PromptRow, encode_prompt
    from preflens.diagnostics.reward_std import (
        grad_norm_prompts_per_pass,
        policy_gradient_norms,
        reward_std_diagnostic,
        rloo_weights,
        sample_completions,
    )
    from preflens.rewards import get_reward

    model, tok = tiny_model(hidden_size=32, seed=0)
    torch.manual_seed(0)
    prompts = [encode_prompt(tok, t) for t in ("good movie", "bad film here", "ok")]
    k = 3
    s = sample_completions(model, tok, prompts, k, max_new_tokens=4)
    rewards = torch.tensor([[1.0, 0.0, 0.5], [0.2, -1.0, 0.7], [0.0, 0.0, 1.0]])
    w = rloo_weights(rewards).float()
    one, lp1 = policy_gradient_norms(model, s, w, method="gram")
    longest = int(s.attention_mask.sum(1).max())
    budget = estimate_gram_memory(model, [longest] * k, compute_dtype=torch.float64).total
    per_pass = grad_norm_prompts_per_pass(model, longest, k, 3, budget, "gram")
    assert per_pass == 1
    chunked, lp2 = policy_gradient_norms(model, s, w, method="gram", prompts_per_pass=per_pass)
    loop, _ = policy_gradient_norms(model, s, w, method="loop")  # one autograd.grad per prompt
    torch.testing.assert_close(chunked, one, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(lp2, lp1)
    torch.testing.assert_close(chunked, loop, rtol=1e-4, atol=1e-7)

    rows = [PromptRow(prompt_id=str(i), prompt=t) for i, t in enumerate(("good movie", "bad film"))]
    with pytest.raises(MemoryBudgetError) as err:
        reward_std_diagnostic(
            model, tok, rows, get_reward("length:4"), k=2, max_new_tokens=4, max_memory=1000
        )
    _assert_one_line_refusal(err.value, "reward-std gradient norms: 2 completions of up to")


def test_attribute_refuses_up_front_and_chunked_equals_unchunked(tmp_path) -> None:
    import pandas as pd

    from preflens.data.collate import tokenize_pairs
    from preflens.data.formats import load_pairs
    from preflens.data.synthetic import sentiment_pairs
    from preflens.diagnostics.attribution_scan import run_attribution
    from preflens.grad.estimates import estimate_cross_memory, plan_cross_batch

    model, tok = tiny_model(hidden_size=32, seed=3)
    model = model.double()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_pairs(8, seed=1, response_length=4)))
    kw = dict(model=None, data=data, probe_pairs=2, batch_size=8, progress=False, _model_obj=(model, tok))
    with pytest.raises(MemoryBudgetError) as err:
        run_attribution(output=tmp_path / "no.parquet", max_memory=1000, **kw)
    _assert_one_line_refusal(
        err.value, "attribute: pairs against 2 probe pairs (counted in pairs): even 1 row(s)"
    )

    run_attribution(output=tmp_path / "one.parquet", max_memory=1 << 40, **kw)
    items = tokenize_pairs(load_pairs(data)[0], tok, max_length=512, max_prompt_length=256)[0]
    probe = sorted(items, key=lambda it: it.pair_id)[:2]
    probe_lens = [len(it.prompt_ids) + len(r) for it in probe for r in (it.chosen_ids, it.rejected_ids)]
    longest = max(it.length for it in items)
    budget = estimate_cross_memory(model, [longest] * 4, probe_lens, train_pass=True).total  # 2 pairs
    assert 2 <= plan_cross_batch(model, longest, probe_lens, 8, budget, what="x") < 8  # batches are cut
    run_attribution(output=tmp_path / "chunked.parquet", max_memory=budget, **kw)
    one, chunked = pd.read_parquet(tmp_path / "one.parquet"), pd.read_parquet(tmp_path / "chunked.parquet")
    cols = ["effect_chosen", "effect_rejected", "min_effect_chosen"]
    assert list(one["pair_index"]) == list(chunked["pair_index"])
    pd.testing.assert_frame_equal(chunked[cols], one[cols], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# per layer: ghost / materialized / skip under the budget (issue 14 item 3)
# ---------------------------------------------------------------------------------------------

_Q = "model.layers.0.self_attn.q_proj.weight"  # [hidden 32, hidden 32]


def _full_rows(n: int = 4, t: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (n, t), generator=g)
    att = torch.ones(n, t, dtype=torch.long)
    rm = torch.zeros(n, t, dtype=torch.bool)
    rm[:, 3:] = True
    return ids, att, rm


def _autograd_gram(model, ids, att, rm, names):
    from preflens.logprobs import sequence_logps

    params = [p for n, p in model.named_parameters() if n in names]
    rows = []
    for s in range(ids.shape[0]):
        lp = sequence_logps(model, ids[s : s + 1], att[s : s + 1], rm[s : s + 1]).logps.sum()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(lp, params)]))
    g = torch.stack(rows)
    return g @ g.T


def test_the_form_that_fits_is_picked_per_layer(monkeypatch) -> None:
    """With the block floor at one element, q_proj over 4 rows of 12 tokens is cheaper to compute
    materialized (R d_in d_out + N^2 d_in d_out = 65536 < R^2 (d_in + d_out) = 147456) but smaller ghost
    (written out below): under a budget between the two, the ghost form is forced, the pass is not
    chunked, and the Gram is the autograd one."""
    import preflens.grad.memory as mem

    monkeypatch.setattr(mem, "BLOCK_ELEMS", 1)
    model, _ = _model()
    n, t, r, d = 4, 12, 48, 32
    ghost = (r * (d + d) + 3 * min(r * r, max(1, r))) * 8
    mat = (n * t * (d + d) + 3 * min(n * d * d, max(1, n * d))) * 8
    assert (ghost, mat) == (25728, 27648)
    held = estimate_gram_memory(model, [t] * n, params=[], compute_dtype=torch.float64).held
    budget = held + ghost
    auto = estimate_gram_memory(model, [t] * n, params=[_Q], compute_dtype=torch.float64)
    assert auto.forms == {_Q: "materialize"} and auto.total == held + mat > budget
    rows, est = gram_rows_per_run(model, [t] * n, [_Q], max_memory=budget, compute_dtype=torch.float64)
    assert rows == n and est.forced == {_Q: "ghost"} and est.total == budget
    assert any("forced by the budget: 1" in line for line in est.breakdown())
    ids, att, rm = _full_rows(n, t)
    g = sequence_gram(model, ids, att, rm, [_Q], compute_dtype=torch.float64, max_memory=budget)
    torch.testing.assert_close(g, _autograd_gram(model, ids, att, rm, {_Q}), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_layer_that_fits_in_neither_form_is_refused_or_skipped(monkeypatch) -> None:
    import preflens.grad.memory as mem

    monkeypatch.setattr(mem, "BLOCK_ELEMS", 1)
    model, _ = _model()
    norm = "model.norm.weight"  # a vector: its kernel is 2 N d values
    ids, att, rm = _full_rows()
    two = estimate_gram_memory(model, [12, 12], params=[_Q, norm], compute_dtype=torch.float64)
    q_smallest = min(i.bytes for i in (mem._kernel_forms(_Q, dict(model.named_parameters())[_Q], False,
                                                          24, 2, 12, 8)[1].values()))  # fmt: skip
    budget = two.held + q_smallest - 1  # two rows: q_proj fits in neither form, the norm weight does
    with pytest.raises(MemoryBudgetError) as err:
        sequence_gram(model, ids, att, rm, [_Q, norm], compute_dtype=torch.float64, max_memory=budget)
    assert _Q in str(err.value) and "\n" not in str(err.value)
    with memory_budget(budget, skip_layers=True), pytest.warns(UserWarning, match="inexact Gram.*q_proj"):
        g = sequence_gram(model, ids, att, rm, [_Q, norm], compute_dtype=torch.float64)
    with pytest.raises(MemoryBudgetError):  # outside the block nothing is skipped ...
        gram_rows_per_run(model, [12] * 4, [_Q, norm], max_memory=budget, compute_dtype=torch.float64)
    with memory_budget(budget, skip_layers=True):
        rows, est = gram_rows_per_run(model, [12] * 4, [_Q, norm], compute_dtype=torch.float64)
    assert est.skipped == [_Q] and est.forms[_Q] == "skip"  # ... inside it q_proj is left out
    # the Gram left out exactly q_proj's term: it is the norm weight's alone
    torch.testing.assert_close(g, _autograd_gram(model, ids, att, rm, {norm}), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("command", ["train", "ches", "reward-std", "attribute"])
def test_bad_max_memory_is_one_line_before_the_model_loads(tmp_path, command) -> None:
    from typer.testing import CliRunner

    from preflens.cli import app
    from preflens.data.synthetic import sentiment_pairs

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_pairs(2, seed=1, response_length=4)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    args = {
        "train": ["--data", str(data), "--output-dir", str(tmp_path / "run")],
        "ches": ["--data", str(data), "-o", str(tmp_path / "c.parquet")],
        "reward-std": ["--prompts", str(prompts), "--reward", "length:4", "-o", str(tmp_path / "r")],
        "attribute": ["--data", str(data), "-o", str(tmp_path / "a.parquet")],
    }[command]
    res = CliRunner().invoke(
        app, [command, *args, "--model", str(tmp_path / "absent"), "--max-memory", "lots"]
    )
    assert res.exit_code != 0
    assert "--max-memory: expected a positive size such as 6GB" in str(res.exception) + res.output
    assert not (tmp_path / "run").exists()


def test_capture_cross_and_forward_estimates_are_the_shapes_written_out() -> None:
    """The new estimators against their terms written out for one parameter of the tiny model."""
    from preflens.grad.estimates import (
        INFER_HIDDEN,
        INFER_INTERMEDIATE,
        estimate_capture_memory,
        estimate_cross_memory,
        estimate_forward_memory,
    )

    model, _ = _model()  # float64, hidden 32, intermediate 48, untied head [vocab, 32]
    cfg = model.config
    name = "model.layers.0.mlp.down_proj.weight"  # d_in 48, d_out 32
    n, t = 4, 10
    rows = n * t
    # --step-entanglement: no activations (the step's own); one kernel + the fused gradient. Materialized
    # here: R d_in d_out + N^2 d_in d_out = 86016 < R^2 (d_in + d_out) = 128000 (R = 40 tokens)
    cap = estimate_capture_memory(model, [t] * n, [name], fused=True, compute_dtype=torch.float64)
    mat = (n * t * (48 + 32) + 3 * min(n * 48 * 32, BLOCK_ELEMS)) * 8
    assert [i.what for i in cap.items] == ["workspace", "kernel (materialized)"]
    assert cap.total == WORKSPACE + mat + 48 * 32 * 8
    # a tied parameter's parts are held across the backward
    tied, _ = tiny_model(hidden_size=32, intermediate_size=48, tie_word_embeddings=True)
    emb = "model.embed_tokens.weight"
    held = [i for i in estimate_capture_memory(tied, [t] * n, [emb]).items if i.what == "parts (held, tied)"]
    vocab = tied.config.vocab_size  # the head's rows R x (d + vocab), the embedding's R x d and its ids
    assert len(held) == 1 and held[0].bytes == rows * (32 + vocab) * 4 + rows * (32 * 4 + 8)
    # --attribute-every: the probe parts of every parameter held, the cross kernel one at a time
    probe = [6, 8]
    cross = estimate_cross_memory(model, [t] * n, probe, [name], compute_dtype=torch.float64)
    by = {i.what: i for i in cross.items}
    rp = sum(probe)
    assert by["probe parts (held)"].bytes == rp * (48 + 32) * 8
    assert by["kernel (cross)"].bytes == (rows * (48 + 32) + 3 * min(rows * rp, BLOCK_ELEMS)) * 8
    probe_acts = cfg.num_hidden_layers * 2 * 8 * (ACT_HIDDEN * 32 + ACT_INTERMEDIATE * 48) * 8
    probe_head = 3 * rp * cfg.vocab_size * 4
    assert by["probe pass"].bytes == probe_acts + probe_head
    assert cross.total == WORKSPACE + by["probe parts (held)"].bytes + max(
        by["probe pass"].bytes, by["kernel (cross)"].bytes
    )
    # CHES: one layer's transients and the last hidden state (+ its float32 copy), no autograd
    fwd = estimate_forward_memory(model, [t] * n)
    one_layer = n * t * (INFER_HIDDEN * 32 + INFER_INTERMEDIATE * 48) * 8
    assert fwd.total == WORKSPACE + one_layer + n * t * 32 * (8 + 4)


def test_probe_skip_oversize_layers_says_which_layers_and_inexact(tmp_path, monkeypatch) -> None:
    """`run_probe(skip_oversize_layers=True)` under a budget where some layers fit in neither form (block
    floor at one element): those layers, and only those, are named in the summary as left out."""
    import preflens.grad.memory as mem
    from preflens.data.collate import tokenize_pairs
    from preflens.data.formats import load_pairs
    from preflens.data.synthetic import sentiment_pairs
    from preflens.diagnostics.probe_table import run_probe

    monkeypatch.setattr(mem, "BLOCK_ELEMS", 1)
    model, tok = tiny_model(hidden_size=32, seed=0)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_pairs(3, seed=1, response_length=4)))
    items = tokenize_pairs(load_pairs(data)[0], tok, max_length=64, max_prompt_length=32)[0]
    lens = [max(it.length for it in items)] * 2  # batch size 1: the probe batch is 2 rows
    held = estimate_gram_memory(model, lens, params=[]).held
    smallest = {}
    for form in ("ghost", "materialize"):
        for i in estimate_gram_memory(
            model, lens, forms=dict.fromkeys(dict(model.named_parameters()), form)
        ).items:
            if i.what.startswith("kernel"):
                smallest[i.layer] = min(smallest.get(i.layer, i.bytes), i.bytes)
    cut = sorted(smallest.values())[len(smallest) // 2]  # about half the layers cannot fit
    budget = held + cut
    want = sorted(k for k, v in smallest.items() if v > cut)
    assert want
    kw = dict(data=data, output=tmp_path / "p.parquet", batch_size=1, max_length=64, max_prompt_length=32)
    with pytest.raises(MemoryBudgetError):
        run_probe(max_memory=budget, _model_obj=(model, tok), **kw)
    with pytest.warns(UserWarning, match="inexact Gram"):
        out = run_probe(max_memory=budget, skip_oversize_layers=True, _model_obj=(model, tok), **kw)
    assert out["gram_inexact_skipped_layers"] == want
    assert out["memory"]["line"].endswith(f"INEXACT Gram: {len(want)} layer(s) left out: {', '.join(want)}")
