"""Read, validate and write preference data in the formats TRL users already have.

Accepted row layouts (TRL's preference formats, see `trl.data_utils`):

* explicit prompt, standard:        ``{"prompt": str, "chosen": str, "rejected": str}``
* explicit prompt, conversational:  ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``
  (a string prompt with conversational responses is read as one user message);
* implicit prompt:                  ``{"chosen": ..., "rejected": ...}`` where both hold the whole exchange;
  the shared leading messages (or, for strings, the shared leading words) are the prompt. A `prompt`
  column next to full conversations is kept as an extra column and the prompt is extracted, as TRL does.

Every problem is reported with the file, the row (0-based, plus the line for JSON lines), the field and
what was expected. By default invalid rows are an error (up to 5 are listed, so a user fixes them in one
go); with ``on_invalid="drop"`` they are dropped and counted per reason in the `DataReport`, never
silently. The pairs remember the columns they were read from, so `write_pairs` can write a filtered
dataset back in the layout it came in (CHES filtering, `preflens ches --drop-top`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from preflens.errors import DataError, PreflensError

Message = dict[str, Any]
Text = Union[str, list[Message]]

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
MAX_LISTED = 5  # invalid rows shown in an error message / kept as examples in a report

# Reasons a row is dropped; the keys of `DataReport.dropped` (stable: reports and tests read them).
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_RESPONSE = "empty_response"
IDENTICAL_RESPONSES = "identical_responses"
NO_SHARED_PREFIX = "no_shared_prefix"
DUPLICATE_KEY = "duplicate_key"

# Chat roles a message may have (those of TRL's conversational format and the common chat templates); any
# other (ShareGPT's "human"/"gpt", a typo) is an invalid row rather than text a template renders arbitrarily.
ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")


class _Obj(dict):
    """A JSON object as read, remembering keys that appeared twice (json keeps the last one silently)."""

    duplicates: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> _Obj:
    obj = _Obj(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj.duplicates = tuple(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
    return obj


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text (a UTF-8 byte-order mark is dropped, as editors on Windows write one); other bytes are an
    error naming the line and column of the first one."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            f"{path}: line {line} is not UTF-8 text (byte {data[exc.start]:#04x} at column {col}); expected a "
            "UTF-8 file (re-save it as UTF-8)"
        ) from None


@dataclass
class SourceFormat:
    """Where a dataset came from and its column layout, shared by all its pairs (used to write it back)."""

    origin: str
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    columns: list[str] = field(default_factory=list)
    json_lines: bool = False  # a `.json` file read as JSON lines is written back as JSON lines


@dataclass
class PreferencePair:
    """One preference pair, normalized: the prompt is always separate from the responses.

    `pair_id` is the row's position in the source (0-based) and survives dropping and filtering, so
    per-pair tables (log-probs, CHES scores) can be joined back to the input. `prompt`/`chosen`/
    `rejected` are all strings or all message lists (`is_conversational`). `extra` holds the other
    columns of the row so `write_pairs` can reproduce it (it also holds the original prompt cell where that
    differs from `prompt`: a string prompt next to conversational responses, which `prompt` holds as one user
    message); `implicit_prompt` says the source stored the prompt inside `chosen`/`rejected`.
    """

    pair_id: int
    prompt: Text
    chosen: Text
    rejected: Text
    extra: dict[str, Any] = field(default_factory=dict)
    implicit_prompt: bool = False
    source: SourceFormat | None = field(default=None, repr=False, compare=False)

    @property
    def is_conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass
class DataReport:
    """What happened to the rows on their way in: read, kept, dropped (by reason), truncated.

    Written to `RUN/data_report.json`; the counts add up: rows_read == rows_kept + sum(dropped).
    `examples` holds up to 5 messages per reason, naming the row and field.
    """

    stage: str = "load"
    source: str = ""
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def drop(self, reason: str, message: str) -> None:
        """Count one dropped row under `reason`, keeping its message as an example (up to 5 per reason)."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_LISTED:
            shown.append(message)

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        """One line for the console: 'read 1000 rows, kept 990; dropped 10 (identical_responses: 10)'."""
        out = f"{self.stage}: read {self.rows_read} rows, kept {self.rows_kept}"
        if self.dropped:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items()))
            out += f"; dropped {self.n_dropped} ({reasons})"
        if self.truncated:
            out += f"; truncated {self.truncated}"
        return out


