"""`preflens ches`: scores equal ches_score, --drop-top, resume, and 2 processes == 1 process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from preflens.data.collate import collate_pairs, tokenize_pairs
from preflens.data.formats import load_pairs
from preflens.data.synthetic import SYNTHETIC_VOCAB, sentiment_pairs
from preflens.diagnostics import ches_scan as ches_cmd
from preflens.diagnostics.ches import ches_score
from preflens.diagnostics.ches_scan import edit_similarity, run_ches
from preflens.errors import PreflensError, RunDirError

SPECIAL = ["<pad>", "<unk>", "<s>", "<|im_end|>"]


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIAL + sorted(set(SYNTHETIC_VOCAB) - set(SPECIAL)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(SPECIAL)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama + tokenizer saved as a model directory, and 40 synthetic pairs as jsonl."""
    root = tmp_path_factory.mktemp("ches")
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = sentiment_pairs(40, seed=1, shared_tokens=2, response_length=6)
    # vary the response lengths so padding and length normalization matter
    for i, r in enumerate(rows):
        words = r["rejected"].split()
        r["rejected"] = " " + " ".join(words[: 2 + i % 5])
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model, tok, data


def _reference(model, tok, data: Path, normalized: bool) -> dict[int, float]:
    """ches_score one pair at a time (no batching, no concatenation), chosen and rejected apart."""
    pairs, _ = load_pairs(data)
    items, _ = tokenize_pairs(pairs, tok)
    out = {}
    for it in items:
        batch = collate_pairs([it], tok.pad_token_id)
        ids, att, rm = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        nc = len(it.prompt_ids) + len(it.chosen_ids)
        nr = len(it.prompt_ids) + len(it.rejected_ids)
        s = ches_score(
            model,
            ids[:1, :nc],
            att[:1, :nc],
            rm[:1, :nc],
            ids[1:, :nr],
            att[1:, :nr],
            rm[1:, :nr],
            normalized,
        )
        out[it.pair_id] = float(s[0])
    return out


def _levenshtein(a: list, b: list) -> int:
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[-1][-1]


def test_edit_similarity_is_normalized_levenshtein():
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        a = torch.randint(0, 4, (int(torch.randint(0, 9, (1,), generator=g)),), generator=g).tolist()
        b = torch.randint(0, 4, (int(torch.randint(0, 9, (1,), generator=g)),), generator=g).tolist()
        want = 1.0 if not a and not b else 1 - _levenshtein(a, b) / max(len(a), len(b))
        assert edit_similarity(a, b) == pytest.approx(want)


@pytest.mark.parametrize("normalized", [False, True])
def test_cli_scores_equal_function(setup, tmp_path, normalized):
    root, model, tok, data = setup
    out = tmp_path / "scores.parquet"
    summary = run_ches(
        model=str(root / "model"),
        data=data,
        output=out,
        length_normalized=normalized,
        batch_size=3,
        chunk_size=7,
        progress=False,
        _model_obj=(model, tok),
    )
    df = pd.read_parquet(out)
    assert summary["scored"] == 40 and list(df["pair_index"]) == list(range(40))
    ref = _reference(model, tok, data, normalized)
    got = dict(zip(df["pair_index"], df["score"]))
    for pid, want in ref.items():
        assert got[pid] == pytest.approx(want, rel=1e-4, abs=1e-4)
    # percentile = share of scores <= this one (all distinct here), in percent
    ranks = df["score"].rank().to_numpy()
    assert df["percentile"].to_numpy() == pytest.approx(ranks / 40 * 100)
    # response lengths and edit similarity from the tokenized responses (EOS included)
    items = {it.pair_id: it for it in tokenize_pairs(load_pairs(data)[0], tok)[0]}
    for _, row in df.iterrows():
        it = items[int(row["pair_index"])]
        assert row["chosen_len"] == len(it.chosen_ids) and row["rejected_len"] == len(it.rejected_ids)
        sim = 1 - _levenshtein(it.chosen_ids, it.rejected_ids) / max(len(it.chosen_ids), len(it.rejected_ids))
        assert row["edit_similarity"] == pytest.approx(sim)
    assert not (tmp_path / "scores.parquet.parts").exists()


def test_drop_top_removes_exactly_the_top_decile(setup, tmp_path):
    root, model, tok, data = setup
    out, kept = tmp_path / "s.parquet", tmp_path / "kept.jsonl"
    run_ches(
        model="m",
        data=data,
        output=out,
        drop_top=0.1,
        filtered_output=kept,
        progress=False,
        _model_obj=(model, tok),
    )
    df = pd.read_parquet(out)
    top4 = set(df.nlargest(4, "score")["pair_index"])
    assert set(df.loc[df["dropped"], "pair_index"]) == top4
    src = data.read_text().splitlines()
    got = kept.read_text().splitlines()
    assert len(got) == 36
    assert [json.loads(x) for x in got] == [json.loads(x) for i, x in enumerate(src) if i not in top4]


def test_resume_after_interruption_and_overwrite_rules(setup, tmp_path, monkeypatch):
    root, model, tok, data = setup
    out = tmp_path / "s.parquet"
    kw = dict(
        model="m", data=data, output=out, chunk_size=10, batch_size=4, progress=False, _model_obj=(model, tok)
    )
    real = ches_cmd._score_chunk
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ches_cmd, "_score_chunk", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_ches(**kw)
    parts = tmp_path / "s.parquet.parts"
    assert len(list(parts.glob("chunk-*.parquet"))) == 2 and not out.exists()

    calls.clear()
    summary = run_ches(**kw)
    assert len(calls) == 2 and summary["resumed_chunks"] == 2  # only the two missing chunks
    resumed = pd.read_parquet(out)

    with pytest.raises(RunDirError, match="--overwrite"):
        run_ches(**kw)
    monkeypatch.setattr(ches_cmd, "_score_chunk", real)
    run_ches(**kw, overwrite=True)
    pd.testing.assert_frame_equal(resumed, pd.read_parquet(out))

    # a partial run made with other settings is not silently mixed in
    out.unlink()
    parts.mkdir()
    (parts / "meta.json").write_text(json.dumps({"schema": 1, "max_length": 3}))
    with pytest.raises(RunDirError, match="other settings"):
        run_ches(**kw)


def test_drop_top_needs_filtered_output(setup, tmp_path):
    root, model, tok, data = setup
    with pytest.raises(PreflensError, match="--filtered-output"):
        run_ches(model="m", data=data, output=tmp_path / "x.parquet", drop_top=0.1, _model_obj=(model, tok))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiproc
def test_two_processes_equal_one(setup, tmp_path):
    """torchrun --nproc_per_node 2 (gloo on CPU, an Accelerator() inside) gives the 1-process output."""
    root, model, tok, data = setup
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = [
        "ches",
        "--model",
        str(root / "model"),
        "--data",
        str(data),
        "--chunk-size",
        "6",
        "--batch-size",
        "4",
    ]
    common += ["--drop-top", "0.1"]
    one = subprocess.run(
        [sys.executable, "-m", "preflens.cli", *common, "-o", str(tmp_path / "one.parquet"),
         "--filtered-output", str(tmp_path / "one.jsonl")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    two = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "preflens.cli", *common,
         "-o", str(tmp_path / "two.parquet"), "--filtered-output", str(tmp_path / "two.jsonl")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = pd.read_parquet(tmp_path / "one.parquet"), pd.read_parquet(tmp_path / "two.parquet")
    assert len(a) == 40
    pd.testing.assert_frame_equal(a, b)
    assert (tmp_path / "one.jsonl").read_text() == (tmp_path / "two.jsonl").read_text()
