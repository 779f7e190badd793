"""CHES: the centered hidden embedding similarity of a preference pair (Razin et al. 2024).

Source: Razin et al. 2024, "Unintentional Unalignment: Likelihood Displacement in Direct Preference
Optimization" (arXiv 2410.08847), Sec. 5 (Definition of the CHES score, Eq. (4) in the arXiv v1
numbering, written CHES_x(y+, y-)):

    CHES_x(y+, y-) = < sum_k h_{x, y+_{<k}}, sum_k' h_{x, y-_{<k'}} > - || sum_k h_{x, y+_{<k}} ||^2

where h_{x, y_{<k}} is the last hidden state (the input of the unembedding, i.e. after the final norm)
at the position that *predicts* response token k. Their theory: the higher the score, the more DPO on
the pair pushes the chosen log-prob down (likelihood displacement). The length-normalized variant
divides each sum by its number of vectors (the paper's "length-normalized CHES", Sec. 5.1, which
ranks UltraFeedback pairs better when response lengths vary).

Why it is cheap: the score needs the backbone only. We call the decoder (the model without its
lm_head), so no logits over the vocabulary are ever formed, and chosen and rejected rows go through it
in one forward, as in training (ARCHITECTURE.md's batch layout). No gradients are kept.

Mask convention (DESIGN.md, as for `sequence_gram`): `response_mask[s, t]` marks token t of row s as a
response token; the hidden state at position t-1 is the one that predicts it; padding on the right.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from preflens.errors import PreflensError

__all__ = ["ches_score", "ches_from_sums", "response_hidden_sums", "get_decoder"]


def get_decoder(model: nn.Module) -> nn.Module | None:
    """The backbone of a causal LM (returns `last_hidden_state` after the final norm), or None.

    Unwraps a peft `PeftModel` (its LoRA layers stay active inside the backbone) and
    accelerate/DDP wrappers (`.module`). Uses the model's `get_decoder()` when it has one, else its
    `base_model_prefix` attribute. None when the model has no separate backbone (then the caller falls
    back to `output_hidden_states`).
    """
    base = model.module if isinstance(getattr(model, "module", None), nn.Module) else model
    if hasattr(base, "get_base_model"):  # peft.PeftModel
        base = base.get_base_model()
    decoder = None
    if hasattr(base, "get_decoder"):
        try:
            decoder = base.get_decoder()
        except (AttributeError, NotImplementedError):
            decoder = None
    if decoder is None:
        prefix = getattr(base, "base_model_prefix", None)
        decoder = getattr(base, prefix, None) if prefix else None
    if decoder is None or decoder is base or not isinstance(decoder, nn.Module):
        return None
    return decoder


def _validate(input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, what: str) -> None:
    if (
        input_ids.dim() != 2
        or input_ids.shape != attention_mask.shape
        or input_ids.shape != response_mask.shape
    ):
        raise PreflensError(
            f"{what}: ids, attention and response_mask must be [B, T] tensors of one shape; got "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(response_mask.shape)}"
        )
    rm = response_mask.bool()
    if rm[:, 0].any():
        row = int(rm[:, 0].nonzero()[0, 0])
        raise PreflensError(
            f"{what} row {row}: response_mask marks position 0, but no position predicts it "
            "(a response needs at least one prompt/BOS token before it)"
        )
    if (rm & ~attention_mask.bool()).any():
        row = int((rm & ~attention_mask.bool()).any(1).nonzero()[0, 0])
        raise PreflensError(f"{what} row {row}: response_mask marks a padding position (attention 0)")
    empty = ~rm.any(1)
    if empty.any():
        row = int(empty.nonzero()[0, 0])
        raise PreflensError(f"{what} row {row}: the response has no tokens; CHES needs at least one")


def _last_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Last hidden state after the final norm, [N, T, d], from the backbone alone when possible."""
    kwargs = {}
    am = attention_mask.long()
    if (am[:, 1:] > am[:, :-1]).any():  # left padding: give the real tokens positions 0, 1, ...
        kwargs["position_ids"] = (am.cumsum(-1) - 1).clamp(min=0)
    decoder = get_decoder(model)
    if decoder is not None:
        return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)[0]
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        use_cache=False,
        output_hidden_states=True,
        **kwargs,
    )
    return out.hidden_states[-1]


