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
