"""Tokenize preference pairs and pad them into the batch layout of ARCHITECTURE.md.

Tokenization follows TRL's DPOTrainer (`trl.trainer.dpo_trainer`, 1.x) so a run here and a TRL run see the
same tokens:

* the prompt alone, prompt+chosen and prompt+rejected are each tokenized whole (conversational data through
  the chat template: the prompt with ``add_generation_prompt=True``, the full exchange without), and the
  prompt is the longest common token prefix of the three. So ``prompt_ids + chosen_ids`` *is* the tokenized
  full text, whatever the tokenizer merges at the boundary; where the prompt rendered alone differs from its
  rendering inside the conversation (a template that drops a generation-prompt artefact, a BPE merge across
  the boundary), the prompt keeps only the shared part and the report notes how many pairs that hit;
* plain strings are tokenized as the tokenizer does by default (its BOS, if any); responses end with EOS
  (appended as a token, as TRL appends ``eos_token``); an empty prompt becomes BOS (or EOS for tokenizers
  without one, as GPT-2 starts text) so that some logit predicts the first response token;
* conversational responses are the rendered assistant turn(s), which chat templates end with an end-of-turn
  token. The response is cut right after its last EOS token (templates often add a newline after it, which
  generation never produces since it stops at EOS) or, if the template emits no EOS, EOS is appended. This
  is the one place where ``prompt_ids + chosen_ids`` differs from tokenizing the full conversation: the
  tokens *after* the final EOS are left out.

Truncation (``on_too_long="truncate"``): the prompt is cut first to ``max_prompt_length`` (``keep_end``
drops its beginning but keeps a leading BOS; ``keep_start`` drops its end), then each response is cut to
fit ``max_length``. A response is never cut to nothing: a pair that cannot keep at least one response
token is dropped and counted. ``"drop"`` drops every pair over a limit, ``"error"`` raises on the first
ones. Truncated and dropped pairs are counted in the returned `DataReport`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from preflens.data.formats import DataReport, PreferencePair, Text
from preflens.errors import DataError, PreflensError

TOO_LONG = "too_long"
_TOKENIZE_CHUNK = 1024  # texts per tokenizer call: fast tokenizers parallelize within a call


@dataclass
class TokenizedPair:
    """Token ids of one pair; ``prompt_ids + chosen_ids`` and ``prompt_ids + rejected_ids`` are the two rows."""

    pair_id: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def length(self) -> int:
        """Length of the longer of the two rows (what the pair costs in a padded batch)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _as_conversation(text: Text, role: str) -> list[dict[str, Any]]:
    return text if isinstance(text, list) else [{"role": role, "content": text}]


def _render(pair: PreferencePair, tokenizer: Any, use_template: bool) -> tuple[str, str, str]:
    """(prompt, prompt+chosen, prompt+rejected) as text, through the chat template when `use_template`."""
    if not use_template:
        if pair.is_conversational:
            raise DataError(
                f"pair {pair.pair_id}: conversational data needs the chat template; do not disable it "
                "(chat_template=False / --no-chat-template) for this dataset"
            )
        return pair.prompt, pair.prompt + pair.chosen, pair.prompt + pair.rejected
    prompt = _as_conversation(pair.prompt, "user")
    chosen = _as_conversation(pair.chosen, "assistant")
    rejected = _as_conversation(pair.rejected, "assistant")
    # as TRL's apply_chat_template: a prompt ending in an assistant turn is continued, not answered anew
    cont = bool(prompt) and prompt[-1]["role"] == "assistant"
    p = tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=not cont, continue_final_message=cont
    )
    c = tokenizer.apply_chat_template(prompt + chosen, tokenize=False)
    r = tokenizer.apply_chat_template(prompt + rejected, tokenize=False)
    return p, c, r


