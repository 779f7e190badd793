"""`preflens displacement`: single prompt, multi-token warning, persona mode resets the model."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from preflens.diagnostics.displacement import run_displacement
from preflens.errors import DataError

WORDS = [
    "<pad>",
    "<unk>",
    "<s>",
    "</s>",
    "is",
    "this",
    "good",
    "yes",
    "no",
    "never",
    "sure",
    "maybe",
    "fine",
    "it",
]


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg).eval(), _tokenizer()


def test_single_prompt_reports_before_after(tiny):
    model, tok = tiny
    ids = tok("is this good")["input_ids"]
    with torch.no_grad():
        p0 = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
    res = run_displacement(
        model=None,
        prompt="is this good",
        chosen="yes",
        rejected="no",
        steps=4,
        lr=1e-3,
        _model_obj=(model, tok),
    )
    run = res["runs"][0]
    assert run["p_chosen_before"] == pytest.approx(float(p0[WORDS.index("yes")]), rel=1e-5)
    assert run["p_rejected_before"] == pytest.approx(float(p0[WORDS.index("no")]), rel=1e-5)
    assert run["warnings"] == []
    with torch.no_grad():
        p1 = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
    assert run["p_chosen_after"] == pytest.approx(float(p1[WORDS.index("yes")]), rel=1e-4)
    assert len(run["top_increase"]) == 10
    assert run["chosen_fell"] == (run["p_chosen_after"] < run["p_chosen_before"])


def test_multi_token_response_warns(tiny):
    model, tok = tiny
    res = run_displacement(
        model=None,
        prompt="is this good",
        chosen="yes sure",
        rejected="no",
        steps=1,
        lr=1e-4,
        _model_obj=(model, tok),
    )
    (w,) = res["runs"][0]["warnings"]
    assert "2 tokens" in w and "'yes'" in w


def test_persona_mode_restores_the_model_between_rows(tiny, tmp_path):
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = [
        {"prompt": "is this good", "chosen": "yes", "rejected": "no"},
        {"prompt": "is it fine", "chosen": "no", "rejected": "never"},
        {"prompt": "is this good", "chosen": "yes", "rejected": "no"},
    ]
    f = tmp_path / "persona.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_displacement(model=None, persona=f, steps=3, lr=1e-3, _model_obj=(model, tok))
    a, _, c = res["runs"]
    assert a["p_chosen_before"] == c["p_chosen_before"] and a["p_chosen_after"] == pytest.approx(
        c["p_chosen_after"]
    )
    assert res["frac_chosen_fell"] == pytest.approx(sum(r["chosen_fell"] for r in res["runs"]) / 3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_persona_file_errors_name_line_and_field(tiny, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "is it", "chosen": "yes", "rejected": "no"}\n{"prompt": "x", "chosen": ""}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'chosen'"):
        run_displacement(model=None, persona=f, _model_obj=tiny)


def test_cli_runs_on_a_saved_model(tiny, tmp_path):
    from preflens.cli import app

    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "r.json"
    args = ["displacement", "--model", str(tmp_path / "m"), "--prompt", "is this good", "--chosen", "yes"]
    args += ["--rejected", "no", "--steps", "2", "--lr", "1e-3", "--no-chat-template", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "pi(y+|x)" in result.output
    assert json.loads(out.read_text())["runs"][0]["chosen"] == "yes"
