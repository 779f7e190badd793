"""The TRL callback on a tiny Llama: a few DPOTrainer steps, then `preflens report` on its output."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

pytest.importorskip("trl")

WORDS = "good bad great awful fine poor happy sad nice mean kind rude yes no the a is was very not".split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    return LlamaForCausalLM(cfg)


def _dataset(n: int = 12):
    from datasets import Dataset

    rows = []
    for i in range(n):
        w = WORDS[i % 6]
        rows.append({"prompt": f"the {w} is", "chosen": " very good", "rejected": " very bad"})
    return Dataset.from_list(rows)


def _gram_loop(model, ids, att, resp):
    """Independent reference: full logits, log_softmax, explicit per-sequence backward."""
    params = [p for p in model.parameters() if p.requires_grad]
    gs = []
    for s in range(ids.shape[0]):
        logits = model(input_ids=ids[s : s + 1], attention_mask=att[s : s + 1]).logits[0]
        lp = torch.log_softmax(logits[:-1].float(), -1).gather(-1, ids[s, 1:, None])[:, 0]
        tot = (lp * resp[s, 1:].float()).sum()
        gs.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(tot, params)]))
    G = torch.stack(gs)
    return G @ G.T


def test_callback_writes_a_run_dir_that_report_reads(tmp_path):
    from trl import DPOConfig, DPOTrainer

    from preflens.integrations.trl import PreflensCallback
    from preflens.report import generate_report

    tok = _tokenizer()
    model = _model(len(tok))
    args = DPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        beta=0.1,
        dataloader_num_workers=0,
        max_length=32,
        bf16=False,
    )
    import copy

    trainer = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=_dataset(),
        eval_dataset=_dataset(6),
        processing_class=tok,
    )
    cb = PreflensCallback(trainer, probe_pairs=4, probe_every=2)
    trainer.add_callback(cb)
    trainer.train()
    out = tmp_path / "out"

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    probes = [r for r in rows if r["split"] == "probe"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all("logps/chosen" in r and "lr" in r for r in train)  # TRL's keys, learning_rate -> lr
    assert [r["step"] for r in probes] == [0, 2, 4]

    pairs = pd.read_parquet(out / "pairs.parquet")
    assert set(pairs["split"]) == {"eval"} and sorted(pairs["step"].unique()) == [0, 2, 4]
    # step 0 == reference (the reference is a copy of the initial policy)
    p0 = pairs[pairs["step"] == 0]
    assert (p0["chosen"] - p0["ref_chosen"]).abs().max() < 1e-5

    # per-pair stats at step 4 against an explicit per-sequence autograd loop on the final model
    pr = pd.read_parquet(out / "probes.parquet")
    last = pr[pr["step"] == 4].sort_values("pair_id")
    ids, att, resp = cb.batch["input_ids"], cb.batch["attention_mask"], cb.batch["response_mask"]
    model.eval()
    G = _gram_loop(model, ids, att, resp).double()
    b = 4
    ref_inner = torch.stack([G[i, i + b] for i in range(b)])
    ref_cos = ref_inner / torch.stack([(G[i, i] * G[i + b, i + b]).sqrt() for i in range(b)])
    torch.testing.assert_close(torch.tensor(last["inner"].to_numpy()), ref_inner, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(torch.tensor(last["cosine"].to_numpy()), ref_cos, rtol=1e-3, atol=1e-4)
    # condition 1 written out: d_w |g_w|^2 - d_l <g_w,g_l> < 0 means chosen predicted to fall
    c1 = (last["d_w"] * last["norm_w"] ** 2 - last["d_l"] * last["inner"]) < 0
    assert (c1.to_numpy() == last["cond1_violated"].to_numpy()).all()
    # observed change since the previous probe, matched with the pairs table
    pairs_w = pairs.pivot(index="pair_id", columns="step", values="chosen")
    torch.testing.assert_close(
        torch.tensor(last["obs_delta_chosen"].to_numpy()),
        torch.tensor((pairs_w[4] - pairs_w[2]).to_numpy()),
        rtol=1e-5,
        atol=1e-5,
    )
    assert pr[pr["step"] == 0]["obs_delta_chosen"].isna().all()

    html, findings = generate_report(out)
    page = html.read_text()
    assert "Skipped: no probe rows" not in page and page.count("<img") >= 5
    assert any(f.kind == "entanglement" for f in findings)


def _lora_trainer(out, max_steps: int):
    """A DPOTrainer training fresh LoRA adapters (TRL's reference: the adapters switched off), probing
    every 2 steps, evaluating and checkpointing every 2 steps."""
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from preflens.integrations.trl import PreflensCallback

    tok = _tokenizer()
    args = DPOConfig(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=5e-2,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        use_cpu=True,
        beta=0.1,
        dataloader_num_workers=0,
        max_length=32,
        bf16=False,
        seed=0,
    )
    trainer = DPOTrainer(
        model=_model(len(tok)),
        args=args,
        train_dataset=_dataset(),
        eval_dataset=_dataset(6),
        processing_class=tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    trainer.add_callback(PreflensCallback(trainer, probe_pairs=4, probe_every=2))
    return trainer


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_rerun_into_the_same_output_dir_starts_fresh_and_resume_continues(tmp_path):
    """TRL reuses output_dir: a second run must not append to the first one's metrics (the report would
    show every step twice); `train(resume_from_checkpoint=True)` continues the files, keeps the reference
    of step 0 (not the resumed, trained policy) and the observed change since the last probe."""
    out = tmp_path / "out"
    _lora_trainer(out, 4).train()
    fresh = pd.read_parquet(out / "pairs.parquet").query("step == 0").set_index("pair_id")
    # fresh adapters: the policy at step 0 is TRL's reference (the base model, adapters off)
    assert (fresh["chosen"] - fresh["ref_chosen"]).abs().max() < 1e-5
    base = fresh["chosen"]
    again = _lora_trainer(out, 4)  # the same command again
    again.train()
    again.train()  # and train() twice on one trainer (the callback keeps its object state)
    rows = _rows(out)
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["split"] == "probe"] == [0, 2, 4]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [2, 4]
    # TRL's eval logs carry `epoch`: it belongs to the eval row, not to a train row of its own
    assert all("loss" in r for r in rows if r["split"] == "train")
    assert len(pd.read_parquet(out / "pairs.parquet")) == 3 * 4

    _lora_trainer(out, 6).train(resume_from_checkpoint=True)
    rows = _rows(out)
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["split"] == "probe"] == [0, 2, 4, 6]
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert sorted(pairs["step"]) == sorted([0, 2, 4, 6] * 4)
    ref = pairs.pivot(index="pair_id", columns="step", values="ref_chosen")
    assert (ref[6] - base).abs().max() < 1e-5  # still the base model's log-probs, as TRL's reference
    moved = pairs.pivot(index="pair_id", columns="step", values="chosen")[4] - base
    assert moved.abs().max() > 1e-3  # so the check above can tell the reference from the resumed policy
    pr = pd.read_parquet(out / "probes.parquet")
    chosen = pairs.pivot(index="pair_id", columns="step", values="chosen")
    obs = pr[pr["step"] == 6].sort_values("pair_id")["obs_delta_chosen"].to_numpy()
    torch.testing.assert_close(
        torch.tensor(obs), torch.tensor((chosen[6] - chosen[4]).to_numpy()), rtol=1e-5, atol=1e-5
    )