def _tokenize_texts(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        enc = tokenizer(
            texts[start : start + _TOKENIZE_CHUNK],
            add_special_tokens=add_special_tokens,
            truncation=False,
            verbose=False,
        )
        out.extend(list(ids) for ids in enc["input_ids"])
    return out


def _end_with_eos(ids: list[int], eos: int, conversational: bool) -> list[int]:
    if conversational and eos in ids:
        last = len(ids) - 1 - ids[::-1].index(eos)
        return ids[: last + 1]
    return ids if ids and ids[-1] == eos else ids + [eos]


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer: Any,
    *,
    max_length: int | None = 512,
    max_prompt_length: int | None = 256,
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end",
    on_too_long: Literal["truncate", "drop", "error"] = "truncate",
    chat_template: bool | None = None,
) -> tuple[list[TokenizedPair], DataReport]:
    """Tokenize pairs (see the module docstring for the exact rules) and report truncations and drops.

    `chat_template`: None uses the tokenizer's chat template for conversational pairs and plain text for
    string pairs (as TRL does); True renders string pairs as a user turn and an assistant turn too (for
    instruct models fed plain-string datasets); False refuses conversational pairs.
    """
    if truncation_mode not in ("keep_end", "keep_start"):
        raise PreflensError(f"truncation_mode must be 'keep_end' or 'keep_start', got {truncation_mode!r}")
    if on_too_long not in ("truncate", "drop", "error"):
        raise PreflensError(f"on_too_long must be 'truncate', 'drop' or 'error', got {on_too_long!r}")
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and value < 1:
            raise PreflensError(f"{name} must be a positive number of tokens or None, got {value}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise PreflensError(
            "the tokenizer has no EOS token; responses must end with one (set tokenizer.eos_token)"
        )
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    report = DataReport(stage="tokenize", source=str(name), rows_read=len(pairs))
    if not pairs:
        return [], report

    use = [chat_template if chat_template is not None else p.is_conversational for p in pairs]
    if any(use) and not getattr(tokenizer, "chat_template", None):
        first = next(p for p, u in zip(pairs, use) if u)
        raise DataError(
            f"pair {first.pair_id} is conversational (or chat_template=True) but the tokenizer has no chat template; "
            "use a tokenizer with one (an instruct model) or plain-string data"
        )
    rendered = [_render(p, tokenizer, u) for p, u in zip(pairs, use)]
    ids: dict[bool, list[list[int]]] = {}
    for templated in (False, True):
        idx = [i for i, u in enumerate(use) if u == templated]
        # the chat template writes its own BOS text, so no special tokens are added to it (as
        # `apply_chat_template(tokenize=True)` does); plain strings get the tokenizer's own
        flat = [t for i in idx for t in rendered[i]]
        toks = _tokenize_texts(tokenizer, flat, add_special_tokens=not templated) if flat else []
        ids[templated] = toks
    position = {False: 0, True: 0}
    bos = getattr(tokenizer, "bos_token_id", None)

    out: list[TokenizedPair] = []
    too_long: list[str] = []
    n_boundary = 0
    n_empty_prompt = 0
    for pair, templated in zip(pairs, use):
        k = position[templated]
        position[templated] += 3
        prompt_full, chosen_full, rejected_full = ids[templated][k : k + 3]
        n_prompt = min(_common_prefix(prompt_full, chosen_full), _common_prefix(prompt_full, rejected_full))
        if n_prompt < len(prompt_full):
            n_boundary += 1
        prompt = prompt_full[:n_prompt]
        if not prompt:
            # nothing would predict the first response token (tokenizers without BOS, empty prompt):
            # start the row with BOS, or EOS as GPT-2-style models use it as start of text
            prompt = [bos if bos is not None else eos]
            n_empty_prompt += 1
        chosen = _end_with_eos(chosen_full[n_prompt:], eos, templated)
        rejected = _end_with_eos(rejected_full[n_prompt:], eos, templated)

        longest = len(prompt) + max(len(chosen), len(rejected))
        over_prompt = max_prompt_length is not None and len(prompt) > max_prompt_length
        over_total = max_length is not None and longest > max_length
        if not (over_prompt or over_total):
            out.append(TokenizedPair(pair.pair_id, prompt, chosen, rejected))
            continue
        why = (
            f"pair {pair.pair_id}: prompt {len(prompt)} tokens (max_prompt_length {max_prompt_length}), "
            f"chosen {len(chosen)}, rejected {len(rejected)} (max_length {max_length})"
        )
        if on_too_long == "error":
            too_long.append(why)
            continue
        if on_too_long == "drop":
            report.drop(TOO_LONG, why)
            continue
        if over_prompt:
            assert max_prompt_length is not None
            if truncation_mode == "keep_start":
                prompt = prompt[:max_prompt_length]
            elif bos is not None and prompt[0] == bos and max_prompt_length > 1:
                prompt = prompt[:1] + prompt[len(prompt) - max_prompt_length + 1 :]
            else:
                prompt = prompt[len(prompt) - max_prompt_length :]
        if max_length is not None:
            budget = max_length - len(prompt)
            if budget < 1:
                report.drop(TOO_LONG, why + ": no room left for a response token")
                continue
            chosen, rejected = chosen[:budget], rejected[:budget]
        report.truncated += 1
        out.append(TokenizedPair(pair.pair_id, prompt, chosen, rejected))
    if too_long:
        shown = too_long[:5]
        raise DataError(
            f"{len(too_long)} pair(s) exceed the length limits (first {len(shown)} shown):\n  "
            + "\n  ".join(shown)
            + "\nRaise --max-length/--max-prompt-length, or use on_too_long='truncate' or 'drop'."
        )
    if n_boundary:
        report.notes.append(
            f"{n_boundary} pair(s): the prompt tokenized alone is not a prefix of prompt+response (chat template "
            "renders it differently, or tokens merge across the boundary); the prompt kept the shared tokens only"
        )
    if n_empty_prompt:
        report.notes.append(
            f"{n_empty_prompt} pair(s) had no prompt tokens: the row starts with "
            f"{'BOS' if bos is not None else 'EOS'} so the first response token is scored"
        )
    report.rows_kept = len(out)
    return out, report


