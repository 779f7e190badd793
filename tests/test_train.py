"""The trainer on a tiny random Llama: learning, logged numbers vs independent references, exact resume,
NaN handling, run-directory safety, bad input, every loss path (token-level, normalized, reference-free)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from preflens.data.synthetic import sentiment_pairs
from preflens.errors import DataError, PreflensError, RunDirError, TrainingDivergedError
from preflens.losses import LOSSES
from preflens.train import TrainConfig, Trainer, TrainerCallback, resolve_loss_kwargs, train

pytestmark = pytest.mark.usefixtures("one_thread")

STEP_KEYS = {
    "loss",
    "logps/chosen",
    "logps/rejected",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "margin_weights/dw",
    "margin_weights/dl",
    "lr",
    "grad_norm",
    "epoch",
    "tokens",
}


def tiny():
    from preflens.models import tiny_model

    return tiny_model(hidden_size=32, seed=0)


def write_pairs(path, n=24, seed=0, response_length=4):
    rows = sentiment_pairs(n, seed=seed, response_length=response_length)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path, **kw):
    base = dict(
        data=str(write_pairs(tmp_path / "pairs.jsonl")),
        output_dir=str(tmp_path / "run"),
        steps=4,
        batch_size=4,
        lr=1e-3,
        eval_every=0,
        save_every=0,
        report_to="none",
        progress=False,
        eval_fraction=0.2,
    )
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def explicit_logps(model, tok, prompt, response):
    """Summed response log-prob from a full forward and log_softmax over all positions (no shortcut):
    the response is the tokens after the prompt's tokens, ending with EOS as TRL appends it."""
    p_ids = tok(prompt)["input_ids"]
    full = tok(prompt + response)["input_ids"] + [tok.eos_token_id]
    assert full[: len(p_ids)] == p_ids
    ids = torch.tensor([full])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    lp = F.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(lp[len(p_ids) - 1 :].sum())


# ------------------------------------------------------------------------------------------------
# learning and the logged numbers


def test_dpo_50_steps_raise_margin_and_accuracy(tmp_path):
    model, tok = tiny()
    cfg = config(tmp_path, steps=50, eval_every=25, lr=2e-3, beta=0.1, max_grad_norm=10.0)
    run = train(cfg, model=model, tokenizer=tok)
    rows = read_metrics(run)
    tr = [r for r in rows if r["split"] == "train"]
    ev = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in tr] == list(range(1, 51))
    assert [r["step"] for r in ev] == [0, 25, 50]
    for r in tr:
        assert STEP_KEYS <= set(r), STEP_KEYS - set(r)
    first = sum(r["rewards/margins"] for r in tr[:5]) / 5
    last = sum(r["rewards/margins"] for r in tr[-5:]) / 5
    assert last > first + 0.5, (first, last)
    assert sum(r["rewards/accuracies"] for r in tr[-5:]) / 5 > 0.9
    assert ev[0]["rewards/margins"] == 0.0 and ev[0]["rewards/accuracies"] == 0.0
    assert ev[-1]["rewards/margins"] > 0.3 and ev[-1]["rewards/accuracies"] >= 0.8
    assert tr[-1]["loss"] < math.log(2) - 0.1

    # pairs.parquet at the last eval vs an explicit full-forward computation with the final weights
    pairs = pd.read_parquet(run / "pairs.parquet")
    assert set(pairs.columns) >= {
        "step",
        "split",
        "pair_id",
        "chosen",
        "rejected",
        "ref_chosen",
        "ref_rejected",
    }
    assert sorted(pairs["step"].unique()) == [0, 25, 50] and set(pairs["split"]) == {"eval", "train"}
    rows_in = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    model.eval()
    final = pairs[(pairs["step"] == 50) & (pairs["split"] == "eval")]
    for rec in final.itertuples():
        src = rows_in[rec.pair_id]
        assert rec.chosen == pytest.approx(explicit_logps(model, tok, src["prompt"], src["chosen"]), abs=1e-4)
        assert rec.rejected == pytest.approx(
            explicit_logps(model, tok, src["prompt"], src["rejected"]), abs=1e-4
        )
    # eval metrics row from the per-pair table with the DPO formulas written out (beta = 0.1)
    beta = 0.1
    margin = beta * ((final.chosen - final.ref_chosen) - (final.rejected - final.ref_rejected))
    assert ev[-1]["rewards/margins"] == pytest.approx(margin.mean(), abs=1e-5)
    assert ev[-1]["loss"] == pytest.approx(
        (-F.logsigmoid(torch.tensor(margin.values))).mean().item(), abs=1e-5
    )
    # d_w = d_l = beta * sigmoid(-margin) for DPO (Yuan et al. 2024, arXiv 2410.13828, Sec. 3)
    dw = (beta * torch.sigmoid(-torch.tensor(margin.values))).mean().item()
    assert ev[-1]["margin_weights/dw"] == pytest.approx(dw, abs=1e-6)
    assert ev[-1]["margin_weights/dl"] == pytest.approx(dw, abs=1e-6)
    fell = (final.chosen < final.ref_chosen - 1e-4).mean()
    assert ev[-1]["frac_chosen_fell"] == pytest.approx(fell)
    # step-0 values are the reference (the model before its first update), for every pair
    start = pairs[pairs["step"] == 0]
    assert (start.chosen - start.ref_chosen).abs().max() < 1e-5


