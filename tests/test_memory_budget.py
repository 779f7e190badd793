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
    res = CliRunner().invoke(app, [*args, "--max-memory", "4GB", "--token-level", "1"])
    assert res.exit_code == 0, res.output