# ---------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------


def collate_pairs(items: Sequence[TokenizedPair], pad_token_id: int) -> dict[str, Any]:
    """Pad B pairs into the ARCHITECTURE.md batch: rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected.

    Right-padded to the longest row of this batch only. `response_mask[r, t]` is True exactly where token t
    of row r is a response token. Position 0 is never marked (no logit predicts it); `tokenize_pairs` never
    yields an empty prompt, so no response token sits there.
    """
    if not items:
        raise PreflensError("collate_pairs needs at least one pair")
    if pad_token_id is None:
        raise PreflensError("pad_token_id is None: set tokenizer.pad_token (TRL uses the EOS token)")
    b = len(items)
    rows = [(it.prompt_ids, it.chosen_ids) for it in items] + [
        (it.prompt_ids, it.rejected_ids) for it in items
    ]
    t = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((2 * b, t), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((2 * b, t), dtype=torch.long)
    response_mask = torch.zeros((2 * b, t), dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[i, :n] = 1
        response_mask[i, max(len(p), 1) : n] = True
    pair_index = torch.tensor([it.pair_id for it in items], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "pair_index": pair_index,
    }


@dataclass
class PairCollator:
    """`collate_pairs` with a fixed pad id, picklable for DataLoader workers."""

    pad_token_id: int

    def __call__(self, items: Sequence[TokenizedPair]) -> dict[str, Any]:
        return collate_pairs(items, self.pad_token_id)


class PairDataset(Dataset):
    """A map-style torch Dataset over tokenized pairs (index -> TokenizedPair)."""

    def __init__(self, items: Sequence[TokenizedPair]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> TokenizedPair:
        return self.items[index]

    @property
    def lengths(self) -> list[int]:
        return [it.length for it in self.items]


class EpochCounter:
    """The epoch counter, reachable as `batch_sampler.sampler.set_epoch` - where accelerate's DataLoaderShard
    looks for it once it has wrapped a batch sampler for several processes (BatchSamplerShard)."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class LengthGroupedBatchSampler:
    """Batches of indices with similar lengths, to cut padding (as HF's `group_by_length`).

    Indices are shuffled (seeded, reshuffled by `set_epoch`), split into mega-batches of
    ``batch_size * mega_batch_mult``, each sorted by length (longest first) and cut into batches; the
    batch order is then shuffled, except that the batch with the longest pair goes first so an
    out-of-memory error shows on step one. Deterministic for a given (seed, epoch), so a resumed run sees
    the same order and every process of a multi-process run the same batches (accelerate's
    BatchSamplerShard then gives each process its share and reaches `set_epoch` through `.sampler`).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        mega_batch_mult: int = 50,
        drop_last: bool = False,
    ):
        if batch_size < 1:
            raise PreflensError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.mega_batch_mult = max(1, mega_batch_mult)
        self.drop_last = drop_last
        self.sampler = EpochCounter()

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        idx = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(idx)
        mega = self.batch_size * self.mega_batch_mult if self.shuffle else len(idx)
        batches: list[list[int]] = []
        for start in range(0, len(idx), mega):
            chunk = sorted(idx[start : start + mega], key=lambda i: -self.lengths[i])
            batches.extend(chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size))
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches = [bt for bt in batches if len(bt) == self.batch_size]
        if self.shuffle and len(batches) > 1:
            longest = max(range(len(batches)), key=lambda k: self.lengths[batches[k][0]])
            first = batches.pop(longest)
            rng.shuffle(batches)
            batches.insert(0, first)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def make_dataloader(
    items: Sequence[TokenizedPair],
    batch_size: int,
    pad_token_id: int,
    *,
    shuffle: bool = True,
    group_by_length: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
) -> Any:
    """A torch DataLoader yielding ARCHITECTURE.md batches (optionally length-grouped)."""
    ds = PairDataset(items)
    collate = PairCollator(pad_token_id)
    if group_by_length:
        sampler = LengthGroupedBatchSampler(
            ds.lengths, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        return DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=gen if shuffle else None,
        collate_fn=collate,
        drop_last=drop_last,
        num_workers=num_workers,
    )
