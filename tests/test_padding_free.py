"""Padding-free (packed) log-probs: exact against each sequence scored alone, guarded where not exact.

The reference is independent of `sequence_logps`: every sequence alone, unpadded, through the model's
own forward and a full log_softmax.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from preflens.errors import PreflensError
from preflens.logprobs import check_padding_free, sequence_logps
from preflens.models import tiny_model


def ragged_batch(vocab: int, seed: int = 0):
    """4 right-padded sequences of lengths 12, 7, 9, 5; responses start at 3, 2, 4, 1."""
    g = torch.Generator().manual_seed(seed)
    lengths, starts = [12, 7, 9, 5], [3, 2, 4, 1]
    t = max(lengths)
    ids = torch.randint(3, vocab, (4, t), generator=g)
    pos = torch.arange(t)[None]
    am = (pos < torch.tensor(lengths)[:, None]).long()
    rm = (pos >= torch.tensor(starts)[:, None]) & am.bool()
    ids[~am.bool()] = 0
    return ids, am, rm, lengths, starts


def alone(model, ids, lengths, starts):
    """Summed response log-probs, each sequence on its own (no padding, no packing)."""
    out = []
    for s, (n, a) in enumerate(zip(lengths, starts)):
        x = ids[s : s + 1, :n]
        lp = F.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
        out.append(lp.gather(-1, x[0, 1:, None])[:, 0][a - 1 :].sum())
    return torch.stack(out)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("tied", [False, True])
def test_packed_logps_and_gradients_match_each_sequence_alone(attn, tied):
    model, tok = tiny_model(num_layers=2, tie_word_embeddings=tied, seed=1)
    model.config._attn_implementation = attn
    ids, am, rm, lengths, starts = ragged_batch(len(tok))

    ref = alone(model, ids, lengths, starts)
    ref_grads = torch.autograd.grad(ref.sum(), list(model.parameters()))
    got = sequence_logps(model, ids, am, rm, padding_free=True, return_tokens=True)
    grads = torch.autograd.grad(got.logps.sum(), list(model.parameters()))

    assert torch.allclose(got.logps, ref, atol=1e-5, rtol=0)
    assert got.lengths.tolist() == [n - a for n, a in zip(lengths, starts)]
    assert torch.allclose(got.token_logps.sum(1), ref, atol=1e-5, rtol=0)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-5, rtol=1e-4), name


def test_packed_hidden_states_and_token_layout_match_padded():
    model, tok = tiny_model(num_layers=2, seed=2)
    ids, am, rm, *_ = ragged_batch(len(tok), seed=3)
    with torch.no_grad():
        a = sequence_logps(model, ids, am, rm, return_tokens=True, return_hidden=True)
        b = sequence_logps(model, ids, am, rm, return_tokens=True, return_hidden=True, padding_free=True)
    assert torch.equal(a.token_mask, b.token_mask) and torch.equal(a.token_ids, b.token_ids)
    assert torch.allclose(a.token_logps, b.token_logps, atol=1e-5)
    assert torch.allclose(a.hidden, b.hidden, atol=1e-5)


def test_left_padding_is_refused_with_the_sequence_named():
    model, tok = tiny_model(num_layers=1)
    ids, am, rm, *_ = ragged_batch(len(tok))
    am2, rm2 = am.clone(), rm.clone()
    am2[1] = am[1].flip(0)  # sequence 1 left-padded
    rm2[1] = am2[1].bool() & (torch.arange(am.shape[1]) >= am.shape[1] - 3)
    with pytest.raises(PreflensError, match="sequence 1: padding_free needs right padding"):
        sequence_logps(model, ids, am2, rm2, padding_free=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_check_passes_on_an_exact_model(dtype):
    model, tok = tiny_model(num_layers=2)
    ids, am, rm, *_ = ragged_batch(len(tok))
    diffs = check_padding_free(model.to(dtype), ids, am, rm)
    assert diffs["isolation"] == 0.0
    assert diffs["max_abs"] < (1e-4 if dtype == torch.float32 else 0.1)


def test_check_refuses_a_model_whose_attention_leaks_across_packed_sequences(monkeypatch):
    """What an old transformers (no packed-sequence masks) does: one causal mask over the packed row."""
    import transformers.masking_utils as mu

    model, tok = tiny_model(num_layers=2)
    ids, am, rm, *_ = ragged_batch(len(tok))
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    leaked = sequence_logps(model, ids, am, rm, padding_free=True).logps
    exact = sequence_logps(model, ids, am, rm).logps
    assert not torch.allclose(leaked[1:], exact[1:], atol=1e-4)  # the failure is real...
    with pytest.raises(PreflensError, match="padding_free is not exact for this model.*moved the others"):
        check_padding_free(model, ids, am, rm)  # ...and caught


def _pairs_file(path, n=16):
    from preflens.data.synthetic import sentiment_pairs

    # ragged responses, so batches carry padding that packing removes
    rows = [r for i in range(n) for r in sentiment_pairs(1, seed=i, response_length=2 + i % 5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_training_packed_gives_the_same_parameters_and_metrics(tmp_path):
    from preflens.train import TrainConfig, Trainer

    data = _pairs_file(tmp_path / "pairs.jsonl")
    runs = {}
    for pf in (False, True):
        model, tok = tiny_model(num_layers=2, seed=0)
        cfg = TrainConfig(
            data=str(data),
            output_dir=str(tmp_path / f"run-{pf}"),
            steps=4,
            batch_size=4,
            lr=1e-3,
            eval_every=2,
            save_every=0,
            report_to="none",
            progress=False,
            eval_fraction=0.25,
            padding_free=pf,
        )
        said: list[str] = []
        Trainer(cfg, model=model, tokenizer=tok, log_fn=said.append).train()
        runs[pf] = (dict(model.named_parameters()), tmp_path / f"run-{pf}", said)
    (pa, ra, _), (pb, rb, said) = runs[False], runs[True]
    assert any("padding-free: packed log-probs match" in s for s in said)
    for name, p in pb.items():
        assert torch.allclose(p, pa[name], atol=1e-5, rtol=0), name
    ma = [json.loads(x) for x in (ra / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (rb / "metrics.jsonl").read_text().splitlines()]
    assert len(ma) == len(mb) > 0
    for x, y in zip(ma, mb):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)


def test_padding_free_with_step_entanglement_is_a_config_error(tmp_path):
    from preflens.train import TrainConfig

    cfg = TrainConfig(
        data="x.jsonl", output_dir=str(tmp_path / "r"), padding_free=True, step_entanglement=True
    )
    with pytest.raises(PreflensError, match="cannot be combined with --padding-free"):
        cfg.validate()


def test_attention_kernel_is_switchable_and_bad_choices_are_one_line_errors(tmp_path):
    from preflens.models import load_model, set_attention

    model, tok = tiny_model(num_layers=1)
    set_attention(model, "eager")
    assert model.config._attn_implementation == "eager"
    with pytest.raises(PreflensError, match="attn_implementation 'nope' cannot be used: Specified"):
        set_attention(model, "nope")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m", attn_implementation="eager")
    assert loaded.config._attn_implementation == "eager"
    try:
        import flash_attn  # noqa: F401
    except ImportError:  # the usual CPU machine: the error says what is missing
        with pytest.raises(PreflensError, match="flash_attention_2' cannot be used: .*FlashAttention2"):
            set_attention(model, "flash_attention_2")


def test_trainer_applies_the_attention_kernel(tmp_path):
    from preflens.train import TrainConfig, Trainer

    model, tok = tiny_model(num_layers=1)
    cfg = TrainConfig(
        data=str(_pairs_file(tmp_path / "p.jsonl", n=8)),
        output_dir=str(tmp_path / "run"),
        steps=1,
        batch_size=4,
        eval_fraction=0.0,
        report_to="none",
        progress=False,
        attn_implementation="eager",
        padding_free=True,
    )
    Trainer(cfg, model=model, tokenizer=tok, log_fn=lambda m: None).train()
    assert model.config._attn_implementation == "eager"


@pytest.mark.slow
def test_packing_is_exact_on_the_embedded_model():
    """SmolLM2 with its trained weights and RoPE: a leak across packed sequences would show at once."""
    from preflens.data.collate import collate_pairs, tokenize_pairs
    from preflens.data.formats import load_pairs
    from preflens.data.synthetic import demo_pairs_path
    from preflens.models import load_model

    model, tok = load_model(None)
    pairs, _ = load_pairs(demo_pairs_path(), limit=4)
    items, _ = tokenize_pairs(pairs, tok)
    batch = collate_pairs(items, tok.pad_token_id)
    ids, am, rm = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    assert (am == 0).any()  # ragged: the padded layout really pads
    diffs = check_padding_free(model, ids, am, rm)
    assert diffs["isolation"] == 0.0 and diffs["max_abs"] < 1e-3
    lengths = am.sum(1).tolist()
    starts = [int(r.nonzero()[0]) for r in rm]
    with torch.no_grad():
        ref = alone(model, ids, lengths, starts)
        got = sequence_logps(model, ids, am, rm, padding_free=True).logps
    assert torch.allclose(got, ref, atol=1e-3, rtol=0)
