"""`sequence_logps` against the plain reference: the model's full logits, log_softmax, gather, sum."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from preflens.errors import PreflensError
from preflens.logprobs import pair_logps_from_batch, sequence_logps


def _model(tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    n, t = 6, 14
    ids = torch.randint(3, 97, (n, t), generator=g)
    lens = torch.tensor([14, 9, 12, 5, 14, 7])
    prompt = torch.tensor([4, 3, 6, 2, 1, 5])
    attn = (torch.arange(t)[None] < lens[:, None]).long()
    resp = (torch.arange(t)[None] >= prompt[:, None]) & attn.bool()
    ids = ids * attn  # pad id 0 on the right
    return ids, attn, resp


def _reference(model, ids, attn, resp):
    logits = model(input_ids=ids, attention_mask=attn).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    m = resp[:, 1:].double()
    return (logp * m).sum(1), logp, m


@pytest.mark.parametrize("tie", [False, True])
def test_summed_and_token_logps_match_full_forward(tie):
    model = _model(tie)
    ids, attn, resp = _batch()
    out = sequence_logps(model, ids, attn, resp, return_tokens=True, return_hidden=True, chunk_rows=7)
    want, logp, m = _reference(model, ids, attn, resp)
    torch.testing.assert_close(out.logps.double(), want, atol=1e-5, rtol=1e-5)
    assert out.lengths.tolist() == resp.sum(1).tolist()
    # left-aligned per-token layout
    for s in range(ids.shape[0]):
        pos = resp[s].nonzero().squeeze(-1)
        torch.testing.assert_close(
            out.token_logps[s, : len(pos)].double(), logp[s, pos - 1], atol=1e-5, rtol=1e-5
        )
        assert out.token_mask[s, : len(pos)].all() and not out.token_mask[s, len(pos) :].any()
        assert out.token_ids[s, : len(pos)].tolist() == ids[s, pos].tolist()
    # hidden: the last hidden state (after the final norm) at the predicting position
    hs = model(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states[-1]
    s = 2
    pos = resp[s].nonzero().squeeze(-1)
    torch.testing.assert_close(out.hidden[s, : len(pos)], hs[s, pos - 1], atol=1e-5, rtol=1e-5)


def test_gradients_match_full_forward():
    model = _model()
    ids, attn, resp = _batch(3)
    w = torch.randn(ids.shape[0], dtype=torch.float64)
    model.zero_grad()
    (sequence_logps(model, ids, attn, resp, chunk_rows=5).logps.double() * w).sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want, _, _ = _reference(model, ids, attn, resp)
    (want * w).sum().backward()
    for (name, p), g in zip(model.named_parameters(), got):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_pair_split_and_errors():
    model = _model()
    ids, attn, resp = _batch()
    out = sequence_logps(model, ids, attn, resp)
    p = pair_logps_from_batch(out, ref=(torch.zeros(3), torch.ones(3)))
    torch.testing.assert_close(p.chosen, out.logps[:3])
    torch.testing.assert_close(p.rejected, out.logps[3:])
    assert p.rejected_len.tolist() == out.lengths[3:].tolist()
    bad = resp.clone()
    bad[0, 0] = True
    with pytest.raises(PreflensError, match="position 0"):
        sequence_logps(model, ids, attn, bad)
    bad = resp.clone()
    bad[3, 13] = True  # row 3 has 5 real tokens
    with pytest.raises(PreflensError, match="sequence 3: response_mask marks a padding"):
        sequence_logps(model, ids, attn, bad)


def test_fused_head_under_autocast_matches_the_autocast_module_path(monkeypatch):
    """`--mixed-precision bf16`: the fused log-softmax head now runs under autocast too. Its log-probs and
    gradients match the path that calls the lm_head module under autocast (each chunk recomputed by
    autograd), within bf16's precision; before, autocast switched the fused head off."""
    import preflens.logprobs as lp_mod

    model = _model(seed=3)
    ids, attn, resp = _batch(4)
    calls = []
    real_apply = lp_mod._FusedLinearLogps.apply
    monkeypatch.setattr(lp_mod._FusedLinearLogps, "apply", lambda *a: calls.append(1) or real_apply(*a))

    def run(fused: bool):
        monkeypatch.setattr(lp_mod, "_can_fuse", lambda head: fused and type(head) is torch.nn.Linear)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sequence_logps(model, ids, attn, resp, chunk_rows=5)
        out.logps.sum().backward()
        return out.logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want, want_g = run(fused=False)
    assert not calls
    got, got_g = run(fused=True)
    assert calls  # the fused path really ran under autocast
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.01)
    for name, g in got_g.items():
        ref = want_g[name]
        rel = float((g - ref).norm() / ref.norm().clamp_min(1e-12))
        assert rel < 0.03, (name, rel)
