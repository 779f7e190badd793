"""The reference log-probs: one no-grad pass before step 1, cached in the run directory, looked up per batch.

Why computed once: no second model is kept in memory (with LoRA the reference is the base model with the
adapters off; for a full finetune the model before its first update *is* the reference), and a resumed run
reads them back from `reference_logps.pt`. The cache records a sha256 of the pairs' token ids, because it is
looked up by pair id: an edited file with the same row count would silently get the old pairs' reference.
"""

from __future__ import annotations

import hashlib
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from preflens.data.collate import TokenizedPair
from preflens.errors import RunDirError

__all__ = [
    "REFERENCE_FILE",
    "ReferenceLogps",
    "evaluation_rows",
    "fingerprint",
    "load_or_compute_reference",
    "score_distinct",
    "score_splits",
]

REFERENCE_FILE = "reference_logps.pt"

Rows = dict[int, dict[str, Any]]


def fingerprint(items: Sequence[TokenizedPair]) -> str:
    """sha256 of the pairs' ids and token ids: what the cached reference log-probs were computed for."""
    h = hashlib.sha256()
    for it in sorted(items, key=lambda it: it.pair_id):
        for ids in ([it.pair_id], it.prompt_ids, it.chosen_ids, it.rejected_ids):
            h.update(array("q", [len(ids), *ids]).tobytes())  # length-prefixed: no ambiguous joins
    return h.hexdigest()