def merge_reports(*reports: DataReport) -> dict[str, Any]:
    """One `data_report.json` for a pipeline of stages (load, then tokenize): rows read by the first stage,
    kept by the last, drops summed per reason over the stages, and each stage's own report.

    The stages run in sequence on the survivors of the previous one, so the counts add up:
    rows_read == rows_kept + sum(dropped).
    """
    if not reports:
        raise ValueError("merge_reports needs at least one report")
    dropped: dict[str, int] = {}
    for r in reports:
        for reason, n in r.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
    return {
        "rows_read": reports[0].rows_read,
        "rows_kept": reports[-1].rows_kept,
        "dropped": dropped,
        "truncated": sum(r.truncated for r in reports),
        "stages": [r.to_dict() for r in reports],
    }


class _InvalidRow(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


# ---------------------------------------------------------------------------------------------
# reading raw rows
# ---------------------------------------------------------------------------------------------


def _read_json_file(path: Path, split: str, limit: int | None) -> tuple[list[dict], list[int] | None, bool]:
    """Rows of a .json/.jsonl file, their line numbers (JSON lines only), and whether it was JSON lines.

    Read with the standard library rather than `datasets`: rows may mix strings and message lists (Arrow
    cannot), and a malformed line is reported with its line number instead of an Arrow error.
    """
    text = _decode(path, path.read_bytes())
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped[:1] in ("[", "{"):
        try:
            obj = json.loads(text, object_pairs_hook=_object_pairs)
        except json.JSONDecodeError as exc:
            if stripped[:1] == "[":
                raise DataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
            obj = None  # `{` on the first line: may be JSON lines in a .json file
        if obj is not None:
            if isinstance(obj, dict):
                # {"train": [...]} or {"data": [...]}: the split's rows; any other object is one JSON-lines row
                for key in (split, "data", "rows"):
                    if isinstance(obj.get(key), list):
                        obj = obj[key]
                        break
                else:
                    obj = None
        if isinstance(obj, list):
            return (obj[:limit] if limit is not None else obj), None, False
    rows, lines = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if limit is not None and len(rows) >= limit:
            break
        try:
            rows.append(json.loads(line, object_pairs_hook=_object_pairs))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: line {lineno} is not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        lines.append(lineno)
    return rows, lines, True


def _parse_csv_cell(value: Any) -> Any:
    """CSV has no lists: conversational cells are JSON text (as `write_pairs` writes them)."""
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(parsed, list) and all(isinstance(m, dict) and "role" in m for m in parsed):
            return parsed
    return value


def _read_file(path: Path, split: str, limit: int | None, text_fields: Sequence[str]):
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_json_file(path, split, limit)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise DataError(f"{path}: cannot read as parquet ({reason})") from None
        _no_duplicate_columns(path, list(table.column_names))
        if limit is not None:
            table = table.slice(0, limit)
        # to_pylist keeps nested message lists as Python lists/dicts (pandas would give numpy arrays)
        return table.to_pylist(), None, False
    if suffix == ".csv":
        import pandas as pd

        data = path.read_bytes()
        text = _decode(path, data)
        if text and not text.endswith(("\n", "\r")):
            # a cut inside the last (unquoted) field would read as a shorter text: a silently different pair
            raise DataError(
                f"{path}: line {text.count(chr(10)) + 1} (the last) does not end with a newline, so the file may "
                "have been cut short; expected every CSV line to end with a newline (add it if the row is complete)"
            )
        header = next(csv.reader(io.StringIO(text)), [])
        _no_duplicate_columns(path, header)
        try:
            # everything as text, and an empty cell stays "" (not NaN) so it is reported as empty
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, nrows=limit)
        except Exception as exc:
            raise DataError(
                f"{path}: cannot read as CSV ({type(exc).__name__}: {str(exc).strip()})"
            ) from None
        rows = df.to_dict(orient="records")
        for row in rows:
            for name in text_fields:
                if name in row:
                    row[name] = _parse_csv_cell(row[name])
        return rows, None, False
    raise DataError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(DATA_SUFFIXES)}")


