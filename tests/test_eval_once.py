"""Evaluations repeat no pass (issue 18, item 3: a cProfile of `preflens train` on 48 HH pairs with
`--eval-data` = `--data` spent 551 of 791 s in three evaluations, one of them the step-0 pass that repeats
the reference pass, and each scoring the train subset's pairs a second time).

- Step 0 of a fresh run reads the reference pass: the policy is the reference there (the same weights, or
  LoRA adapters whose B = 0 add exactly nothing), unless an evaluation row needs more than a reference row
  (per-token loss inputs, learned-mask logits, WPO's log sum of squares).
- A pair that is in the eval split and in the train subset is scored once per evaluation.

The values are checked against explicit full-forward log-probs of the model at that step, not against the
scorer."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest

from preflens.train import train
from preflens.training.scoring import PairScorer
from test_train import config, explicit_logps, tiny, write_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def _spy(monkeypatch) -> list[tuple[bool, int]]:
    calls: list[tuple[bool, int]] = []
    original = PairScorer.score

    def score(self, items, *, reference):
        calls.append((reference, len(items)))
        return original(self, items, reference=reference)

    monkeypatch.setattr(PairScorer, "score", score)
    return calls


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_step0_reads_the_reference_and_shared_pairs_are_scored_once(tmp_path, monkeypatch, lora_rank):
    model, tok = tiny()
    start = copy.deepcopy(model).eval()
    data = write_pairs(tmp_path / "twelve.jsonl", n=12)
    calls = _spy(monkeypatch)
    cfg = config(
        tmp_path, data=str(data), eval_data=str(data), steps=2, eval_every=1, pairs_train_subset=6, lr=1e-2,
        lora_rank=lora_rank,
    )  # fmt: skip
    run = train(cfg, model=model, tokenizer=tok)

    # one reference pass over the 12 distinct pairs; no policy pass at step 0; at steps 1 and 2 the
    # 12 eval pairs once each, and the 6 train-subset pairs (all of them eval pairs too) not again
    assert [n for ref, n in calls if ref] == [12]
    assert [n for ref, n in calls if not ref] == [12, 12]

    pairs = pd.read_parquet(run / "pairs.parquet")
    rows_in = [json.loads(x) for x in data.read_text().splitlines()]
    first = pairs[pairs["step"] == 0]
    assert len(first[first.split == "eval"]) == 12 and len(first[first.split == "train"]) == 6
    for rec in first.itertuples():  # the step-0 rows are the start model's log-probs, written out
        src = rows_in[rec.pair_id]
        assert rec.chosen == pytest.approx(explicit_logps(start, tok, src["prompt"], src["chosen"]), abs=1e-4)
        assert rec.rejected == pytest.approx(explicit_logps(start, tok, src["prompt"], src["rejected"]), abs=1e-4)  # fmt: skip
        assert (rec.chosen, rec.rejected) == (rec.ref_chosen, rec.ref_rejected)

    model.eval()
    last = pairs[pairs["step"] == 2]
    ev = last[last.split == "eval"].set_index("pair_id")
    moved = 0
    for rec in last[last.split == "train"].itertuples():  # a train-subset row = its eval twin = explicit
        src = rows_in[rec.pair_id]
        want = explicit_logps(model, tok, src["prompt"], src["chosen"])
        assert rec.chosen == ev.loc[rec.pair_id, "chosen"] == pytest.approx(want, abs=1e-4)
        assert rec.rejected == ev.loc[rec.pair_id, "rejected"]
        moved += abs(rec.chosen - rec.ref_chosen) > 1e-3
    assert moved > 0  # the model did move: these are not the step-0 numbers again


def test_a_token_level_loss_still_scores_step_0(tmp_path, monkeypatch):
    """sparse (mask='diff') keeps per-token loss inputs in its evaluation rows, which the reference
    pass does not hold: its step-0 evaluation is a pass of its own."""
    model, tok = tiny()
    calls = _spy(monkeypatch)
    cfg = config(tmp_path, steps=1, eval_every=1, loss="sparse", mask="diff", pairs_train_subset=0)
    train(cfg, model=model, tokenizer=tok)
    assert sum(not ref for ref, _ in calls) == 2  # steps 0 and 1