def test_train_row_matches_the_batch_it_trained_on(tmp_path):
    """The first train row's log-probs are the initial model's on the first batch of the seeded order."""
    model, tok = tiny()
    ref_model, _ = tiny()
    seen = {}

    class Grab(TrainerCallback):
        def on_step_end(self, trainer, state, batch_stats):
            seen.setdefault("ids", batch_stats["per_pair"]["pair_id"].long().tolist())

    run = train(config(tmp_path, steps=1, beta=0.5), model=model, tokenizer=tok, callbacks=[Grab()])
    row = read_metrics(run)[1]
    rows_in = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    ref_model.eval()
    ch = [explicit_logps(ref_model, tok, rows_in[i]["prompt"], rows_in[i]["chosen"]) for i in seen["ids"]]
    rj = [explicit_logps(ref_model, tok, rows_in[i]["prompt"], rows_in[i]["rejected"]) for i in seen["ids"]]
    assert len(seen["ids"]) == 4
    assert row["logps/chosen"] == pytest.approx(sum(ch) / 4, abs=1e-4)
    assert row["logps/rejected"] == pytest.approx(sum(rj) / 4, abs=1e-4)
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert row["margin_weights/dw"] == pytest.approx(0.5 * 0.5, abs=1e-6)  # beta * sigmoid(0)
    assert row["tokens"] > 0 and row["epoch"] == pytest.approx(1 / 4)  # 19 train pairs -> 4 batches of 4


# ------------------------------------------------------------------------------------------------
# resume


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, state, batch_stats):
        if state.step == self.step:
            state.should_stop = True


@pytest.mark.parametrize("lora", [False, True])
def test_resume_is_exact(tmp_path, lora):
    kw = dict(steps=10, save_every=5, grad_accum=2, scheduler="cosine", warmup_steps=2, lr=1e-3, eval_every=5)
    if lora:
        kw.update(lora_rank=4, lora_dropout=0.1)  # dropout: the RNG state must be restored too
    data = write_pairs(tmp_path / "pairs.jsonl")
    a_model, tok = tiny()
    train(
        config(tmp_path, output_dir=str(tmp_path / "a"), data=str(data), **kw), model=a_model, tokenizer=tok
    )

    b_model, tok = tiny()
    run_b = tmp_path / "b"
    train(
        config(tmp_path, output_dir=str(run_b), data=str(data), **kw),
        model=b_model,
        tokenizer=tok,
        callbacks=[StopAt(5)],
    )
    assert [r["step"] for r in read_metrics(run_b) if r["split"] == "train"] == [1, 2, 3, 4, 5]
    c_model, tok = tiny()  # a fresh process would start from a fresh model: the checkpoint must restore it
    with pytest.raises(RunDirError, match="not empty"):
        train(config(tmp_path, output_dir=str(run_b), data=str(data), **kw), model=c_model, tokenizer=tok)
    train(
        config(tmp_path, output_dir=str(run_b), data=str(data), resume=True, **kw),
        model=c_model,
        tokenizer=tok,
    )

    pa = dict(a_model.named_parameters())
    for name, p in c_model.named_parameters():
        assert torch.allclose(p, pa[name], atol=1e-6, rtol=0), name
    if lora:  # LoRA checkpoints hold the adapter only
        from safetensors.torch import load_file

        keys = load_file(run_b / "checkpoints" / "step-5" / "model.safetensors").keys()
        assert keys and all("lora_" in k for k in keys)
    ma, mb = read_metrics(tmp_path / "a"), read_metrics(run_b)
    assert [(r["step"], r["split"]) for r in ma] == [(r["step"], r["split"]) for r in mb]
    for ra, rb in zip(ma, mb):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)
    pairs_a, pairs_b = (
        pd.read_parquet(tmp_path / "a" / "pairs.parquet"),
        pd.read_parquet(run_b / "pairs.parquet"),
    )
    assert len(pairs_a) == len(pairs_b)
    assert (pairs_a["chosen"] - pairs_b["chosen"]).abs().max() < 1e-5


