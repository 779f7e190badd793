"""No-grad per-pair log-probs of a list of pairs: the reference pass and every evaluation.

Why a class: both passes must batch, order and share the work across processes the same way, switch LoRA
adapters off for the reference only, and keep exactly what the configured loss needs (per-token log-probs
for token-level losses, learned-mask logits for sparse mask="learned"). One object holds those decisions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import gather_object

from preflens.data.collate import TokenizedPair, collate_pairs
from preflens.logprobs import SequenceLogps, check_padding_free, sequence_logps

__all__ = ["PairScorer"]

Rows = dict[int, dict[str, Any]]


@dataclass
class PairScorer:
    accelerator: Any
    model: Any
    """The prepared policy (unwrapped for eval mode and the adapter switch)."""
    forward_module: Callable[[], Any]
    """What `sequence_logps` runs (the bare model in one process, the wrapper's forward otherwise)."""
    pad_token_id: int
    batch_size: int
    fresh_lora: bool
    want_tokens: bool
    mask_head: Any = None
    padding_free: bool = False
    want_log_sum_sq: bool = False
    """Keep log sum_v pi(v)^2 per token at evaluation (WPO's weight, TRL's use_weighting)."""

    @property
    def eval_rows_match_reference(self) -> bool:
        """Whether an evaluation row holds only what a reference row holds (no per-token loss inputs, no
        learned-mask logits, no WPO log sum of squares). Then at step 0 of a fresh run, where the policy is
        the reference, the trainer reads the evaluation from the reference pass instead of repeating it."""
        return self.mask_head is None and not self.want_tokens and not self.want_log_sum_sq

    def batches(self, items: Sequence[TokenizedPair]) -> list[list[TokenizedPair]]:
        """Fixed batches for no-grad passes: sorted by length (little padding), this process's share.

        Every process runs the same number of forwards (the last batch repeated where the shares are
        uneven; results are keyed by pair id, so the repeat is harmless): FSDP and ZeRO-3 forwards are
        collectives that all processes must enter.
        """
        ordered = sorted(items, key=lambda it: (it.length, it.pair_id))
        size = self.batch_size
        batches = [ordered[i : i + size] for i in range(0, len(ordered), size)]
        acc = self.accelerator
        mine = batches[acc.process_index :: acc.num_processes]
        per = -(-len(batches) // acc.num_processes)
        while batches and len(mine) < per:
            mine.append(batches[-1])
        return mine

    def score(self, items: Sequence[TokenizedPair], *, reference: bool) -> Rows:
        """Per-pair log-probs of `items` (all processes share the work, all get the result)."""
        model = self.accelerator.unwrap_model(self.model)
        runner = self.forward_module()
        was_training = model.training
        model.eval()
        out: Rows = {}
        ctx = model.disable_adapter() if (reference and self.fresh_lora) else contextlib.nullcontext()
        try:
            with torch.no_grad(), ctx, self.accelerator.autocast():
                for chunk in self.batches(items):
                    batch = collate_pairs(chunk, self.pad_token_id)
                    batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
                    seq = sequence_logps(
                        runner,
                        batch["input_ids"],
                        batch["attention_mask"],
                        batch["response_mask"],
                        return_tokens=self.want_tokens,
                        return_hidden=self.mask_head is not None and not reference,
                        padding_free=self.padding_free,
                        **({"return_log_sum_sq": True} if self.want_log_sum_sq and not reference else {}),
                    )
                    self._keep(chunk, seq, out)
                    if not reference and (self.mask_head is not None or self.want_tokens):
                        self._keep_token_loss_inputs(chunk, seq, out)
        finally:
            model.train(was_training)
        merged: Rows = {}
        for part in gather_object([out]):
            merged.update(part)
        return merged

    def verify_padding_free(self, items: Sequence[TokenizedPair]) -> str:
        """Check on a few real pairs that packed log-probs equal padded ones and stay isolated per sequence
        (`logprobs.check_padding_free` raises otherwise); returns the line saying so."""
        acc = self.accelerator
        batch = collate_pairs(list(items), self.pad_token_id)
        ids, am, rm = (batch[k].to(acc.device) for k in ("input_ids", "attention_mask", "response_mask"))
        bare = acc.unwrap_model(self.model)
        was_training = bare.training
        bare.eval()
        try:
            with torch.no_grad(), acc.autocast():
                diffs = check_padding_free(self.forward_module(), ids, am, rm)
        finally:
            bare.train(was_training)
        return (
            f"padding-free: packed log-probs match padded ones (largest difference {diffs['max_abs']:.2g}) "
            f"and stay isolated per sequence ({diffs['isolation']:.2g})"
        )

    def _keep(self, chunk: Sequence[TokenizedPair], seq: SequenceLogps, out: Rows) -> None:
        b = len(chunk)
        # one device-to-host copy per batch, not one per number
        lp, ln = seq.logps.float().cpu().tolist(), seq.lengths.cpu().tolist()
        if self.want_tokens:
            tl, tm = seq.token_logps.float().cpu(), seq.token_mask.cpu()
        for i, it in enumerate(chunk):
            row = {
                "chosen": lp[i],
                "rejected": lp[b + i],
                "chosen_len": ln[i],
                "rejected_len": ln[b + i],
            }
            if self.want_tokens:
                for side, r in (("chosen", i), ("rejected", b + i)):
                    row[f"{side}_tokens"] = tl[r][tm[r]]
            out[it.pair_id] = row

    def _keep_token_loss_inputs(self, chunk: Sequence[TokenizedPair], seq: SequenceLogps, out: Rows) -> None:
        """Keep what the token-level loss needs at evaluation (token ids, learned-mask logits)."""
        b = len(chunk)
        ids, mask = seq.token_ids.cpu(), seq.token_mask.cpu()
        logits = None
        if self.mask_head is not None and seq.hidden is not None:
            logits = self.mask_head(seq.hidden).squeeze(-1).float().cpu()
        for i, it in enumerate(chunk):
            row = out[it.pair_id]
            for side, r in (("chosen", i), ("rejected", b + i)):
                row[f"{side}_token_ids"] = ids[r][mask[r]]
                if seq.token_log_sum_sq is not None:
                    row[f"{side}_log_sum_sq"] = seq.token_log_sum_sq[r].float().cpu()[mask[r]]
                if logits is not None:
                    row[f"{side}_mask_logits"] = logits[r][mask[r]]