def _no_duplicate_columns(path: Path, columns: list[str]) -> None:
    seen: set[str] = set()
    dup = [c for c in columns if c in seen or seen.add(c)]  # type: ignore[func-returns-value]
    if dup:
        raise DataError(
            f"{path}: column {dup[0]!r} appears twice in the header; expected each column once (which one "
            "holds the text would be a guess)"
        )


def _hf_rows(ds: Any, split: str, origin: str, limit: int | None) -> list[dict]:
    """Rows of a `datasets` Dataset or DatasetDict (picking `split`)."""
    if isinstance(getattr(ds, "column_names", None), dict):  # a DatasetDict
        splits = list(ds.keys())
        if split not in splits:
            raise DataError(f"{origin}: no split {split!r}; available splits: {splits}")
        ds = ds[split]
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds.to_list()


def _read_directory(path: Path, split: str, limit: int | None) -> list[dict]:
    import datasets

    try:
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            _check_arrow_files(path)
            return _hf_rows(datasets.load_from_disk(str(path)), split, str(path), limit)
        ds = datasets.load_dataset(str(path), split=split)
    except PreflensError:
        raise
    except Exception as exc:
        raise DataError(
            f"{path}: cannot load this directory as a dataset with split {split!r} ({type(exc).__name__}: {exc}). "
            f"Expected a `save_to_disk` directory or data files named by split (e.g. {split}.jsonl)"
        ) from None
    return _hf_rows(ds, split, str(path), limit)


def _check_arrow_files(path: Path) -> None:
    """Validate every Arrow file of a `save_to_disk` directory before `datasets` memory-maps it: a damaged
    file (truncated, overwritten bytes) would otherwise crash the process (a segmentation fault in Arrow),
    not raise."""
    import pyarrow as pa

    for f in sorted(path.rglob("*.arrow")):
        try:
            with pa.memory_map(str(f)) as source:
                pa.ipc.open_stream(source).read_all().validate(full=True)
        except Exception as exc:  # ArrowInvalid, OSError, ...: each names what is wrong
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise DataError(f"{f}: damaged Arrow file of a save_to_disk dataset ({reason})") from None


def _read_hub(name: str, split: str, limit: int | None) -> list[dict]:
    import datasets

    spec = split if limit is None else f"{split}[:{limit}]"
    try:
        ds = datasets.load_dataset(name, split=spec)
    except Exception as exc:
        raise PreflensError(
            f"cannot load dataset {name!r} (split {split!r}) from the Hugging Face hub: {type(exc).__name__}: {exc}. "
            "If you are offline (HF_DATASETS_OFFLINE=1), download it first or pass a local "
            f"file ({', '.join(DATA_SUFFIXES)}) or directory."
        ) from None
    return ds.to_list()


def looks_like_path(source: str) -> bool:
    """Whether `source` names a file/directory (else it is read as a hub dataset id)."""
    return (
        source.startswith((".", "/", "~"))
        or source.lower().endswith(DATA_SUFFIXES)
        or "\\" in source
        or source.count("/") > 1
    )


