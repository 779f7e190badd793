"""Rewards: built-ins against hand-computed values, spec parsing, and validation errors naming the prompt."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from preflens.errors import PreflensError
from preflens.rewards import (
    ExactMatch,
    Reward,
    RewardError,
    get_reward,
    lcs_length,
    normalize_answer,
    rouge_l,
    score,
)


def test_exact_and_normalized_match():
    r = get_reward("exact")
    assert r(["p"] * 3, [" Paris ", "paris", "Paris."], references=["Paris"] * 3) == [1.0, 0.0, 0.0]
    n = get_reward("normalized")
    assert n(["p"] * 3, [" Paris ", "the paris", "Paris!"], references=["Paris"] * 3) == [1.0, 1.0, 1.0]
    pm = get_reward("exact:1,-1")  # the apple/ml-rlgrad +1/-1 reward
    assert pm(["p", "p"], ["a", "b"], references=["a", "a"]) == [1.0, -1.0]
    assert pm.value_range == (-1.0, 1.0)
    assert normalize_answer("  The  Quick, brown fox!") == "quick brown fox"


def test_exact_needs_reference():
    with pytest.raises(RewardError, match="reference"):
        get_reward("exact")(["p"], ["a"])
    with pytest.raises(RewardError, match="no reference"):
        get_reward("exact")(["p"], ["a"], references=[None])


def test_regex_keyword_length():
    assert get_reward(r"regex:\d+")(["p"] * 2, ["abc 42", "none"]) == [1.0, 0.0]
    kw = get_reward("keyword:yes,sure")
    # whole words, case-insensitive; "yesterday" does not count as "yes"
    assert kw(["p"] * 3, ["Yes, sure.", "yesterday sure", "no"]) == [1.0, 0.5, 0.0]
    ln = get_reward("length:4")
    assert ln(["p"] * 3, ["a b c d", "a b", "a b c d e f g h"]) == [0.0, -0.5, -1.0]


def _lcs_brute(a: list[str], b: list[str]) -> int:
    """Longest common subsequence by enumerating every subsequence of a (tiny inputs only)."""
    best = 0
    for r in range(len(a) + 1):
        for sub in itertools.combinations(a, r):
            it = iter(b)
            if all(any(x == y for y in it) for x in sub):
                best = max(best, r)
    return best


def test_lcs_matches_brute_force():
    rng = random.Random(0)
    for _ in range(40):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 7))]
        assert lcs_length(a, b) == _lcs_brute(a, b)


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" (5): R = P = 5/6
    assert rouge_l("the cat sat on the mat", "The cat is on the mat") == pytest.approx(5 / 6)
    # LCS("a b c d", "a c e") = 2: R = 2/3, P = 2/4, F1 = 2RP/(R+P) = 4/7
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert rouge_l("", "a") == 0.0
    assert get_reward("rougeL")(["p"], ["a b c d"], references=["a c e"]) == [pytest.approx(4 / 7)]


def test_module_function_spec(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def plain(prompts, completions):\n"
        "    return [float(len(c)) for c in completions]\n"
        "def with_refs(prompts, completions, references=None):\n"
        "    return [float(c == r) for c, r in zip(completions, references)]\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_reward("my_rewards:plain")(["p", "q"], ["ab", "c"]) == [2.0, 1.0]
    assert get_reward("my_rewards:with_refs")(["p", "q"], ["ab", "c"], references=["ab", "x"]) == [1.0, 0.0]
    with pytest.raises(PreflensError, match="not callable"):
        get_reward("my_rewards:NOT_CALLABLE")
    with pytest.raises(PreflensError, match="no attribute"):
        get_reward("my_rewards:missing")
    with pytest.raises(PreflensError, match="cannot import"):
        get_reward("no_such_module_xyz:f")
    with pytest.raises(PreflensError, match="not a built-in"):
        get_reward("nonsense")
    with pytest.raises(PreflensError, match="regular expression"):
        get_reward("regex:(")
    with pytest.raises(PreflensError, match="length:N"):
        get_reward("length:abc")
    with pytest.raises(PreflensError, match="no such local directory"):
        get_reward("model:/definitely/not/here")


def test_model_reward_matches_direct_forward(tmp_path):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "good": 2, "bad": 3, "movie": 4}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=5,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=0,
    )
    rm = LlamaForSequenceClassification(cfg).eval()
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    reward = get_reward(f"model:{tmp_path / 'rm'}")
    got = reward(["movie ", "movie "], ["good", "bad bad"])
    with torch.no_grad():
        want = [float(rm(input_ids=torch.tensor([ids])).logits[0, 0]) for ids in ([4, 2], [4, 3, 3])]
    assert got == pytest.approx(want, abs=1e-5)


class _Flaky(Reward):
    """Raises / returns NaN / returns the wrong count on the prompt containing 'bad'."""

    name = "flaky"

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, prompts, completions, *, references=None):
        if self.mode == "raise" and any("bad" in p for p in prompts):
            raise ValueError("cannot score this")
        if self.mode == "count" and any("bad" in p for p in prompts):
            return [0.0] * (len(completions) + 1)
        if self.mode == "nan":
            return [math.nan if "bad" in p else 1.0 for p in prompts]
        if self.mode == "type":
            return ["x" if "bad" in p else 1.0 for p in prompts]
        return [1.0] * len(completions)


@pytest.mark.parametrize(
    "mode,pattern",
    [
        ("raise", r"failed on prompt p2 \('a bad prompt'\): ValueError: cannot score this"),
        ("count", r"failed on prompt p2 .*returned 3 values for 2 completions"),
        ("nan", r"returned nan for completion 0 of prompt p2 .*must be finite"),
        ("type", r"returned 'x' \(not a number\) for completion 0 of prompt p2"),
    ],
)
def test_score_names_the_failing_prompt(mode, pattern):
    prompts = ["fine", "fine", "ok", "ok", "a bad prompt", "a bad prompt"]
    group = [0, 0, 1, 1, 2, 2]
    with pytest.raises(RewardError, match=pattern):
        score(_Flaky(mode), prompts, ["c"] * 6, group=group, prompt_ids=["p0", "p1", "p2"])


def test_score_passes_through_valid_rewards():
    assert score(ExactMatch(), ["p", "p"], ["a", "b"], ["a", "a"], group=[0, 0], prompt_ids=[7]) == [1.0, 0.0]
    assert score(_Flaky("none"), [], [], group=[]) == []
