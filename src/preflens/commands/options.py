"""Options that several commands share, declared once so their names, defaults and help cannot drift apart.

Each is a `typer.Option(...)` used as a parameter default (`prompt_field: str = PROMPT_FIELD`); typer
only reads these objects, so one instance serves every command.
"""

from __future__ import annotations

import typer

MODEL = typer.Option(None, "--model", help="HF id or local path (default: the embedded SmolLM2)")
CHAT_TEMPLATE = typer.Option(
    None, "--chat-template/--no-chat-template", help="default: the tokenizer's template if it has one"
)

# preference pairs (`preflens.data.formats.load_pairs`)
DATA_SPLIT = typer.Option("train", "--data-split", help="split of a save_to_disk directory / DatasetDict")
PROMPT_FIELD = typer.Option("prompt", "--prompt-field", help="column holding the prompt")
CHOSEN_FIELD = typer.Option("chosen", "--chosen-field", help="column holding the chosen response")
REJECTED_FIELD = typer.Option("rejected", "--rejected-field", help="column holding the rejected response")
ON_INVALID = typer.Option("error", "--on-invalid", help="error | drop (drop invalid rows and count them)")

# prompts to sample from (`preflens rft`, `preflens reward-std`)
PROMPTS = typer.Option(
    ...,
    "--prompts",
    help="jsonl/json/parquet/csv with `prompt` (text or chat messages), optional `reference` and `id`",
)
REFERENCE_FIELD = typer.Option(
    "reference", "--reference-field", help="column holding the labelled completion (e.g. solution)"
)
REWARD = typer.Option(
    ...,
    "--reward",
    help="exact[:C,W] | normalized | regex:PATTERN | keyword:W1,W2 | length:N | rougeL | model:/path | module:function",
)

# memory budget of the gradient diagnostics (`preflens.grad.memory`)
MAX_MEMORY = typer.Option(
    None,
    "--max-memory",
    help="peak extra memory a diagnostic may use, e.g. 6GB or 500MiB (default: half the free RAM / GPU memory); "
    "the work is chunked to stay under it, or refused up front when one chunk cannot fit",
)


def parse_bytes(text: str | None, flag: str) -> int | None:
    """'6GB' -> 6e9, '500MiB' -> 500 * 2^20, '123' -> 123 bytes; None stays None (the default budget).
    `preflens.sizes.parse_size`, torch-free, so the commands check the flag before the heavy imports."""
    from preflens.sizes import parse_size

    return parse_size(text, flag)


def check_pairs_early(data: object, *, limit: int | None = None, **read: object) -> None:
    """Read and validate every row of `data` now, before torch/transformers are imported and the model
    is loaded, so a broken file is reported (file, row, line, field, what was expected) in about a second.

    torch-free: `preflens.data.formats` reads with the standard library (pyarrow/pandas for parquet/csv).
    The library call that follows gets the same pairs from `load_pairs`' read cache (keyed by the file's
    identity), so the file is not read twice.
    """
    from pathlib import Path

    from preflens.data.formats import load_pairs, looks_like_path
    from preflens.errors import PreflensError

    if data is None or str(data) == "":
        raise PreflensError("--data is required (a file, directory or hub id of preference pairs)")
    path = Path(str(data)).expanduser()
    if not path.exists() and not isinstance(data, Path) and not looks_like_path(str(data)):
        return  # a hub id: read by the library (datasets), which imports what it needs
    load_pairs(data, limit=limit, **read)  # type: ignore[arg-type]