# ---------------------------------------------------------------------------------------------
# validating one row
# ---------------------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _check_messages(value: list, where: str, name: str) -> list[Message]:
    if not value:
        raise _InvalidRow(
            EMPTY_RESPONSE if name != "prompt" else WRONG_TYPE, f"{where}: field {name!r} is an empty list"
        )
    for j, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise _InvalidRow(
                WRONG_TYPE,
                f"{where}: field {name!r} message {j} is {_kind(msg) if not isinstance(msg, dict) else 'a dict with keys ' + str(sorted(msg))}; "
                "expected a message {'role': str, 'content': str}",
            )
        if isinstance(msg, _Obj) and msg.duplicates:
            raise _InvalidRow(
                DUPLICATE_KEY,
                f"{where}: field {name!r} message {j} has key {msg.duplicates[0]!r} twice; expected each key once",
            )
        if not isinstance(msg["role"], str) or not isinstance(msg["content"], str):
            raise _InvalidRow(
                WRONG_TYPE,
                f"{where}: field {name!r} message {j} has role {_kind(msg['role'])} and content {_kind(msg['content'])}; "
                "expected both to be strings",
            )
        if msg["role"] not in ROLES:
            raise _InvalidRow(
                WRONG_TYPE,
                f"{where}: field {name!r} message {j} has role {msg['role'][:40]!r}; expected one of {', '.join(ROLES)}",
            )
    return value


def _check_text(value: Any, where: str, name: str) -> Text:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _check_messages(value, where, name)
    raise _InvalidRow(
        WRONG_TYPE, f"{where}: field {name!r} is {_kind(value)}; expected a string or a list of chat messages"
    )


def _is_empty(text: Text) -> bool:
    if isinstance(text, str):
        return not text.strip()
    return not text or all(not m["content"].strip() for m in text)


def _shared_word_prefix(a: str, b: str) -> int:
    """Length of the shared prefix of two strings, backed off to a whitespace boundary.

    TRL's `extract_prompt` cuts at the first differing character, which can split a word ("bl|ue" vs
    "bl|ack") and tokenize the prompt differently from how the model saw it; cutting before the word keeps
    the prompt a clean token prefix. The whitespace goes with the responses (" blue"), as TRL does.
    """
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    while n > 0 and not a[n - 1].isspace():
        n -= 1
    while n > 0 and a[n - 1].isspace():
        n -= 1
    return n


def _split_implicit(
    chosen: Text, rejected: Text, where: str, names: tuple[str, str]
) -> tuple[Text, Text, Text]:
    """(prompt, chosen, rejected) from two full exchanges that start with the same prompt."""
    if isinstance(chosen, list):
        n = 0
        for x, y in zip(chosen, rejected):
            if x != y:
                break
            n += 1
        if n == 0:
            raise _InvalidRow(
                NO_SHARED_PREFIX,
                f"{where}: fields {names[0]!r} and {names[1]!r} share no leading message, so there is no implicit prompt; "
                "expected both conversations to start with the same prompt turns (or add a prompt column)",
            )
        return chosen[:n], chosen[n:], rejected[n:]
    n = _shared_word_prefix(chosen, rejected)
    if n == 0:
        raise _InvalidRow(
            NO_SHARED_PREFIX,
            f"{where}: fields {names[0]!r} and {names[1]!r} share no leading words, so there is no implicit prompt; "
            "expected both to start with the same prompt text (or add a prompt column)",
        )
    return chosen[:n], chosen[n:], rejected[n:]


