"""Fuzzing the data readers (`preflens.data.formats.load_pairs`) over every format they read: jsonl, json,
parquet, csv and a `save_to_disk` directory.

Each case damages a valid file (random truncation, binary bytes, a byte-order mark, a row in another
encoding, a duplicate key) or writes a bad value (wrong types, huge rows, chat messages with bad roles).
What must hold, whatever the damage (README, "What preflens guarantees"):
- no traceback: the only exception is a `PreflensError` whose message names the file, and, for a bad row,
  the row (and line, for JSON lines) and the field;
- never a silently different pair: every pair that is returned equals the pair the undamaged file gives
  for that row, and with `on_invalid="drop"` the counts add up (read == kept + dropped).
Seeded: the same cases every run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from preflens.data.formats import PreferencePair, load_pairs
from preflens.errors import PreflensError

FORMATS = ("jsonl", "json", "parquet", "csv", "disk")
WORDS = ["good", "bad", "héllo", "naïve", "日本", "ok", "tab\there", 'quote"d', "comma,", "new\nline", "✓"]


def _text(rng: random.Random, n: int = 5) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _rows(rng: random.Random, conversational: bool, n: int = 6) -> list[dict]:
    rows = []
    for i in range(n):
        p, c, r = _text(rng), _text(rng), _text(rng) + f" {i}"
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": p}],
                    "chosen": [{"role": "assistant", "content": c}],
                    "rejected": [{"role": "assistant", "content": r}],
                }
            )
        else:
            rows.append({"prompt": p, "chosen": c, "rejected": r})
    return rows


def _write(fmt: str, rows: list[dict], where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    if fmt == "disk":
        import datasets

        path = where / "ds"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
        return path
    path = where / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:  # csv: chat messages as JSON text, as `write_pairs` writes them
        import pandas as pd

        cells = [{k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in r.items()} for r in rows]
        pd.DataFrame(cells).to_csv(path, index=False)
    return path


def _key(p: PreferencePair) -> tuple:
    return (p.pair_id, json.dumps([p.prompt, p.chosen, p.rejected], ensure_ascii=False))


def _check(path: Path, baseline: dict[int, tuple], *, must_fail: bool = False) -> str:
    """Load with both policies; returns "ok", "dropped" or "error"."""
    outcome = "ok"
    for policy in ("error", "drop"):
        try:
            pairs, report = load_pairs(path, on_invalid=policy)
        except PreflensError as exc:
            msg = str(exc)
            lines = msg.splitlines()
            assert str(path) in lines[0], msg
            for line in lines[1:]:
                if line.startswith("  "):  # one listed invalid row: file, row and field
                    assert str(path) in line and "row " in line and ("field" in line or "row is" in line), msg
            outcome = "error" if policy == "error" else outcome
            continue
        except Exception as exc:  # noqa: BLE001 - the point: nothing but a PreflensError may escape
            pytest.fail(f"{path}: {type(exc).__name__} escaped the reader: {exc}")
        for p in pairs:
            assert _key(p) == baseline.get(p.pair_id), f"{path}: row {p.pair_id} silently differs"
        assert report.rows_read == report.rows_kept + report.n_dropped
        if policy == "drop" and report.n_dropped:
            outcome = "dropped" if outcome == "ok" else outcome
    if must_fail:
        assert outcome != "ok", f"{path}: the damage went unnoticed"
    return outcome


def _baseline(path: Path) -> dict[int, tuple]:
    pairs, _ = load_pairs(path)
    return {p.pair_id: _key(p) for p in pairs}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("conversational", [False, True])
def test_damaged_files(fmt: str, conversational: bool, tmp_path: Path) -> None:
    rng = random.Random(f"{fmt}-{conversational}")
    rows = _rows(rng, conversational)
    clean = _write(fmt, rows, tmp_path / "clean")
    base = _baseline(clean)
    assert len(base) == len(rows)
    files = sorted(clean.rglob("*.arrow")) if fmt == "disk" else [clean]
    data = files[0].read_bytes()
    for case in range(12):
        where = tmp_path / f"case{case}"
        damaged = _write(fmt, rows, where)
        target = sorted(damaged.rglob("*.arrow"))[0] if fmt == "disk" else damaged
        kind = case % 3
        if kind == 0:  # truncation at a random byte
            cut = rng.randrange(1, len(data) - 1)
            target.write_bytes(data[:cut])
            _check(damaged, base)
        elif kind == 1:  # random binary bytes inserted
            at = rng.randrange(0, len(data))
            # bytes that are never UTF-8 (valid UTF-8 inserted into a string is just other text)
            junk = bytes(rng.choice([0xFF, 0xFE, 0xC0, 0xC1, 0xF5, 0xF8]) for _ in range(rng.randrange(1, 8)))
            target.write_bytes(data[:at] + junk + data[at:])
            _check(damaged, base)
        elif fmt in ("jsonl", "json", "csv"):  # a UTF-8 byte-order mark: read as if it were not there
            target.write_bytes(b"\xef\xbb\xbf" + data)
            assert _check(damaged, base) == "ok"
            assert _baseline(damaged) == base


@pytest.mark.parametrize("fmt", ("jsonl", "json", "csv"))
def test_a_row_in_another_encoding_names_its_line(fmt: str, tmp_path: Path) -> None:
    rows = _rows(random.Random(1), False)
    rows[3]["chosen"] = "café naïve"
    path = _write(fmt, rows, tmp_path)
    path.write_bytes(path.read_bytes().replace("café naïve".encode(), "café naïve".encode("latin-1")))
    with pytest.raises(PreflensError, match=r"line \d+ is not UTF-8 text"):
        load_pairs(path)


@pytest.mark.parametrize("fmt", ("jsonl", "json"))
def test_duplicate_keys_are_invalid_rows(fmt: str, tmp_path: Path) -> None:
    rows = _rows(random.Random(2), False)
    path = _write(fmt, rows, tmp_path)
    text = path.read_text(encoding="utf-8")
    first = json.dumps(rows[2]["chosen"], ensure_ascii=False)
    text = text.replace(f'"chosen": {first}', f'"chosen": "a decoy", "chosen": {first}', 1)
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PreflensError, match=r"row 2.*field 'chosen' appears twice"):
        load_pairs(path)
    pairs, report = load_pairs(path, on_invalid="drop")
    assert report.dropped == {"duplicate_key": 1} and 2 not in {p.pair_id for p in pairs}


def test_duplicate_columns_are_refused(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected,chosen\np,a,b,c\n", encoding="utf-8")
    with pytest.raises(PreflensError, match="column 'chosen' appears twice"):
        load_pairs(path)
    table = pa.table([["p"], ["a"], ["b"], ["c"]], names=["prompt", "chosen", "rejected", "chosen"])
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(PreflensError, match="appears twice|Multiple matches for FieldRef.Name.chosen"):
        load_pairs(tmp_path / "d.parquet")


BAD_VALUES = [3, 2.5, True, {"text": "x"}, ["a", "b"], [], "", "   ", None]
BAD_MESSAGES = [
    [{"role": "robot", "content": "x"}],
    [{"role": 3, "content": "x"}],
    [{"role": "assistant"}],
    [{"role": "assistant", "content": None}],
    [{"content": "x"}],
    ["just text"],
    [{"role": "human", "content": "x"}],
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrong_types_and_bad_roles(fmt: str, tmp_path: Path) -> None:
    rng = random.Random(f"types-{fmt}")
    arrow = fmt in ("parquet", "disk")  # one type per column: only nulls can differ from row to row
    for case in range(10):
        conversational = case % 2 == 1
        rows = _rows(rng, conversational)
        base = _baseline(_write("jsonl", rows, tmp_path / f"b{case}"))
        i, name = rng.randrange(len(rows)), rng.choice(["prompt", "chosen", "rejected"])
        if arrow:
            rows[i][name] = None
        elif conversational and fmt != "csv":
            rows[i][name] = rng.choice(BAD_MESSAGES)
        elif fmt == "csv":  # every cell is text: only empty responses are wrong
            name = rng.choice(["chosen", "rejected"])
            rows[i][name] = rng.choice(["", "   "])
        else:  # an empty or blank prompt is allowed; other values are not
            bad = [v for v in BAD_VALUES if name != "prompt" or not isinstance(v, str)]
            rows[i][name] = rng.choice(bad)
        path = _write(fmt, rows, tmp_path / f"c{case}")
        outcome = _check(path, base, must_fail=True)
        assert outcome == "error"
        pairs, report = load_pairs(path, on_invalid="drop")
        assert {p.pair_id for p in pairs} == set(range(len(rows))) - {i}
        assert report.n_dropped == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_huge_rows_are_read_exactly(fmt: str, tmp_path: Path) -> None:
    rows = _rows(random.Random(3), False, n=3)
    rows[1]["chosen"] = "long " * 200_000  # a 1 MB response
    path = _write(fmt, rows, tmp_path)
    pairs, _ = load_pairs(path)
    assert pairs[1].chosen == rows[1]["chosen"] and len(pairs) == 3
