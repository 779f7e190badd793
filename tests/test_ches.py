"""ches_score against Razin et al.'s (arXiv 2410.08847) formula written out from `output_hidden_states`."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from preflens.diagnostics.ches import ches_score, get_decoder
from preflens.errors import PreflensError


def _tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


def _rows(gen: torch.Generator, specs: list[tuple[int, int]], width: int):
    """Right-padded rows of (prompt_len, response_len); pad id 0, response mask on the response."""
    ids = torch.zeros(len(specs), width, dtype=torch.long)
    att = torch.zeros_like(ids)
    rm = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(specs):
        ids[i, : p + r] = torch.randint(1, 128, (p + r,), generator=gen)
        att[i, : p + r] = 1
        rm[i, p : p + r] = True
    return ids, att, rm


def _reference(model, ids, att, rm, normalized: bool) -> list[torch.Tensor]:
    """Per row: the sum (or mean) of hidden_states[-1][t-1] over response tokens t, one row at a time
    and without padding, so padding and batching cannot leak into the reference."""
    out = []
    for i in range(ids.shape[0]):
        n = int(att[i].sum())
        with torch.no_grad():
            h = model(input_ids=ids[i : i + 1, :n], output_hidden_states=True).hidden_states[-1][0]
        vecs = [h[t - 1] for t in range(n) if rm[i, t]]
        s = torch.stack(vecs).sum(0)
        out.append(s / len(vecs) if normalized else s)
    return out


def test_last_hidden_state_entry_is_after_final_norm():
    """The premise of the reference: in HF Llama hidden_states[-1] is the output of model.norm."""
    model = _tiny()
    captured = {}
    handle = model.model.norm.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    ids = torch.randint(1, 128, (2, 7))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    handle.remove()
    assert torch.equal(out.hidden_states[-1], captured["h"])
    # and it is not the pre-norm residual stream of the last layer
    assert not torch.allclose(out.hidden_states[-1], out.hidden_states[-2])


@pytest.mark.parametrize("normalized", [False, True])
def test_ches_matches_formula_with_padding_and_varying_lengths(normalized: bool):
    model = _tiny()
    gen = torch.Generator().manual_seed(1)
    chosen_specs = [(3, 4), (5, 1), (2, 7), (4, 3)]
    rejected_specs = [(3, 6), (5, 5), (2, 2), (4, 9)]  # the same prompt lengths, other responses
    cid, catt, crm = _rows(gen, chosen_specs, width=10)
    rid, ratt, rrm = _rows(gen, rejected_specs, width=14)  # a different width from chosen
    rid[:, :2] = cid[:, :2]
    got = ches_score(model, cid, catt, crm, rid, ratt, rrm, length_normalized=normalized)

    sw = _reference(model, cid, catt, crm, normalized)
    sl = _reference(model, rid, ratt, rrm, normalized)
    want = torch.stack([torch.dot(a, b) - torch.dot(a, a) for a, b in zip(sw, sl)])
    assert got.shape == (4,)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_normalized_and_raw_differ_and_identical_responses_score_zero():
    model = _tiny()
    gen = torch.Generator().manual_seed(2)
    cid, catt, crm = _rows(gen, [(3, 4), (2, 5)], width=8)
    # rejected == chosen: <s, s> - |s|^2 = 0 for both forms
    for norm in (False, True):
        got = ches_score(model, cid, catt, crm, cid, catt, crm, length_normalized=norm)
        torch.testing.assert_close(got, torch.zeros(2), atol=1e-3, rtol=0)


def test_ches_runs_backbone_only_without_grad():
    model = _tiny()
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    gen = torch.Generator().manual_seed(3)
    cid, catt, crm = _rows(gen, [(3, 4)], width=7)
    got = ches_score(model, cid, catt, crm, cid, catt, crm)
    assert not calls
    assert not got.requires_grad
    assert get_decoder(model) is model.model


def test_peft_model_uses_lora_backbone():
    peft = pytest.importorskip("peft")
    model = _tiny()
    lora = peft.get_peft_model(
        model,
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    ).eval()
    gen = torch.Generator().manual_seed(4)
    cid, catt, crm = _rows(gen, [(3, 4), (2, 3)], width=7)
    rid, ratt, rrm = _rows(gen, [(3, 2), (2, 5)], width=7)
    got = ches_score(lora, cid, catt, crm, rid, ratt, rrm)
    sw = _reference(lora, cid, catt, crm, False)
    sl = _reference(lora, rid, ratt, rrm, False)
    want = torch.stack([torch.dot(a, b) - torch.dot(a, a) for a, b in zip(sw, sl)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_empty_response_is_a_user_error():
    model = _tiny()
    ids = torch.randint(1, 128, (1, 5))
    att = torch.ones_like(ids)
    rm = torch.zeros_like(ids, dtype=torch.bool)
    with pytest.raises(PreflensError, match="no tokens"):
        ches_score(model, ids, att, rm, ids, att, rm)
