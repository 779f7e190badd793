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


# -- WPO's per-token log sum_v pi(v)^2 (TRL's use_weighting) -------------------------------------------


def _reference_log_sum_sq(model, ids, attn, resp):
    """log sum_v pi(v)^2 from the model's own full logits: logsumexp(2 log_softmax(z)), left-aligned."""
    logits = model(input_ids=ids, attention_mask=attn).logits.double()
    lss = torch.logsumexp(2.0 * torch.log_softmax(logits[:, :-1], -1), -1)  # [N, T-1], predicts t+1
    out = []
    for s in range(ids.shape[0]):
        pos = resp[s].nonzero().squeeze(-1)
        out.append(lss[s, pos - 1])
    return out


@pytest.mark.parametrize("path", ["fused", "checkpointed", "no_grad", "model_logits"])
@pytest.mark.parametrize("chunk_rows", [5, 10**6])
def test_log_sum_sq_matches_the_full_logits(path, chunk_rows, monkeypatch):
    """Every head path (the fused autograd Function, the checkpointed chunks a hooked head falls back to,
    the no-grad chunks of eval/reference passes, the model's own logits for heads that cannot be split)
    gives log sum_v pi(v)^2 per response token equal to the full-logits reference, chunked or not."""
    import preflens.logprobs as lp_mod

    model = _model(seed=5)
    ids, attn, resp = _batch(6)
    calls = []
    real_apply = lp_mod._FusedLinearLogps.apply
    monkeypatch.setattr(lp_mod._FusedLinearLogps, "apply", lambda *a: calls.append(1) or real_apply(*a))
    if path == "checkpointed":
        monkeypatch.setattr(lp_mod, "_can_fuse", lambda head: False)
    if path == "model_logits":
        monkeypatch.setattr(lp_mod, "split_backbone_and_head", lambda m: None)
    with torch.set_grad_enabled(path != "no_grad"):
        out = sequence_logps(model, ids, attn, resp, return_log_sum_sq=True, chunk_rows=chunk_rows)
    assert bool(calls) == (path == "fused")
    assert out.token_log_sum_sq is not None and not out.token_log_sum_sq.requires_grad  # detached, as TRL
    want = _reference_log_sum_sq(model, ids, attn, resp)
    for s, w in enumerate(want):
        got = out.token_log_sum_sq[s].double()
        torch.testing.assert_close(got[: len(w)], w, atol=1e-6, rtol=1e-6)
        assert (got[len(w) :] == 0).all()


def test_log_sum_sq_leaves_logps_and_their_gradient_unchanged():
    """Asking for log sum p^2 adds an output; the log-probs and the parameter gradients are the ones
    without it (the fused backward ignores the non-differentiable second output)."""
    model = _model(seed=7)
    ids, attn, resp = _batch(8)
    w = torch.randn(ids.shape[0])
    grads = []
    for flag in (False, True):
        model.zero_grad()
        out = sequence_logps(model, ids, attn, resp, chunk_rows=5, return_log_sum_sq=flag)
        (out.logps * w).sum().backward()
        grads.append((out.logps.detach(), [p.grad.clone() for p in model.parameters()]))
        assert (out.token_log_sum_sq is not None) == flag
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=0, rtol=0)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    p = pair_logps_from_batch(out)
    b = ids.shape[0] // 2
    torch.testing.assert_close(p.chosen_log_sum_sq, out.token_log_sum_sq[:b])
    torch.testing.assert_close(p.rejected_log_sum_sq, out.token_log_sum_sq[b:])