def _normalize_row(
    row: Any, where: str, fields: tuple[str, str, str], explicit: bool
) -> tuple[Text, Text, Text, bool, bool]:
    """Validate one raw row or raise _InvalidRow.

    Returns (prompt, chosen, rejected, implicit_prompt, keep_prompt_column): the last is True when the
    row's own prompt cell differs from the normalized prompt (a string prompt wrapped as a user message,
    or a prompt column beside full conversations) and must be written back as it was.
    """
    pf, cf, rf = fields
    if not isinstance(row, dict):
        raise _InvalidRow(
            WRONG_TYPE, f"{where}: row is {_kind(row)}; expected an object with fields {list(fields)}"
        )
    if isinstance(row, _Obj) and row.duplicates:
        raise _InvalidRow(
            DUPLICATE_KEY,
            f"{where}: field {row.duplicates[0]!r} appears twice in the row; expected each field once (JSON keeps "
            "the last silently)",
        )
    needed = (pf, cf, rf) if explicit else (cf, rf)
    for name in needed:
        if name not in row:
            raise _InvalidRow(
                MISSING_FIELD, f"{where}: missing field {name!r} (row has fields {sorted(map(str, row))})"
            )
        if row[name] is None:  # JSON null, or an empty cell of a parquet/datasets column
            raise _InvalidRow(
                MISSING_FIELD,
                f"{where}: field {name!r} is null (an empty cell); expected a string or a list of chat messages",
            )
    chosen = _check_text(row[cf], where, cf)
    rejected = _check_text(row[rf], where, rf)
    if type(chosen) is not type(rejected):
        raise _InvalidRow(
            WRONG_TYPE,
            f"{where}: field {cf!r} is {_kind(chosen)} but field {rf!r} is {_kind(rejected)}; "
            "expected both strings or both lists of chat messages",
        )
    implicit = not explicit
    keep_prompt_column = False
    prompt: Text = ""
    if explicit:
        prompt = _check_text(row[pf], where, pf)
        if isinstance(chosen, str) and isinstance(prompt, list):
            raise _InvalidRow(
                WRONG_TYPE,
                f"{where}: field {pf!r} is a list of chat messages but the responses are strings; "
                "expected the same format for all three",
            )
        if isinstance(chosen, list):
            if chosen[0]["role"] != "assistant" and rejected[0]["role"] != "assistant":
                # full conversations next to a prompt column: the prompt is inside them (TRL does the same)
                implicit = keep_prompt_column = True
            elif isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
                keep_prompt_column = True
    if implicit:
        prompt, chosen, rejected = _split_implicit(chosen, rejected, where, (cf, rf))
    for name, text in ((cf, chosen), (rf, rejected)):
        if _is_empty(text):
            raise _InvalidRow(
                EMPTY_RESPONSE,
                f"{where}: field {name!r} has an empty response"
                + (" after removing the shared prompt" if implicit else "")
                + "; expected non-empty text (TRL 1.16's DPOTrainer does not check this: it keeps the row and "
                "trains on what is left: for text, the whitespace plus the EOS it appends; for messages, the chat "
                "template's empty assistant turn)",
            )
    if chosen == rejected:
        raise _InvalidRow(
            IDENTICAL_RESPONSES,
            f"{where}: fields {cf!r} and {rf!r} are identical; a preference pair needs two different responses",
        )
    return prompt, chosen, rejected, implicit, keep_prompt_column


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def available_splits(source: str | Path) -> list[str] | None:
    """The splits a directory or hub dataset offers, without reading its rows; None for a single file,
    a single saved `Dataset`, or when it cannot be told (e.g. a hub id while offline).

    Why: a dataset published with train/test splits (TRL's `trl-lib/...` sets, a `DatasetDict` saved
    with `save_to_disk`, a folder of train.jsonl + test.jsonl) brings its own held-out split, which
    the trainer evaluates on instead of holding out a share of train.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".json":
            return None
        try:  # {"train": [...], "test": [...]}, which load_pairs reads split by split
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(obj, dict):
            return None
        return [str(k) for k, v in obj.items() if isinstance(v, list)] or None
    try:
        if path.is_dir():
            dd = path / "dataset_dict.json"
            if dd.is_file():
                return [str(x) for x in json.loads(dd.read_text()).get("splits", [])]
            if (path / "state.json").is_file():
                return None
            from datasets.data_files import get_data_patterns

            return [str(x) for x in get_data_patterns(str(path))]
        if looks_like_path(str(source)):
            return None
        import datasets

        return [str(x) for x in datasets.get_dataset_split_names(str(source))]
    except Exception:
        return None


# The last few files read, keyed by what was asked and the file's identity (device, inode, size, mtime):
# a command validates its data before the heavy imports and the model load (`preflens train`/`probe`/
# `ches` fail on a bad row in about a second), and the library call that follows gets the same pairs
# without reading the file twice. A file changed in between has another key and is read again.
_READ_CACHE: dict[tuple, tuple[list[PreferencePair], DataReport]] = {}
_READ_CACHE_SIZE = 4


def _cache_key(source: Any, options: tuple) -> tuple | None:
    if not isinstance(source, (str, Path)):
        return None
    path = Path(source).expanduser()
    try:
        st = path.stat()
    except OSError:
        return None
    if not path.is_file():
        return None
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, options)


def load_pairs(
    source: str | Path | Iterable[dict],
    *,
    split: str = "train",
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    limit: int | None = None,
    on_invalid: Literal["error", "drop"] = "error",
) -> tuple[list[PreferencePair], DataReport]:
    """Load preference pairs from a file, a directory, a hub dataset id or in-memory rows.

    `source`: a .jsonl/.json/.parquet/.csv file; a directory (`save_to_disk`, or data files named by
    split); a `datasets` hub id (loaded with `datasets.load_dataset`); or rows (a list of dicts, or a
    `datasets.Dataset`). `split` picks the split of a directory or hub dataset. `limit` reads only the
    first rows. The field names map other column names (e.g. HH's "chosen"/"rejected" without a prompt
    column: implicit prompt). `on_invalid="drop"` drops invalid rows and counts them in the report
    instead of raising `DataError`.
    """
    options = (split, prompt_field, chosen_field, rejected_field, limit, on_invalid)
    key = _cache_key(source, options)
    if key is not None and key in _READ_CACHE:
        pairs, report = _READ_CACHE[key]
        return list(pairs), DataReport(**asdict(report))
    pairs, report = _load_pairs(
        source,
        split=split,
        prompt_field=prompt_field,
        chosen_field=chosen_field,
        rejected_field=rejected_field,
        limit=limit,
        on_invalid=on_invalid,
    )
    if key is not None:
        while len(_READ_CACHE) >= _READ_CACHE_SIZE:
            _READ_CACHE.pop(next(iter(_READ_CACHE)))
        _READ_CACHE[key] = (list(pairs), DataReport(**asdict(report)))
    return pairs, report


def _load_pairs(
    source: str | Path | Iterable[dict],
    *,
    split: str = "train",
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    limit: int | None = None,
    on_invalid: Literal["error", "drop"] = "error",
) -> tuple[list[PreferencePair], DataReport]:
    """`load_pairs` without the read cache."""
    if on_invalid not in ("error", "drop"):
        raise PreflensError(f"on_invalid must be 'error' or 'drop', got {on_invalid!r}")
    if limit is not None and limit < 0:
        raise PreflensError(f"limit must be >= 0, got {limit}")
    fields = (prompt_field, chosen_field, rejected_field)
    lines: list[int] | None = None
    json_lines = False
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        origin = str(source)
        if path.is_file():
            rows, lines, json_lines = _read_file(path, split, limit, fields)
        elif path.is_dir():
            rows = _read_directory(path, split, limit)
        elif isinstance(source, Path) or looks_like_path(str(source)):
            raise DataError(f"{source}: no such file or directory")
        else:
            rows = _read_hub(str(source), split, limit)
    else:
        origin = "<rows>"
        if hasattr(source, "column_names"):  # a datasets Dataset or DatasetDict
            rows = _hf_rows(source, split, "<dataset>", limit)
        else:
            rows = list(source)
            if limit is not None:
                rows = rows[:limit]

    columns: list[str] = []
    seen: set[str] = set()
    for row in rows:
        if isinstance(row, dict):
            for key in row:
                if key not in seen:
                    seen.add(key)
                    columns.append(key)
    report = DataReport(stage="load", source=origin, rows_read=len(rows))
    if not rows:
        raise DataError(f"{origin}: no rows (expected preference pairs with fields {list(fields)})")
    for name in (chosen_field, rejected_field):
        if name not in seen:
            raise DataError(
                f"{origin}: no column {name!r}; available columns: {columns}. "
                "Map your columns with prompt_field/chosen_field/rejected_field (--prompt-field, --chosen-field, "
                "--rejected-field)"
            )
    explicit = prompt_field in seen
    if not explicit:
        report.notes.append(
            f"no {prompt_field!r} column: the prompt is the shared beginning of {chosen_field!r} and {rejected_field!r}"
        )
    src = SourceFormat(origin, prompt_field, chosen_field, rejected_field, columns, json_lines)

    pairs: list[PreferencePair] = []
    errors: list[str] = []
    n_invalid = 0
    for i, row in enumerate(rows):
        where = f"{origin}: row {i}" + (f" (line {lines[i]})" if lines is not None else "")
        try:
            prompt, chosen, rejected, implicit, keep_prompt = _normalize_row(row, where, fields, explicit)
        except _InvalidRow as bad:
            n_invalid += 1
            if on_invalid == "drop":
                report.drop(bad.reason, bad.message)
            elif len(errors) < MAX_LISTED:
                errors.append(bad.message)
            continue
        extra = {k: v for k, v in row.items() if k not in fields or (k == prompt_field and keep_prompt)}
        pairs.append(PreferencePair(i, prompt, chosen, rejected, extra, implicit, src))
    if errors:
        more = f" (first {MAX_LISTED} shown)" if n_invalid > MAX_LISTED else ""
        raise DataError(
            f"{n_invalid} invalid row(s) in {origin}{more}:\n  "
            + "\n  ".join(errors)
            + "\nFix them, or pass on_invalid='drop' (--on-invalid drop) to drop and count them."
        )
    report.rows_kept = len(pairs)
    if not pairs:
        raise DataError(f"{origin}: all {len(rows)} rows are invalid: {report.examples}")
    return pairs, report


def _json_default(value: Any) -> Any:
    """numpy scalars/arrays and timestamps that parquet/pandas put into extra columns."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _join(prompt: Text, response: Text) -> Text:
    if isinstance(response, list):
        assert isinstance(prompt, list)
        return prompt + response
    assert isinstance(prompt, str)
    return prompt + response