def test_resume_drops_rows_logged_after_the_checkpoint(tmp_path):
    model, tok = tiny()
    cfg = config(tmp_path, steps=6, save_every=3, save_total_limit=None)
    run = train(cfg, model=model, tokenizer=tok)
    # simulate a crash after step 3's checkpoint: keep step-3, lose step-6 (metrics rows 4..6 remain)
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-6")
    model, tok = tiny()
    train(config(tmp_path, steps=6, save_every=3, resume=True), model=model, tokenizer=tok)
    steps = [r["step"] for r in read_metrics(run) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------------------------
# divergence, run-dir safety, bad input


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    poisoned = {"on": False}

    def nan_after_two(p, beta: float = 0.1):
        loss = LOSSES["dpo"](p, beta=beta)
        return loss * float("nan") if poisoned["on"] else loss

    class Poison(TrainerCallback):
        def on_step_end(self, trainer, state, batch_stats):
            poisoned["on"] = state.step == 2

    monkeypatch.setitem(LOSSES, "nan_after_two", nan_after_two)
    model, tok = tiny()
    cfg = config(tmp_path, loss="nan_after_two", steps=5, eval_fraction=0.0, pairs_train_subset=0)
    with pytest.raises(TrainingDivergedError, match=r"step 3: the loss is NaN.*after step 2.*step-2"):
        train(cfg, model=model, tokenizer=tok, callbacks=[Poison()])
    run = tmp_path / "run"
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [1, 2]
    from safetensors.torch import load_file

    weights = load_file(run / "checkpoints" / "step-2" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    # the checkpoint holds the model after step 2 (no update from the NaN step)
    for name, p in model.named_parameters():
        assert torch.equal(weights[name], p.detach()), name


def test_existing_run_dir_is_never_overwritten_by_accident(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    model, tok = tiny()
    with pytest.raises(RunDirError, match="--overwrite"):
        train(config(tmp_path), model=model, tokenizer=tok)
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    with pytest.raises(RunDirError, match="nothing to resume"):
        train(config(tmp_path, resume=True), model=model, tokenizer=tok)
    train(config(tmp_path, overwrite=True, steps=1), model=model, tokenizer=tok)
    assert '"split": "train"' in (run / "metrics.jsonl").read_text()


def test_loss_flags_only_for_losses_that_take_them(tmp_path):
    data = str(tmp_path / "d.jsonl")
    assert resolve_loss_kwargs(TrainConfig(data=data, output_dir="o", loss="simpo", gamma=0.5)) == {
        "gamma": 0.5
    }
    assert resolve_loss_kwargs(TrainConfig(data=data, output_dir="o", loss="dpo")) == {}
    with pytest.raises(
        PreflensError, match=r"--gamma does not apply to loss 'dpo' \(its hyper-parameters: beta=0.1\)"
    ):
        resolve_loss_kwargs(TrainConfig(data=data, output_dir="o", loss="dpo", gamma=0.5))
    with pytest.raises(PreflensError, match="disagree"):
        resolve_loss_kwargs(TrainConfig(data=data, output_dir="o", beta=0.2, loss_kwargs={"beta": 0.3}))
    with pytest.raises(PreflensError, match="mask must be diff or learned"):
        resolve_loss_kwargs(TrainConfig(data=data, output_dir="o", loss="sparse", mask="tokens"))
    with pytest.raises(PreflensError, match="unknown loss 'dpoo'"):
        TrainConfig(data=data, output_dir="o", loss="dpoo").validate()


def test_bad_rows_name_row_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "a film", "chosen": "good", "rejected": "bad"})
        + "\n"
        + json.dumps({"prompt": "a film", "chosen": "good"})
        + "\n"
    )
    model, tok = tiny()
    with pytest.raises(DataError, match=r"row 1 \(line 2\).*'rejected'"):
        train(config(tmp_path, data=str(bad)), model=model, tokenizer=tok)
    with pytest.raises(PreflensError, match="--batch-size 64 is larger than the 19 train pairs"):
        train(config(tmp_path, batch_size=64, overwrite=True), model=model, tokenizer=tok)


