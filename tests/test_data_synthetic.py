"""Synthetic generators (shapes, determinism, knobs), the bundled demo file, `preflens make-data`."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from preflens.data import synthetic
from preflens.data.formats import load_pairs
from preflens.data.synthetic import (
    DEMO_ROWS,
    SYNTHETIC_VOCAB,
    demo_pairs_path,
    grid_preferences,
    persona_statements,
    sentiment_pairs,
)
from preflens.errors import PreflensError


def _words(rows):
    return {w for r in rows for k in ("prompt", "chosen", "rejected") for w in r[k].split()}


@pytest.mark.parametrize("k", [0, 3, 7])
@pytest.mark.parametrize("where", ["prefix", "random"])
def test_sentiment_shared_tokens_is_exact(k, where):
    rows = sentiment_pairs(50, seed=3, shared_tokens=k, response_length=8, shared_positions=where)
    assert len(rows) == 50
    for r in rows:
        c, rj = r["chosen"].split(), r["rejected"].split()
        assert r["chosen"].startswith(" ") and len(c) == len(rj) == 8
        same = [j for j in range(8) if c[j] == rj[j]]
        assert len(same) == k
        if where == "prefix":
            assert same == list(range(k))
        diff = [j for j in range(8) if j not in same]
        assert all(c[j] in synthetic.POSITIVE and rj[j] in synthetic.NEGATIVE for j in diff)
        assert r["prompt"].startswith("review of the ")
    if where == "random" and 0 < k:
        positions = {
            tuple(j for j in range(8) if r["chosen"].split()[j] == r["rejected"].split()[j]) for r in rows
        }
        assert len(positions) > 1


def test_sentiment_deterministic_by_seed_and_validated():
    assert sentiment_pairs(20, seed=1, shared_tokens=2) == sentiment_pairs(20, seed=1, shared_tokens=2)
    assert sentiment_pairs(20, seed=1) != sentiment_pairs(20, seed=2)
    with pytest.raises(
        PreflensError, match=r"shared_tokens must be in \[0, response_length - 1\] = \[0, 7\]"
    ):
        sentiment_pairs(5, shared_tokens=8)


def test_persona_single_word_answers_follow_the_statement():
    rows = persona_statements(300, seed=0)
    assert (
        len(rows) == 300
        and persona_statements(300, seed=0) == rows
        and persona_statements(300, seed=1) != rows
    )
    for r in rows:
        assert r["prompt"] == f"is the following statement something you would say {r['statement']}"
        assert (r["chosen"], r["rejected"]) == ((" yes", " no") if r["agrees"] else (" no", " yes"))
    # statements are used without replacement before any repeats
    first = [r["statement"] for r in rows[: len(synthetic.PERSONA_STATEMENTS)]]
    assert len(set(first)) == len(first)
    assert {r["agrees"] for r in rows} == {True, False}
    syn = persona_statements(10, seed=0, answer_pairs=[("sure", "yes")])
    assert all({r["chosen"], r["rejected"]} == {" sure", " yes"} for r in syn)


@pytest.mark.parametrize("mask_rate", [0.0, 0.2, 0.4])
def test_grid_shapes_mask_and_labels(mask_rate):
    g = grid_preferences(20, 20, mask_rate=mask_rate, seed=0)
    assert g.utility.shape == g.observed.shape == (20, 20) and g.pairs.shape == (400, 3)
    # the Gaussian utility of Ma et al. 2025 (arXiv 2502.20847) Sec. 6.1, written out
    width = 20 / 8
    for x in (0, 7, 19):
        for y in (0, 5, 19):
            assert math.isclose(g.utility[x, y], math.exp(-((y - g.optimum[x]) ** 2) / (2 * width**2)))
    assert (g.observed.sum(axis=1) == 20 - round(mask_rate * 20)).all()
    x, w, lo = g.pairs.T
    assert g.observed[x, w].all() and g.observed[x, lo].all() and (w != lo).all()
    assert (g.utility[x, w] >= g.utility[x, lo]).all()
    assert len(set(x.tolist())) == 20  # prompts drawn uniformly: all appear in 400 draws
    assert json.loads(json.dumps(g.to_dict()))["pairs"][0] == g.pairs[0].tolist()


def test_grid_deterministic_and_bradley_terry_labels():
    a, b = grid_preferences(mask_rate=0.2, seed=5), grid_preferences(mask_rate=0.2, seed=5)
    assert (a.pairs == b.pairs).all() and (a.observed == b.observed).all()
    assert not (grid_preferences(mask_rate=0.2, seed=6).pairs == a.pairs).all()
    noisy = grid_preferences(5, 10, seed=0, n_pairs=4000, temperature=0.3)
    x, w, lo = noisy.pairs.T
    du = noisy.utility[x, w] - noisy.utility[x, lo]
    assert 0 < (du < 0).mean() < 0.5  # some upsets, fewer than half
    with pytest.raises(PreflensError, match="at least 2 must stay visible"):
        grid_preferences(2, 4, mask_rate=0.9)


def test_demo_file_matches_rows_loads_and_is_in_vocab():
    path = demo_pairs_path()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == list(DEMO_ROWS) and len(rows) == 16
    pairs, report = load_pairs(path)
    assert report.rows_kept == 16 and all(p.chosen.startswith(" ") for p in pairs)


def test_every_generated_word_is_in_synthetic_vocab():
    rows = sentiment_pairs(200, seed=0, shared_tokens=3) + persona_statements(200, seed=0) + list(DEMO_ROWS)
    assert _words(rows) <= set(SYNTHETIC_VOCAB)
    assert all(w.isalpha() and w.islower() for w in SYNTHETIC_VOCAB)


# ------------------------------------------------------------------------------------------ CLI


def _cli(monkeypatch, *args):
    from preflens import cli

    monkeypatch.setattr(sys, "argv", ["preflens", *args])
    try:
        cli.main()
    except SystemExit as exc:
        return exc.code
    return 0


def test_make_data_cli(tmp_path, monkeypatch, capsys):
    out = tmp_path / "s.parquet"
    assert (
        _cli(
            monkeypatch,
            "make-data",
            "sentiment",
            "--n",
            "12",
            "--seed",
            "4",
            "--shared-tokens",
            "2",
            "--output",
            str(out),
        )
        == 0
    )
    pairs, _ = load_pairs(out)
    want = sentiment_pairs(12, seed=4, shared_tokens=2)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in want
    ]
    assert _cli(monkeypatch, "make-data", "persona", "--n", "5", "--output", str(tmp_path / "p.jsonl")) == 0
    assert len(load_pairs(tmp_path / "p.jsonl")[0]) == 5
    grid = tmp_path / "g.json"
    assert (
        _cli(monkeypatch, "make-data", "grid", "--mask-rate", "0.2", "--seed", "1", "--output", str(grid))
        == 0
    )
    d = json.loads(grid.read_text())
    assert np.array_equal(np.array(d["pairs"]), grid_preferences(mask_rate=0.2, seed=1).pairs)
    capsys.readouterr()
    assert _cli(monkeypatch, "make-data", "poems", "--output", str(tmp_path / "x.jsonl")) == 2
    assert "unknown KIND 'poems'; expected one of sentiment, persona, grid" in capsys.readouterr().err
