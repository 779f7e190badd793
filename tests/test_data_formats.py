"""load_pairs / write_pairs: every accepted format, every validation message, the drop policy, round trips."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from preflens.data.formats import DataReport, load_pairs, write_pairs
from preflens.errors import DataError, PreflensError

ROWS = [
    {"prompt": "how do i make a cup of tea", "chosen": " boil water", "rejected": " no idea", "source": "a"},
    {"prompt": "review of the film it was", "chosen": " great", "rejected": " awful", "source": "b"},
    {"prompt": "is it fine to lie", "chosen": " no", "rejected": " yes", "source": "c"},
]

CONV = [
    {
        "prompt": [{"role": "user", "content": "what color is the sky"}],
        "chosen": [{"role": "assistant", "content": "it is blue"}],
        "rejected": [{"role": "assistant", "content": "it is green"}],
    },
    {
        "prompt": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "where is the sun"},
        ],
        "chosen": [{"role": "assistant", "content": "in the sky"}],
        "rejected": [{"role": "assistant", "content": "in the sea"}],
    },
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _triples(pairs):
    return [(p.prompt, p.chosen, p.rejected) for p in pairs]


# ------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_each_file_format_loads(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        _jsonl(path, ROWS)
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".parquet":
        pd.DataFrame(ROWS).to_parquet(path)
    else:
        pd.DataFrame(ROWS).to_csv(path, index=False)
    pairs, report = load_pairs(path)
    assert _triples(pairs) == [(r["prompt"], r["chosen"], r["rejected"]) for r in ROWS]
    assert [p.pair_id for p in pairs] == [0, 1, 2]
    assert [p.extra for p in pairs] == [{"source": r["source"]} for r in ROWS]
    assert (report.rows_read, report.rows_kept, report.dropped) == (3, 3, {})


def test_json_lines_inside_dot_json_and_split_object(tmp_path):
    lines = _jsonl(tmp_path / "lines.json", ROWS)
    assert len(load_pairs(lines)[0]) == 3
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"train": ROWS[:2], "test": ROWS[2:]}))
    assert len(load_pairs(obj)[0]) == 2
    assert _triples(load_pairs(obj, split="test")[0]) == [("is it fine to lie", " no", " yes")]


def test_in_memory_rows_and_datasets_objects(tmp_path):
    import datasets

    assert _triples(load_pairs(ROWS)[0]) == _triples(load_pairs(iter(ROWS))[0])
    ds = datasets.Dataset.from_list(ROWS)
    assert _triples(load_pairs(ds)[0]) == [(r["prompt"], r["chosen"], r["rejected"]) for r in ROWS]
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    assert len(load_pairs(dd, split="test")[0]) == 1
    with pytest.raises(DataError, match=r"no split 'dev'; available splits: \['train', 'test'\]"):
        load_pairs(dd, split="dev")
    # a directory: save_to_disk, and data files named by split
    dd.save_to_disk(str(tmp_path / "saved"))
    assert len(load_pairs(tmp_path / "saved", split="test")[0]) == 1
    (tmp_path / "files").mkdir()
    _jsonl(tmp_path / "files" / "train.jsonl", ROWS)
    _jsonl(tmp_path / "files" / "test.jsonl", ROWS[:1])
    assert len(load_pairs(tmp_path / "files")[0]) == 3
    assert len(load_pairs(tmp_path / "files", split="test")[0]) == 1


def test_limit_reads_only_first_rows(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ROWS)
    pairs, report = load_pairs(path, limit=2)
    assert [p.pair_id for p in pairs] == [0, 1] and report.rows_read == 2


def test_conversational_explicit_prompt():
    pairs, _ = load_pairs(CONV)
    assert pairs[0].is_conversational
    assert pairs[1].prompt == CONV[1]["prompt"] and pairs[1].chosen == CONV[1]["chosen"]


def test_string_prompt_with_conversational_responses_is_a_user_turn():
    row = {"prompt": "hi", "chosen": CONV[0]["chosen"], "rejected": CONV[0]["rejected"]}
    (pair,), _ = load_pairs([row])
    assert pair.prompt == [{"role": "user", "content": "hi"}]


def test_implicit_prompt_conversations():
    rows = [{"chosen": c["prompt"] + c["chosen"], "rejected": c["prompt"] + c["rejected"]} for c in CONV]
    pairs, report = load_pairs(rows)
    assert _triples(pairs) == [(c["prompt"], c["chosen"], c["rejected"]) for c in CONV]
    assert all(p.implicit_prompt for p in pairs)
    assert any("shared beginning" in n for n in report.notes)


def test_implicit_prompt_strings_cut_at_a_word_boundary():
    # the first differing character is inside "bl|ue" / "bl|ack": the prompt must not split the word
    (pair,), _ = load_pairs(
        [{"chosen": "Human: sky color? Assistant: blue", "rejected": "Human: sky color? Assistant: black"}]
    )
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Human: sky color? Assistant:", " blue", " black")


def test_prompt_column_beside_full_conversations_is_kept_as_extra():
    row = {"prompt": "what color is the sky", "chosen": CONV[0]["prompt"] + CONV[0]["chosen"]}
    row["rejected"] = CONV[0]["prompt"] + CONV[0]["rejected"]
    (pair,), _ = load_pairs([row])
    assert pair.prompt == CONV[0]["prompt"] and pair.chosen == CONV[0]["chosen"]
    assert pair.extra == {"prompt": "what color is the sky"}


def test_field_mapping():
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in ROWS]
    pairs, _ = load_pairs(rows, prompt_field="question", chosen_field="good", rejected_field="bad")
    assert pairs[1].chosen == " great"


def test_hub_failure_is_a_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub (offline mode is enabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PreflensError, match=r"cannot load dataset 'someone/prefs'.*offline.*local file"):
        load_pairs("someone/prefs")


def test_missing_local_file_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no such file"):
        load_pairs("data/nope.jsonl")


# ------------------------------------------------------------------------------------------ validation


def test_missing_column_lists_available_columns(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "good": "a", "rejected": "b"}])
    with pytest.raises(DataError) as e:
        load_pairs(path)
    msg = str(e.value)
    assert str(path) in msg and "no column 'chosen'" in msg and "['prompt', 'good', 'rejected']" in msg


BAD = [
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "wrong_type", "field 'chosen' is a number (3); expected a string or a list of chat messages"),
    ({"prompt": "p", "chosen": "a"}, "missing_field", "missing field 'rejected'"),
    ({"prompt": "p", "chosen": "a", "rejected": None}, "missing_field", "field 'rejected' is null (an empty cell); expected"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "empty_response", "field 'chosen' has an empty response"),
    ({"prompt": "p", "chosen": " same", "rejected": " same"}, "identical_responses", "fields 'chosen' and 'rejected' are identical"),
    ({"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}, "wrong_type", "field 'chosen' is a string but field 'rejected' is a list"),
    ({"prompt": "p", "chosen": [{"content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}, "wrong_type", "field 'chosen' message 0 is a dict with keys ['content']; expected a message"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": "a", "rejected": "b"}, "wrong_type", "field 'prompt' is a list of chat messages but the responses are strings"),
]  # fmt: skip


@pytest.mark.parametrize("bad,reason,expected", BAD)
def test_each_invalid_row_is_named_with_row_line_and_field(tmp_path, bad, reason, expected):
    path = _jsonl(tmp_path / "d.jsonl", [ROWS[0], bad])
    with pytest.raises(DataError) as e:
        load_pairs(path)
    msg = str(e.value)
    assert f"{path}: row 1 (line 2)" in msg and expected in msg and "on_invalid='drop'" in msg
    pairs, report = load_pairs(path, on_invalid="drop")
    assert [p.pair_id for p in pairs] == [0]
    assert report.dropped == {reason: 1} and report.rows_read == 2 and report.rows_kept == 1
    assert expected in report.examples[reason][0]


def test_implicit_prompt_without_shared_prefix():
    rows = [{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
             "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]  # fmt: skip
    with pytest.raises(
        DataError, match=r"<rows>: row 0: fields 'chosen' and 'rejected' share no leading message"
    ):
        load_pairs(rows)
    with pytest.raises(DataError, match="share no leading words"):
        load_pairs([{"chosen": "sky is blue", "rejected": "grass is green"}])


def test_error_lists_at_most_five_rows_and_counts_all(tmp_path):
    rows = [ROWS[0]] + [{"prompt": "p", "chosen": " x", "rejected": " x"} for _ in range(7)]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_pairs(path)
    msg = str(e.value)
    assert msg.startswith(f"7 invalid row(s) in {path} (first 5 shown)")
    assert all(f"row {i} (line {i + 1})" in msg for i in range(1, 6))
    assert "row 6 " not in msg and "row 7 " not in msg


def test_drop_counts_per_reason_and_report_json(tmp_path):
    rows = [ROWS[0], {"prompt": "p", "chosen": " x", "rejected": " x"}, {"prompt": "p", "chosen": "", "rejected": "y"},
            ROWS[1], {"prompt": "p", "chosen": " x", "rejected": " x"}, {"prompt": "p", "chosen": None, "rejected": "y"}]  # fmt: skip
    pairs, report = load_pairs(rows, on_invalid="drop")
    assert [p.pair_id for p in pairs] == [0, 3]  # ids are source rows, kept through the drops
    assert report.dropped == {"identical_responses": 2, "empty_response": 1, "missing_field": 1}
    assert report.rows_read == report.rows_kept + report.n_dropped == 6
    back = json.loads(report.to_json())
    assert back["dropped"] == report.dropped and back["rows_kept"] == 2
    assert DataReport(**back) == report
    assert "dropped 4" in report.summary()


def test_all_rows_invalid_is_an_error_even_when_dropping():
    with pytest.raises(DataError, match="all 1 rows are invalid"):
        load_pairs([{"prompt": "p", "chosen": "x", "rejected": "x"}], on_invalid="drop")


def test_bad_json_line_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"line 2 is not valid JSON"):
        load_pairs(path)


# ------------------------------------------------------------------------------------------ write back


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
@pytest.mark.parametrize("data", ["strings", "conversational", "implicit"])
def test_write_pairs_round_trip(tmp_path, suffix, data):
    if data == "strings":
        rows = ROWS
    elif data == "conversational":
        rows = [dict(c, id=i) for i, c in enumerate(CONV)]
    else:
        rows = [
            {"id": i, "chosen": c["prompt"] + c["chosen"], "rejected": c["prompt"] + c["rejected"]}
            for i, c in enumerate(CONV)
        ]
    src = tmp_path / f"in{suffix}"
    pairs, _ = load_pairs(rows)
    write_pairs(pairs, src)  # the rows as a file of this format
    pairs_in, _ = load_pairs(src)
    out = write_pairs(pairs_in[1:], tmp_path / f"out{suffix}")  # a filtered copy, as --drop-top writes
    back, _ = load_pairs(out)
    assert _triples(back) == _triples(pairs[1:])
    assert [p.implicit_prompt for p in back] == [data == "implicit"] * (len(rows) - 1)
    if suffix in (".jsonl", ".json"):
        raw = (
            [json.loads(x) for x in out.read_text().splitlines()]
            if suffix == ".jsonl"
            else json.loads(out.read_text())
        )
        # same columns, same order, same layout (implicit prompt stays inside chosen/rejected)
        assert [list(r) for r in raw] == [list(r) for r in rows[1:]]
        assert raw == [json.loads(json.dumps(r)) for r in rows[1:]]


def test_json_array_stays_array_and_lines_stay_lines(tmp_path):
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps(ROWS))
    write_pairs(load_pairs(arr)[0], tmp_path / "a2.json")
    assert isinstance(json.loads((tmp_path / "a2.json").read_text()), list)
    lines = _jsonl(tmp_path / "l.json", ROWS)
    write_pairs(load_pairs(lines)[0], tmp_path / "l2.json")
    assert len((tmp_path / "l2.json").read_text().splitlines()) == 3


def test_write_pairs_rejects_unknown_suffix(tmp_path):
    with pytest.raises(PreflensError, match=r"cannot write '.txt' files"):
        write_pairs(load_pairs(ROWS)[0], tmp_path / "x.txt")
