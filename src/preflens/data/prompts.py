"""Prompt-only data: the prompts `preflens rft` trains on and `preflens reward-std` samples from.

Why its own module: both commands read the same files (TRL's prompt-only format: a `prompt` per row, a
string or a list of chat messages, and an optional labelled `reference`) and must turn them into the same
token ids, so the rows, their reader and their encoding live once, below both (`load_prompts` ->
`PromptRow` -> `encode_prompt`). Preference pairs have their own reader (`preflens.data.formats`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preflens.errors import DataError, PreflensError

__all__ = ["PromptRow", "PROMPT_SUFFIXES", "load_prompts", "encode_prompt"]


@dataclass
class PromptRow:
    """One prompt of an RFT/diagnostic dataset: `prompt` and an optional labelled `reference`.

    A conversational prompt (TRL's prompt-only format, a list of chat messages) keeps the whole
    conversation in `messages`, which is what the model sees (through the chat template); `prompt`
    is then the text of its last user turn, shown in tables and passed to reward functions.
    """

    prompt_id: Any
    prompt: str
    reference: str | None = None
    messages: list[dict[str, Any]] | None = None


PROMPT_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def _prompt_records(path: Path) -> list[tuple[str, Any]]:
    """(where, record) per row of a .jsonl/.json/.parquet/.csv file; `where` names file and line/row."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".parquet", ".csv"):  # .jsonl, and any other name: JSON lines
        return _jsonl_records(path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            # a .json file holding JSON lines (as `datasets` writes them)
            if exc.msg == "Extra data":
                return _jsonl_records(path)
            raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects with a prompt field")
        return [(f"{path}: row {i}", r) for i, r in enumerate(data)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # only for .parquet prompt files

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a file that is not parquet
            raise DataError(f"{path}: not a readable parquet file ({exc})") from None
        return [(f"{path}: row {i}", r) for i, r in enumerate(table.to_pylist())]
    import pandas as pd  # only for .csv prompt files (pandas is slow to import)

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return []
    return [(f"{path}: row {i} (line {i + 2})", r) for i, r in enumerate(df.to_dict("records"))]


def _jsonl_records(path: Path) -> list[tuple[str, Any]]:
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    return out


def _messages(value: Any, where: str, field_name: str) -> list[dict[str, Any]] | None:
    """The chat messages of a conversational prompt, None for a string; DataError when malformed."""
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:  # conversational prompts in CSV are JSON text (as preflens's write_pairs writes them)
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if not isinstance(value, list):
        return None
    if not value or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        raise DataError(
            f"{where}: field `{field_name}` is a list but not chat messages "
            "(expected [{'role': ..., 'content': ...}, ...], at least one)"
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def load_prompts(
    path: str | Path,
    *,
    need_reference: bool = False,
    prompt_field: str = "prompt",
    reference_field: str = "reference",
) -> list[PromptRow]:
    """Prompts from a .jsonl/.json/.parquet/.csv file: one row per prompt (TRL's prompt-only format).

    `prompt_field` holds a string or a list of chat messages (conversational: the model sees the whole
    conversation through the chat template); `reference_field` an optional labelled completion (what
    `exact`/`rougeL` compare with and `--initial-sft` trains on; TRL's GRPO data often calls it
    `solution` or `answer`); `id` an optional prompt id. Errors name the file, line/row and field.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: no such prompts file (expected .jsonl/.json/.parquet/.csv with a `{prompt_field}` field per row)"
        )
    rows: list[PromptRow] = []
    seen: set[Any] = set()
    for where, obj in _prompt_records(path):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with a `{prompt_field}` field")
        value = obj.get(prompt_field)
        messages = _messages(value, where, prompt_field)
        if messages is not None:
            users = [m["content"] for m in messages if m["role"] == "user"]
            prompt = users[-1] if users else messages[-1]["content"]
        elif isinstance(value, str) and value:
            prompt = value
        else:
            hint = f"; available fields: {sorted(obj)}" if prompt_field not in obj else ""
            raise DataError(
                f"{where}: field `{prompt_field}` must be a non-empty string or a list of chat messages, "
                f"got {value!r}{hint} (another column: --prompt-field NAME)"
            )
        ref = obj.get(reference_field)
        if ref == "" and path.suffix.lower() == ".csv":
            ref = None  # an empty CSV cell is a missing value
        if ref is not None and not isinstance(ref, str):
            raise DataError(f"{where}: field `{reference_field}` must be a string, got {type(ref).__name__}")
        if need_reference and ref is None:
            raise DataError(
                f"{where}: the reward compares against a reference; add a `{reference_field}` field "
                "(or name the column holding it: --reference-field NAME)"
            )
        pid = obj.get("id", len(rows))
        if pid in seen:
            raise DataError(f"{where}: duplicate id {pid!r}")
        seen.add(pid)
        rows.append(PromptRow(prompt_id=pid, prompt=prompt, reference=ref, messages=messages))
    if not rows:
        raise DataError(f"{path}: no prompts found")
    return rows


def encode_prompt(
    tokenizer: Any,
    text: str,
    chat_template: bool | None = None,
    messages: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of a prompt, through the chat template when the tokenizer has one (or when asked).

    The template is rendered to text with the generation prompt and then tokenized without adding
    special tokens again (the template already holds them). `messages` (a conversational prompt)
    is rendered whole, system turns included, and needs the template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if messages is not None:
        if chat_template is False or not has_template:
            raise PreflensError(
                "a conversational prompt (a list of chat messages) needs the tokenizer's chat template"
                + (" (drop --no-chat-template)" if has_template else "; this tokenizer has none")
            )
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    use_template = has_template if chat_template is None else chat_template
    if use_template:
        if not has_template:
            raise PreflensError("--chat-template was requested but the tokenizer has no chat template")
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if len(ids) == 0:
        raise DataError(
            f"prompt {text[:60]!r} tokenizes to no tokens; a response needs a prompt or BOS before it"
        )
    return list(ids)