class ReferenceLogps:
    """Reference log-probs per split ("train", "eval") and pair id.

    `rows(split)[pair_id]` holds chosen, rejected, the lengths and (token-level losses) the per-token
    log-probs; `batch(split, pair_index)` looks a batch up in a dense on-device table (no Python loop in
    the step); `token_tensors` gives the left-aligned per-token reference of a batch.
    """

    def __init__(self, rows: dict[str, Rows], device: Any, with_tokens: bool) -> None:
        self._rows = rows
        self.device = device
        self.table: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        for split, split_rows in rows.items():
            if not split_rows:
                continue
            top = max(split_rows) + 1
            t = torch.full((top, 2), float("nan"), dtype=torch.float32)
            for pid, r in split_rows.items():
                t[pid, 0], t[pid, 1] = r["chosen"], r["rejected"]
            self.table[split] = t.to(device)
            if with_tokens:
                self._tokens[split] = {
                    pid: (r["chosen_tokens"], r["rejected_tokens"]) for pid, r in split_rows.items()
                }

    def rows(self, split: str) -> Rows:
        return self._rows[split]

    def __getitem__(self, split: str) -> Rows:
        return self._rows[split]

    def batch(self, split: str, pair_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ref_chosen [B], ref_rejected [B]) of the pairs `pair_index`, on the table's device."""
        ref = self.table[split][pair_index]
        return ref[:, 0], ref[:, 1]

    def token_tensors(
        self, split: str, pair_ids: Sequence[int], width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-aligned [B, width] reference token log-probs of the batch (zeros on padding)."""
        table = self._tokens[split]
        b = len(pair_ids)
        cw = torch.zeros(b, width)
        cl = torch.zeros(b, width)
        for i, pid in enumerate(pair_ids):
            tw, tl = table[int(pid)]
            cw[i, : len(tw)] = tw[:width]
            cl[i, : len(tl)] = tl[:width]
        return cw.to(self.device), cl.to(self.device)


def _read_cache(
    path: Path, need: dict[str, set[int]], prints: dict[str, str], with_tokens: bool
) -> dict[str, Rows]:
    saved = torch.load(path, weights_only=False)
    for split, fp in (saved.get("fingerprint") or {}).items():  # absent in older caches
        if split in prints and fp != prints[split]:
            raise RunDirError(
                f"{path}: the {split} pairs' token ids differ from those its reference log-probs were "
                "computed for (was the data file edited, or --max-length, --max-prompt-length, the "
                "chat template or the tokenizer changed?); resume with the same data and options, "
                "or start a new run"
            )
    ok = all(need[s] <= set(saved.get(s, {})) for s in need) and saved.get("tokens", False) >= with_tokens
    if not ok:
        raise RunDirError(
            f"{path}: its pairs do not match the data of this run (was --data or --eval-data changed "
            "since the run started?); resume with the same data, or start a new run"
        )
    return {s: saved[s] for s in need}


def load_or_compute_reference(
    run_dir: Path,
    train_items: Sequence[TokenizedPair],
    eval_items: Sequence[TokenizedPair],
    *,
    score: Callable[[Sequence[TokenizedPair]], Rows],
    with_tokens: bool,
    can_recompute: bool,
    is_main_process: bool,
    device: Any,
    say: Callable[[str], None],
) -> ReferenceLogps:
    """Reference log-probs of every train and eval pair: read back from the run directory, or computed
    with `score` (a reference-mode `PairScorer.score`) and saved. `can_recompute` is False for a resumed
    full finetune, whose model is no longer the reference."""
    path = run_dir / REFERENCE_FILE
    need = {"train": {it.pair_id for it in train_items}, "eval": {it.pair_id for it in eval_items}}
    prints = {"train": fingerprint(train_items), "eval": fingerprint(eval_items)}
    rows = _read_cache(path, need, prints, with_tokens) if path.is_file() else None
    if rows is None and not can_recompute:
        raise RunDirError(
            f"{path}: missing, and the reference cannot be recomputed from the resumed (trained) model; "
            "start a new run"
        )
    if rows is None:
        t0 = time.perf_counter()
        rows, scored = score_distinct(score, train_items, eval_items)
        if is_main_process:
            torch.save({**rows, "tokens": with_tokens, "fingerprint": prints}, path)
        shared = len(train_items) + len(eval_items) - scored
        say(
            f"reference log-probs of {len(train_items)} train + {len(eval_items)} eval pairs "
            + (f"({scored} distinct: {shared} repeated pairs scored once) " if shared else "")
            + f"in {time.perf_counter() - t0:.1f}s (cached in {path.name})"
        )
    return ReferenceLogps(rows, device, with_tokens)


def _content(it: TokenizedPair) -> tuple[tuple[int, ...], ...]:
    return (tuple(it.prompt_ids), tuple(it.chosen_ids), tuple(it.rejected_ids))


def score_distinct(
    score: Callable[[Sequence[TokenizedPair]], Rows],
    train_items: Sequence[TokenizedPair],
    eval_items: Sequence[TokenizedPair],
) -> tuple[dict[str, Rows], int]:
    """Reference rows of both splits with every distinct pair (same token ids) scored once: --eval-data
    equal to (or overlapping) --data, or a file with repeated rows, costs no second pass. Returns the rows
    and how many pairs were scored."""
    return score_splits(score, (("train", train_items), ("eval", eval_items)))


def score_splits(
    score: Callable[[Sequence[TokenizedPair]], Rows],
    splits: Sequence[tuple[str, Sequence[TokenizedPair]]],
) -> tuple[dict[str, Rows], int]:
    """Rows of several splits, in the given order, with every distinct pair (same token ids) scored once:
    a pair already scored for an earlier split is copied, not scored again. Used by the reference pass and
    by every evaluation (the eval split and the train subset overlap when --eval-data repeats --data).
    Pair ids are per split (an eval file's row 3 is not train's row 3), so pairs are matched by their token
    ids, never by id. Returns the rows per split and how many pairs were scored."""
    known: dict[tuple, dict[str, Any]] = {}
    out: dict[str, Rows] = {}
    scored = 0
    for split, items in splits:
        todo: dict[tuple, TokenizedPair] = {}
        for it in items:
            key = _content(it)
            if key not in known and key not in todo:
                todo[key] = it
        fresh = score(list(todo.values())) if todo else {}
        scored += len(todo)
        for key, it in todo.items():
            known[key] = fresh[it.pair_id]
        out[split] = {it.pair_id: dict(known[_content(it)]) for it in items}
    return out, scored


def evaluation_rows(
    score: Callable[[Sequence[TokenizedPair]], Rows],
    splits: Sequence[tuple[str, Sequence[TokenizedPair]]],
    reference: ReferenceLogps,
    at_reference: bool,
) -> dict[str, Rows]:
    """The policy's rows of an evaluation's splits (the eval split, the train subset). `at_reference`: the
    policy is the reference (a fresh run's step 0: the same weights, or LoRA adapters that add exactly 0)
    and an evaluation row needs nothing more than a reference row, so the reference pass's rows are read
    instead of repeating that pass. Otherwise every distinct pair is scored once (`score_splits`)."""
    if at_reference:
        return {s: {it.pair_id: dict(reference.rows(s)[it.pair_id]) for it in items} for s, items in splits}
    return score_splits(score, splits)[0]