def pairs_to_rows(pairs: Sequence[PreferencePair]) -> list[dict[str, Any]]:
    """The pairs as rows in their source's layout: same column names and order, prompt implicit or not."""
    rows = []
    for p in pairs:
        src = p.source or SourceFormat("<pairs>")
        pf, cf, rf = src.prompt_field, src.chosen_field, src.rejected_field
        if p.implicit_prompt:
            values = {cf: _join(p.prompt, p.chosen), rf: _join(p.prompt, p.rejected)}
        else:
            values = {pf: p.prompt, cf: p.chosen, rf: p.rejected}
        values.update(p.extra)
        order = [c for c in src.columns if c in values] + [c for c in values if c not in src.columns]
        rows.append({c: values[c] for c in order})
    return rows


def write_pairs(pairs: Sequence[PreferencePair], path: str | Path) -> Path:
    """Write pairs to .jsonl/.json/.parquet/.csv (by suffix), in the columns and layout they were read in.

    Conversational fields become JSON text in CSV (which has no lists); `load_pairs` parses them back.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise PreflensError(
            f"{path}: cannot write {suffix!r} files; expected one of {', '.join(DATA_SUFFIXES)}"
        )
    rows = pairs_to_rows(pairs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    json_lines = suffix == ".jsonl" or (
        suffix == ".json" and bool(pairs) and pairs[0].source is not None and pairs[0].source.json_lines
    )
    if suffix in (".jsonl", ".json") and json_lines:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
    elif suffix == ".json":
        tmp.write_text(
            json.dumps(rows, ensure_ascii=False, indent=1, default=_json_default) + "\n", encoding="utf-8"
        )
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        import pandas as pd

        cells = [
            {
                k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
                for k, v in row.items()
            }
            for row in rows
        ]
        pd.DataFrame(cells).to_csv(tmp, index=False)
    tmp.replace(path)
    return path
