"""The trainer's data before step 1: read and validate the rows, tokenize, hold out the eval split.

Why apart from the loop: this is where a user's file fails (a bad row, every pair too long, a batch size
larger than the data), and it must fail before a large model is loaded, with a message that says what
removed the pairs. `read_pairs` needs no model; `tokenize_splits` needs the tokenizer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preflens.data.formats import PreferencePair, available_splits, load_pairs
from preflens.errors import DataError, PreflensError
from preflens.tracking import DATA_REPORT_FILE
from preflens.training.config import TrainConfig

if TYPE_CHECKING:  # torch-free at import: `preflens train` reads and checks the data before torch loads
    from preflens.data.collate import TokenizedPair

__all__ = ["RawPairs", "RunData", "read_pairs", "tokenize_splits", "why_dropped"]


@dataclass
class RawPairs:
    """The validated rows of --data and, when there is one, of the eval source."""

    train: list[PreferencePair]
    eval: list[PreferencePair] | None
    reports: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunData:
    """Tokenized pairs of the run: train, eval, and the fixed train subset pairs.parquet tracks."""

    train_items: list[TokenizedPair]
    eval_items: list[TokenizedPair]
    train_subset: list[TokenizedPair]
    reports: dict[str, Any]


def _held_out_before(config: TrainConfig, run_dir: Path) -> bool:
    """A resumed run that held out a share of --data keeps doing so (its cached reference is of those
    pairs), even if the dataset now offers a test split."""
    report = run_dir / DATA_REPORT_FILE
    if not (config.resume and report.is_file()):
        return False
    try:
        return "eval/split" in json.loads(report.read_text())
    except (OSError, ValueError):
        return False


def read_pairs(config: TrainConfig, run_dir: Path, say: Callable[[str], None]) -> RawPairs:
    """Read and validate the rows first: a bad file fails before a large model is loaded."""
    cfg = config
    read = dict(
        prompt_field=cfg.prompt_field,
        chosen_field=cfg.chosen_field,
        rejected_field=cfg.rejected_field,
        on_invalid=cfg.on_invalid,
    )
    train, rep = load_pairs(cfg.data, split=cfg.data_split, **read)
    raw = RawPairs(train=train, eval=None, reports={"train/load": rep.to_dict()})
    eval_source = cfg.eval_data
    if (
        not eval_source
        and cfg.eval_fraction > 0
        and cfg.eval_split != cfg.data_split
        and not _held_out_before(cfg, run_dir)
    ):
        # a dataset with its own held-out split (train/test, as TRL's datasets come): evaluate on it,
        # as TRL's scripts do, instead of holding out a share of train
        if cfg.eval_split in (available_splits(cfg.data) or []):
            eval_source = cfg.data
    if eval_source:
        raw.eval, erep = load_pairs(eval_source, split=cfg.eval_split, **read)
        raw.reports["eval/load"] = {**erep.to_dict(), "split": cfg.eval_split}
        if not cfg.eval_data:
            say(f"eval: the {cfg.eval_split!r} split of {cfg.data} ({len(raw.eval)} pairs)")
    return raw


def tokenize_splits(config: TrainConfig, raw: RawPairs, tokenizer: Any, num_processes: int) -> RunData:
    """Tokenize; hold out the eval split; check the batch size against the data."""
    from preflens.data.collate import tokenize_pairs

    cfg = config
    tok_kw = dict(
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        truncation_mode=cfg.truncation_mode,
        on_too_long=cfg.on_too_long,
        chat_template=cfg.chat_template,
    )
    reports = raw.reports
    items, trep = tokenize_pairs(raw.train, tokenizer, **tok_kw)
    reports["train/tokenize"] = trep.to_dict()
    if raw.eval is not None:
        eval_items, etrep = tokenize_pairs(raw.eval, tokenizer, **tok_kw)
        reports["eval/tokenize"] = etrep.to_dict()
        train_items = items
    elif cfg.eval_fraction > 0 and len(items) >= 2:
        n_eval = max(1, round(cfg.eval_fraction * len(items)))
        n_eval = min(n_eval, len(items) - 1)
        order = list(range(len(items)))
        random.Random(f"eval-split/{cfg.seed}").shuffle(order)
        held = set(order[:n_eval])
        eval_items = [it for i, it in enumerate(items) if i in held]
        train_items = [it for i, it in enumerate(items) if i not in held]
        reports["eval/split"] = {
            "held_out_of_data": n_eval,
            "fraction": cfg.eval_fraction,
            "seed": cfg.seed,
        }
    else:
        eval_items, train_items = [], items
    if not train_items:
        raise DataError(f"{cfg.data}: no pairs left for training; " + why_dropped(reports))
    if len(train_items) < cfg.batch_size:
        raise PreflensError(
            f"--batch-size {cfg.batch_size} is larger than the {len(train_items)} train pairs of {cfg.data}; "
            "lower --batch-size"
        )
    if cfg.batch_size % num_processes:
        raise PreflensError(
            f"--batch-size {cfg.batch_size} (global, pairs per micro-batch) must be divisible by the "
            f"{num_processes} processes so that each gets an equal shard"
        )
    k = min(cfg.pairs_train_subset, len(train_items))
    subset = sorted(
        random.Random(f"train-subset/{cfg.seed}").sample(train_items, k), key=lambda it: it.pair_id
    )
    return RunData(train_items=train_items, eval_items=eval_items, train_subset=subset, reports=reports)


def why_dropped(reports: dict[str, Any]) -> str:
    """What removed the pairs (per reason, with one example), from the data reports of the train split."""
    counts: dict[str, int] = {}
    example = ""
    for key in ("train/load", "train/tokenize"):
        rep = reports.get(key) or {}
        for reason, n in (rep.get("dropped") or {}).items():
            counts[reason] = counts.get(reason, 0) + int(n)
            if not example and (rep.get("examples") or {}).get(reason):
                example = rep["examples"][reason][0]
    if not counts:
        return "the data has no rows"
    parts = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in counts.items())
    hint = (
        " (raise --max-length/--max-prompt-length or use --on-too-long truncate)"
        if "too_long" in counts
        else ""
    )
    return f"dropped: {parts}{hint}; e.g. {example}" if example else f"dropped: {parts}{hint}"