# ------------------------------------------------------------------------------------------------
# every kind of loss runs through the trainer


@pytest.mark.parametrize(
    "loss,kw",
    [
        ("simpo", {}),  # reference-free
        ("sparse", {"mask": "diff"}),  # token-level: per-token policy and reference log-probs
        ("sparse", {"mask": "learned"}),  # token-level with a trained mask head
        ("normalized", {}),  # per-sequence gradient norms before the loss
    ],
)
def test_loss_paths(tmp_path, loss, kw):
    model, tok = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = train(config(tmp_path, loss=loss, steps=2, **kw), model=model, tokenizer=tok)
    rows = read_metrics(run)
    tr = [r for r in rows if r["split"] == "train"]
    assert len(tr) == 2 and all(math.isfinite(r["loss"]) for r in tr)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    ev = [r for r in rows if r["split"] == "eval"]
    assert len(ev) == 2 and all(r["loss"] is not None for r in ev)
    if loss == "normalized":
        assert "loss/dpo" in tr[0] and tr[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)
    if kw.get("mask") == "learned":
        assert (run / "final" / "mask_head.safetensors").is_file()


def test_sparse_diff_first_step_loss_is_log2(tmp_path):
    """Policy == reference at step 1, so every masked log-ratio is 0 and the loss is log 2 exactly."""
    model, tok = tiny()
    run = train(config(tmp_path, loss="sparse", mask="diff", steps=1), model=model, tokenizer=tok)
    tr = [r for r in read_metrics(run) if r["split"] == "train"]
    assert tr[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_lora_reference_is_base_model_and_only_adapters_train(tmp_path):
    model, tok = tiny()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(config(tmp_path, lora_rank=4, steps=3), model=model, tokenizer=tok)
    run = trainer.train()
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    for name, p in peft_model.get_base_model().named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, base[key]), name
    assert (run / "final" / "adapter_config.json").is_file()
    start = pd.read_parquet(run / "pairs.parquet").query("step == 0")
    assert (start.chosen - start.ref_chosen).abs().max() < 1e-5


def test_tensorboard_events_written(tmp_path):
    pytest.importorskip("tensorboard")
    model, tok = tiny()
    run = train(config(tmp_path, steps=2, report_to="tensorboard"), model=model, tokenizer=tok)
    assert list((run / "tb").rglob("events.out.tfevents*"))


def test_probe_options_attach_the_probe_callback(tmp_path):
    pytest.importorskip("preflens.probes")
    model, tok = tiny()
    run = train(
        config(tmp_path, steps=2, probe_every=1, probe_pairs=3, step_entanglement=True),
        model=model,
        tokenizer=tok,
    )
    rows = read_metrics(run)
    assert [r["step"] for r in rows if r["split"] == "probe"] == [0, 1, 2]
    assert all("entanglement/cosine" in r for r in rows if r["split"] == "train")
    probes = pd.read_parquet(run / "probes.parquet")
    assert sorted(probes["step"].unique()) == [0, 1, 2] and probes["pair_id"].nunique() == 3


@pytest.mark.parametrize("kw", [{"dtype": "bfloat16"}, {"mixed_precision": "bf16"}])
def test_bf16_runs(tmp_path, kw):
    model, tok = tiny()
    if kw.get("dtype") == "bfloat16":
        model = model.to(torch.bfloat16)  # what load_model(dtype="bfloat16") gives
    run = train(config(tmp_path, steps=2, **kw), model=model, tokenizer=tok)
    tr = [r for r in read_metrics(run) if r["split"] == "train"]
    assert len(tr) == 2 and all(math.isfinite(r["loss"]) for r in tr)


def test_eval_file_epochs_and_length_grouping(tmp_path):
    """--eval-data instead of a held-out share; --epochs sets the steps; grouped batches cover the data."""
    model, tok = tiny()
    data = write_pairs(tmp_path / "train.jsonl", n=12, seed=1)
    ev = write_pairs(tmp_path / "eval.jsonl", n=3, seed=2)
    seen = []

    class Ids(TrainerCallback):
        def on_step_end(self, trainer, state, batch_stats):
            seen.append(sorted(batch_stats["per_pair"]["pair_id"].long().tolist()))

    cfg = config(tmp_path, data=str(data), eval_data=str(ev), steps=None, epochs=2, group_by_length=True)
    run = train(cfg, model=model, tokenizer=tok, callbacks=[Ids()])
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["steps_resolved"] == 6  # 2 epochs x 12 / 4
    assert len(seen) == 6
    assert sorted(sum(seen[:3], [])) == list(range(12)) and sorted(sum(seen[3:], [])) == list(range(12))
    ev_rows = [r for r in read_metrics(run) if r["split"] == "eval"]
    assert [r["n_pairs"] for r in ev_rows] == [3, 3]
    pairs = pd.read_parquet(run / "pairs.parquet")
    assert sorted(pairs.query("split == 'eval'")["pair_id"].unique()) == [0, 1, 2]


