"""Reference log-probs are computed once per distinct pair (`training.reference.score_distinct`):
--eval-data sharing pairs with --data, or repeated rows, cost no second pass, and pairs are matched by
their token ids, never by their (per-split) ids."""

from __future__ import annotations

from preflens.data.collate import TokenizedPair
from preflens.training.reference import score_distinct


def _pair(pid: int, chosen: list[int]) -> TokenizedPair:
    return TokenizedPair(pid, [1, 2], chosen, [9, 9])


def test_shared_pairs_are_scored_once_and_matched_by_tokens() -> None:
    calls: list[list[int]] = []

    def score(items):  # a stand-in for PairScorer.score: a value that depends on the tokens only
        calls.append([it.pair_id for it in items])
        return {it.pair_id: {"chosen": float(sum(it.chosen_ids)), "rejected": -1.0} for it in items}

    train = [_pair(0, [3]), _pair(1, [4]), _pair(2, [3])]  # pair 2 repeats pair 0's tokens
    # eval: pair 0 and 1 as in train (--eval-data == --data), pair 3 new, and an id that train uses
    # with other tokens (an eval file's row 1 is not train's row 1)
    evals = [_pair(0, [3]), _pair(3, [7]), _pair(1, [8])]
    rows, scored = score_distinct(score, train, evals)
    assert calls == [[0, 1], [3, 1]]  # train: 2 distinct of 3; eval: only the 2 pairs train did not have
    assert scored == 4
    assert {pid: r["chosen"] for pid, r in rows["train"].items()} == {0: 3.0, 1: 4.0, 2: 3.0}
    assert {pid: r["chosen"] for pid, r in rows["eval"].items()} == {0: 3.0, 3: 7.0, 1: 8.0}
    # the same as scoring every pair on its own
    for split, items in (("train", train), ("eval", evals)):
        for it in items:
            assert rows[split][it.pair_id] == score([it])[it.pair_id]