def response_hidden_sums(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """(sum of h over the response-predicting positions [N, d] in float32, their count [N]).

    One backbone forward over the N rows. Row s sums h[s, t-1] over every t with
    response_mask[s, t] (the paper's sum_k h_{x, y_{<k}}); accumulation is in float32 whatever the
    model's dtype, so bf16 models give stable scores.
    """
    _validate(input_ids, attention_mask, response_mask, "batch")
    # Scoring is inference: dropout off (a model fresh from training is in train mode and would give
    # a different score at every call), its mode restored afterwards.
    was_training = model.training
    model.eval()
    # inference_mode (not just no_grad): no version counters or autograd metadata on the activations
    try:
        with torch.inference_mode():
            h = _last_hidden(model, input_ids, attention_mask)
            pred = response_mask[:, 1:].to(device=h.device, dtype=torch.float32)  # position t-1 predicts t
            hp = h[:, :-1]
            if hp.dtype != torch.float32:
                hp = hp.float()
            sums = torch.bmm(pred.unsqueeze(1), hp).squeeze(1)
            counts = pred.sum(1)
    finally:
        model.train(was_training)
    # ordinary tensors again (inference tensors refuse to enter autograd later), a [N, d] copy
    return sums.clone(), counts.clone()


def ches_from_sums(
    sum_chosen: Tensor,
    sum_rejected: Tensor,
    n_chosen: Tensor,
    n_rejected: Tensor,
    length_normalized: bool = False,
) -> Tensor:
    """CHES from the summed hidden states of each side (Razin et al. 2024, arXiv 2410.08847, Sec. 5's
    definition).

    CHES = <s+, s-> - |s+|^2 with s = sum of h; length-normalized: s+ / n+ and s- / n- first.
    """
    if length_normalized:
        sum_chosen = sum_chosen / n_chosen.to(sum_chosen.dtype).unsqueeze(-1)
        sum_rejected = sum_rejected / n_rejected.to(sum_rejected.dtype).unsqueeze(-1)
    return (sum_chosen * sum_rejected).sum(-1) - (sum_chosen * sum_chosen).sum(-1)


def _pad_right(x: Tensor, width: int, value: int) -> Tensor:
    if x.shape[1] == width:
        return x
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def ches_score(
    model: nn.Module,
    chosen_ids: Tensor,
    chosen_attention: Tensor,
    chosen_response_mask: Tensor,
    rejected_ids: Tensor,
    rejected_attention: Tensor,
    rejected_response_mask: Tensor,
    length_normalized: bool = False,
) -> Tensor:
    """CHES score of B preference pairs, [B] float32 (DESIGN.md's contract; Razin et al. 2024,
    arXiv 2410.08847, Sec. 5).

    Forward-only: chosen and rejected rows are padded to one width and go through the model's
    backbone in a single forward (no lm_head, no gradients). `length_normalized` divides each side's
    sum of hidden states by its number of response tokens.
    """
    _validate(chosen_ids, chosen_attention, chosen_response_mask, "chosen")
    _validate(rejected_ids, rejected_attention, rejected_response_mask, "rejected")
    b = chosen_ids.shape[0]
    if rejected_ids.shape[0] != b:
        raise PreflensError(f"chosen has {b} rows but rejected has {rejected_ids.shape[0]}; one row per pair")
    width = max(chosen_ids.shape[1], rejected_ids.shape[1])
    ids = torch.cat([_pad_right(chosen_ids, width, 0), _pad_right(rejected_ids, width, 0)])
    att = torch.cat([_pad_right(chosen_attention, width, 0), _pad_right(rejected_attention, width, 0)])
    rm = torch.cat(
        [
            _pad_right(chosen_response_mask.long(), width, 0),
            _pad_right(rejected_response_mask.long(), width, 0),
        ]
    ).bool()
    sums, counts = response_hidden_sums(model, ids, att, rm)
    return ches_from_sums(sums[:b], sums[b:], counts[:b], counts[b:], length_normalized)