def test_dropped_rows_are_counted_and_interrupt_keeps_a_checkpoint(tmp_path):
    rows = sentiment_pairs(20, seed=0, response_length=4)
    rows[3]["rejected"] = rows[3]["chosen"]  # identical responses: invalid
    del rows[7]["rejected"]
    data = tmp_path / "with_bad_rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    class CtrlC(TrainerCallback):
        def on_step_end(self, trainer, state, batch_stats):
            if state.step == 3:
                raise KeyboardInterrupt

    model, tok = tiny()
    cfg = config(tmp_path, data=str(data), on_invalid="drop", steps=6, save_every=0)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, model=model, tokenizer=tok, callbacks=[CtrlC()])
    run = tmp_path / "run"
    report = json.loads((run / "data_report.json").read_text())
    assert report["train/load"]["rows_read"] == 20 and report["train/load"]["rows_kept"] == 18
    assert sum(report["train/load"]["dropped"].values()) == 2
    assert (run / "checkpoints" / "step-3").is_dir()
    model, tok = tiny()
    train(
        config(tmp_path, data=str(data), on_invalid="drop", steps=6, save_every=0, resume=True),
        model=model,
        tokenizer=tok,
    )
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_interrupt_inside_a_step_rewinds_it_and_resumes_exactly(tmp_path):
    """Ctrl-C during step 4's second micro-batch: the checkpoint is step 3 with the data position and RNG
    of step 4's start, so the resumed run ends with the parameters of an uninterrupted one."""
    kw = dict(steps=6, grad_accum=2, lora_rank=4, lora_dropout=0.2, save_every=0)
    data = write_pairs(tmp_path / "pairs.jsonl")
    a, tok = tiny()
    train(config(tmp_path, data=str(data), output_dir=str(tmp_path / "a"), **kw), model=a, tokenizer=tok)

    class CtrlC(TrainerCallback):
        calls = 0

        def on_logps(self, trainer, batch, seq, pair, per_pair_loss):
            CtrlC.calls += 1
            if CtrlC.calls == 8:
                raise KeyboardInterrupt

    b, tok = tiny()
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, data=str(data), **kw), model=b, tokenizer=tok, callbacks=[CtrlC()])
    run = tmp_path / "run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-3"]
    c, tok = tiny()
    train(config(tmp_path, data=str(data), resume=True, **kw), model=c, tokenizer=tok)
    pa = dict(a.named_parameters())
    for name, p in c.named_parameters():
        assert torch.allclose(p, pa[name], atol=1e-6, rtol=0), name
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_sparse_loss_runs_with_probes(tmp_path):
    """Token-level losses get sequence-level margin weights (mean token weight) in probes too."""
    model, tok = tiny()
    run = train(
        config(tmp_path, loss="sparse", mask="diff", steps=2, probe_every=1, probe_pairs=3),
        model=model,
        tokenizer=tok,
    )
    probes = pd.read_parquet(run / "probes.parquet")
    assert len(probes) == 3 * 3
    assert probes["d_w"].notna().all() and (probes["d_w"] > 0).all()


@pytest.mark.parametrize(
    "change, flag",
    [
        ({"batch_size": 2}, "--batch-size 2"),
        ({"seed": 1}, "--seed 1"),
        ({"group_by_length": True}, "--group-by-length True"),
    ],
)
def test_resume_refuses_options_that_reorder_the_data(tmp_path, change, flag):
    """The checkpoint's data position counts batches of the saved order: another batch size, seed or
    length grouping would silently skip and repeat pairs."""
    model, tok = tiny()
    train(config(tmp_path, steps=2, save_every=1), model=model, tokenizer=tok)
    model, tok = tiny()
    with pytest.raises(RunDirError, match=f"cannot resume with {flag} \\(the run used"):
        train(config(tmp_path, steps=4, resume=True, **change), model=model, tokenizer=tok)
    train(config(tmp_path, steps=4, resume=True), model=model, tokenizer=tok)  # the same values resume
    assert [r["step"] for r in read_metrics(tmp_path / "run") if r["split"] == "train"] == [1, 2, 3, 4]
