"""In-run attribution of likelihood displacement (`preflens.grad.cross`, `training.attribution`) against
explicit per-sequence autograd gradients.

The reference is written out here: for every training sequence s and probe sequence j, backward of the
summed response log-prob alone, flatten the trainable gradients, and
    effect[i, j] = -eta * (c_chosen_i <g_chosen_i, g_j> + c_rejected_i <g_rejected_i, g_j>)
with c = dL/dlogp from `preflens.losses.margin_weights` (d_w, d_l) divided by the batch size (the
trainer's loss is the batch mean). The observed check takes one explicit SGD step.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from preflens.grad.cross import CrossCapture, probe_parts, sequence_cross
from preflens.logprobs import pair_logps_from_batch, sequence_logps
from preflens.losses import LOSSES, get_loss, margin_weights

pytestmark = pytest.mark.usefixtures("one_thread")

V = 96


def tiny_llama(tied: bool = False, bias: bool = False, seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        attention_bias=bias,
        mlp_bias=bias,
    )
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.2 * torch.randn_like(p))
            if n.endswith("bias"):
                p.normal_(0, 0.2)
    return m


def pair_batch(b: int, t: int = 11, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2b right-padded rows (chosen rows, then rejected rows; a pair shares its prompt); pad id 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (2 * b, t), generator=g)
    att = torch.zeros(2 * b, t, dtype=torch.long)
    rm = torch.zeros(2 * b, t, dtype=torch.bool)
    for i in range(b):
        prompt = 2 + i % 3
        for s, length in ((i, t - (i % 3)), (b + i, t - ((i + 1) % 4))):
            ids[s, :prompt] = ids[i, :prompt]
            att[s, :length] = 1
            rm[s, prompt:length] = True
            ids[s, length:] = 0
    return ids, att, rm


def per_sequence_grads(model: nn.Module, ids, att, rm) -> torch.Tensor:
    """[N, P] float64: the flattened gradient of each row's summed response log-prob, one backward each."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for s in range(ids.shape[0]):
        lp = sequence_logps(model, ids[s : s + 1], att[s : s + 1], rm[s : s + 1]).logps.sum()
        grads = torch.autograd.grad(lp, params, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                    for g, p in zip(grads, params)
                ]
            )
        )
    return torch.stack(rows)


def logps64(model: nn.Module, ids, att, rm) -> torch.Tensor:
    """Summed response log-probs in float64, written out (sequence_logps returns float32)."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits.double()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (lp * rm[:, 1:]).sum(1)


def step_cross(model, batch, probe_batch, loss_fn, ref, *, dtype=torch.float64, keep=False):
    """What the trainer does: a probe pass, then the step's forward and backward of the mean loss."""
    ids, att, rm = batch
    probe = probe_parts(model, *probe_batch, compute_dtype=dtype)
    cap = CrossCapture(model, att, rm, probe, compute_dtype=dtype, keep=keep, with_gram=True)
    with cap:
        seq = sequence_logps(model, ids, att, rm)
        cap.watch(seq.logps)
        pair = pair_logps_from_batch(seq, ref=ref)
        loss_fn(pair).mean().backward()
    return cap, probe


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo", "cpo", "slic", "dpop", "rdpo", "bdpo", "sppo"])
def test_entries_equal_explicit_gradients(loss: str) -> None:
    torch.manual_seed(0)
    model = tiny_llama(tied=(loss == "ipo"), bias=(loss == "simpo")).double()
    b, p = 3, 2
    batch = pair_batch(b, seed=1)
    probe_batch = pair_batch(p, t=9, seed=7)
    ref = (torch.randn(b, dtype=torch.float64) - 20, torch.randn(b, dtype=torch.float64) - 20)
    loss_fn = get_loss(loss)
    cap, _ = step_cross(model, batch, probe_batch, loss_fn, ref)
    cross = cap.result()  # [2b, 2p]
    model.zero_grad(set_to_none=True)

    g_train = per_sequence_grads(model, *batch)
    g_probe = per_sequence_grads(model, *probe_batch)
    with torch.no_grad():
        seq = sequence_logps(model, *batch)
    d_w, d_l = margin_weights(loss_fn, pair_logps_from_batch(seq, ref=ref))
    c = torch.cat([-d_w, d_l]).double() / b  # dL/dlogp of the mean loss
    expect = (c[:, None] * g_train) @ g_probe.T
    assert cross.shape == (2 * b, 2 * p)
    rel = (cross - expect).abs().max() / expect.abs().max()
    assert rel < 1e-5, (loss, float(rel))
    # the pairs' entanglement cosine of the log-prob gradients, from the same capture
    cos = torch.nn.functional.cosine_similarity(g_train[:b], g_train[b:], dim=1)
    got = cap.logp_cosines()
    ok = c[:b] * c[b:] != 0
    assert torch.allclose(got[ok], cos[ok], atol=1e-8), (got, cos)
    assert torch.isnan(got[~ok]).all()


@pytest.mark.parametrize("layout", ["equal_ordered", "unequal_ordered", "shuffled"])
def test_materialized_kernel_equals_explicit_outer_products(layout: str) -> None:
    """cross_param's materialized form (a tied head's dense part plus an embedding's one-hot part, the
    flat rows stacked per sequence) against G_s = sum_r a_r b_r^T built row by row here, in float64:
    rows in sequence order with equal counts (the view path), unequal counts, and shuffled rows."""
    from preflens.grad.cross import cross_param
    from preflens.grad.parts import Outer

    g = torch.Generator().manual_seed(11)
    p, q = 37, 5

    def side(n: int) -> tuple[list[Outer], torch.Tensor]:
        counts = [4] * n if layout == "equal_ordered" else [1 + (3 * s) % 5 for s in range(n)]
        seg = torch.cat([torch.full((c,), s) for s, c in enumerate(counts)])
        if layout == "shuffled":
            seg = seg[torch.randperm(len(seg), generator=g)]
        a = torch.randn(len(seg), p, generator=g, dtype=torch.float64)
        b = torch.randn(len(seg), q, generator=g, dtype=torch.float64)
        ids = torch.randint(0, p, (2 * n,), generator=g)
        hot_seg = torch.arange(2 * n) % n
        hb = torch.randn(2 * n, q, generator=g, dtype=torch.float64)
        dense = Outer(a=a, ids=None, b=b, seg=seg, p=p, q=q, rows=len(seg))
        hot = Outer(a=None, ids=ids, b=hb, seg=hot_seg, p=p, q=q, rows=2 * n)
        full = torch.zeros(n, p, q, dtype=torch.float64)
        for r in range(len(seg)):
            full[seg[r]] += torch.outer(a[r], b[r])
        for r in range(2 * n):
            full[hot_seg[r], ids[r]] += hb[r]
        return [dense, hot], full.reshape(n, -1)

    (ta, gt), (pb, gp) = side(3), side(4)
    got = cross_param("w", (ta, None), (pb, None), 3, 4, strategy="materialize", dtype=torch.float64)
    expect = gt @ gp.T
    assert torch.allclose(got, expect, rtol=1e-10, atol=1e-10)
    denom = torch.rand(p, q, generator=g, dtype=torch.float64) + 0.5
    got = cross_param("w", (ta, None), (pb, None), 3, 4, dtype=torch.float64, denom=denom)
    assert torch.allclose(got, gt @ (gp / denom.reshape(1, -1)).T, rtol=1e-10, atol=1e-10)


def test_lora_and_ghost_vs_materialized_and_standalone() -> None:
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(seed=2).double()
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.05)
    batch = pair_batch(2, seed=3)
    probe_batch = pair_batch(2, t=8, seed=4)
    g_train = per_sequence_grads(model, *batch)
    g_probe = per_sequence_grads(model, *probe_batch)
    w = torch.tensor([0.3, -1.2, 0.7, 2.0], dtype=torch.float64)
    expect = (w[:, None] * g_train) @ g_probe.T
    for strategy in ("ghost", "materialize"):
        probe = probe_parts(model, *probe_batch, compute_dtype=torch.float64)
        cross, _ = sequence_cross(model, batch, w, probe, strategy=strategy, compute_dtype=torch.float64)
        rel = (cross - expect).abs().max() / expect.abs().max()
        assert rel < 1e-5, (strategy, float(rel))


def test_batch_sum_predicts_one_sgd_step() -> None:
    """Sum over the batch's pairs of -eta * <grad l_i, grad logp_j> vs the observed change of the probe
    log-probs after one explicit SGD step at a small lr: the signs agree on >= 95% of probe sequences."""
    agree, total = 0, 0
    for seed in range(3):
        model = tiny_llama(seed=10 + seed).double()  # float32 log-probs resolve ~1e-6 nats only
        b, p = 4, 8
        batch = pair_batch(b, seed=20 + seed)
        probe_batch = pair_batch(p, t=10, seed=30 + seed)
        ref = (torch.full((b,), -25.0, dtype=torch.float64), torch.full((b,), -25.0, dtype=torch.float64))
        before = logps64(model, *probe_batch)
        cap, probe = step_cross(model, batch, probe_batch, get_loss("dpo"), ref)
        lr = 1e-3
        pred = -lr * cap.result().sum(0)  # [2p]
        with torch.no_grad():
            for prm in model.parameters():
                prm -= lr * prm.grad
        obs = logps64(model, *probe_batch) - before
        agree += int((torch.sign(pred) == torch.sign(obs)).sum())
        total += pred.numel()
        assert torch.allclose(pred, obs, rtol=0.05, atol=0.01 * float(obs.abs().max()))
    assert agree / total >= 0.95, agree / total


def test_adam_preconditioned_first_step_is_the_actual_update() -> None:
    """With the step's actual Adam denominator, the batch's pairs' shares sum to the first AdamW update:
    sum_i <delta theta_i, grad logp_j> = <delta theta, grad logp_j> (explicit autograd)."""
    model = tiny_llama(seed=5).double()
    b, p = 3, 2
    batch = pair_batch(b, seed=8)
    probe_batch = pair_batch(p, t=9, seed=9)
    ref = (torch.full((b,), -25.0, dtype=torch.float64), torch.full((b,), -25.0, dtype=torch.float64))
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    cap, _ = step_cross(model, batch, probe_batch, get_loss("dpo"), ref, keep=True)
    cap.result()
    g_probe = per_sequence_grads(model, *probe_batch)
    before = [q.detach().clone() for q in params]
    opt.step()
    delta = torch.cat([(q.detach() - q0).reshape(-1).double() for q, q0 in zip(params, before)])
    st = opt.state[params[0]]
    t = float(st["step"])
    bc1, bc2 = 1 - 0.9**t, 1 - 0.999**t
    denoms = {id(q): opt.state[q]["exp_avg_sq"].sqrt() / math.sqrt(bc2) + 1e-8 for q in params}
    shares = -1e-3 * (1 - 0.9) / bc1 * cap.preconditioned(denoms)  # [2b, 2p]
    expect = g_probe @ delta
    rel = (shares.sum(0) - expect).abs().max() / expect.abs().max()
    assert rel < 1e-5, float(rel)


def test_every_registered_loss_runs_through_the_capture() -> None:
    """Token-level losses included: the captured output-gradient is the gradient of each sequence's loss
    share, so the batch sum is the full gradient's products (checked against autograd's p.grad)."""
    model = tiny_llama(seed=6).double()
    b = 2
    batch = pair_batch(b, seed=11)
    probe_batch = pair_batch(1, t=8, seed=12)
    g_probe = per_sequence_grads(model, *probe_batch)
    for name in LOSSES:
        if name in ("normalized",) or "learned" in str(name):
            continue
        loss_fn = get_loss(name)
        probe = probe_parts(model, *probe_batch, compute_dtype=torch.float64)
        ids, att, rm = batch
        cap = CrossCapture(model, att, rm, probe, compute_dtype=torch.float64)
        model.zero_grad(set_to_none=True)
        with cap:
            seq = sequence_logps(model, ids, att, rm, return_tokens=True)
            cap.watch(seq.logps)
            b_ = ids.shape[0] // 2
            ref = (
                torch.full((b_,), -25.0, dtype=torch.float64),
                torch.full((b_,), -25.0, dtype=torch.float64),
            )
            ref_tokens = (seq.token_logps[:b_].detach() - 0.5, seq.token_logps[b_:].detach() - 0.5)
            try:
                pair = pair_logps_from_batch(seq, ref=ref, ref_tokens=ref_tokens)
            except TypeError:
                pair = pair_logps_from_batch(seq, ref=ref)
            loss = loss_fn(pair).mean()
            if not loss.requires_grad:
                continue
            loss.backward()
        cross = cap.result()
        full = torch.cat(
            [
                q.grad.reshape(-1).double()
                if q.grad is not None
                else torch.zeros(q.numel(), dtype=torch.float64)
                for q in model.parameters()
            ]
        )
        expect = g_probe @ full
        rel = (cross.sum(0) - expect).abs().max() / max(float(expect.abs().max()), 1e-12)
        assert rel < 1e-5, (name, float(rel))


# -- inside `preflens train` -------------------------------------------------------------------------


def _train_config(tmp_path, **kw):
    import json

    from preflens.data.synthetic import sentiment_pairs
    from preflens.training.config import TrainConfig

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_pairs(24, seed=0, response_length=4)))
    base = dict(data=str(data), output_dir=str(tmp_path / "run"), steps=2, batch_size=4, lr=1e-4,
                eval_every=0, save_every=0, report_to="none", progress=False, max_grad_norm=None,
                attribute_every=1, attribute_pairs=3, probe_every=1, probe_pairs=3)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_train_option_writes_attribution_and_predicts_the_first_adamw_step(tmp_path) -> None:
    """--attribute-every 1 --attribute-optimizer adam: the rows cover every (pair, probe) of each step;
    at step 1 the pairs' Adam shares sum to the first-order change of the probe log-probs that the
    probe callback observes independently (probes.parquet, same probe set)."""
    import pandas as pd

    from preflens.models import tiny_model
    from preflens.training.trainer import train

    model, tok = tiny_model(hidden_size=32, seed=0)
    run = train(_train_config(tmp_path, attribute_optimizer="adam"), model=model, tokenizer=tok)
    att = pd.read_parquet(run / "attribution.parquet")
    assert sorted(att["step"].unique()) == [1, 2]
    assert len(att) == 2 * 4 * 3 and att["probe_pair_id"].nunique() == 3
    probes = pd.read_parquet(run / "probes.parquet")
    c0 = probes[probes["step"] == 0].set_index("pair_id")["chosen"]
    c1 = probes[probes["step"] == 1].set_index("pair_id")["chosen"]
    r0 = probes[probes["step"] == 0].set_index("pair_id")["rejected"]
    r1 = probes[probes["step"] == 1].set_index("pair_id")["rejected"]
    s1 = att[att["step"] == 1].groupby("probe_pair_id")[["adam_chosen", "adam_rejected"]].sum()
    pred = torch.tensor(list(s1["adam_chosen"]) + list(s1["adam_rejected"]))
    obs = torch.tensor(list((c1 - c0)[s1.index]) + list((r1 - r0)[s1.index]))
    assert (torch.sign(pred) == torch.sign(obs)).float().mean() >= 0.95, (pred, obs)
    assert torch.allclose(pred, obs, rtol=0.1, atol=0.05 * float(obs.abs().max())), (pred, obs)
    summary = pd.read_parquet(run / "attribution_pairs.parquet")
    assert set(summary.columns) >= {"pair_id", "total_chosen", "seen", "mean_chosen"}
    by_pair = att.groupby("pair_id")["sgd_chosen"].sum()
    assert torch.allclose(
        torch.tensor(summary.set_index("pair_id")["total_chosen"][by_pair.index].to_numpy()),
        torch.tensor(by_pair.to_numpy()),
    )
    _check_report(run, by_pair)


def _check_report(run, by_pair) -> None:
    """The report section: the top pusher (by the rows' own sums), the concentration written out, the
    CHES agreement against a hand-made CHES table, and the pair's texts on the page."""
    import json

    import pandas as pd

    from preflens.report.attribution import attribution_summary
    from preflens.report.generate import generate_report
    from preflens.report.runs import load_run

    ids = list(by_pair.index)
    pd.DataFrame({"pair_index": ids, "ches": [float(-by_pair[i]) for i in ids]}).to_parquet(
        run / "ches.parquet"
    )
    s = attribution_summary(load_run(run))
    worst = int(by_pair.idxmin())
    assert int(s["top"][0]["pair_id"]) == worst
    neg = sorted(min(0.0, v) for v in by_pair)
    k = max(1, -(-len(neg) // 5))
    assert abs(s["concentration"][0.2] - sum(neg[:k]) / sum(neg)) < 1e-9
    assert s["spearman_vs_ches"] > 0.999  # CHES here is the attribution itself, negated
    page, _ = generate_report(run)
    text = page.read_text()
    assert "Which training pairs pushed the chosen responses down" in text
    rows = [json.loads(line) for line in (run.parent / "pairs.jsonl").read_text().splitlines()]
    import html as _html

    assert _html.escape(str(rows[worst]["chosen"])[:40]) in text


def test_train_option_is_unchanged_by_fused_step_entanglement(tmp_path) -> None:
    """With --step-entanglement (its hooks write the weight gradients) the SGD entries are the same."""
    import pandas as pd

    from preflens.models import tiny_model
    from preflens.training.trainer import train

    out = []
    for i, step_ent in enumerate((False, True)):
        model, tok = tiny_model(hidden_size=32, seed=0)
        cfg = _train_config(tmp_path / str(i), steps=1, step_entanglement=step_ent, probe_every=0)
        out.append(pd.read_parquet(train(cfg, model=model, tokenizer=tok) / "attribution.parquet"))
    a, b = (torch.tensor(o.sort_values(["pair_id", "probe_pair_id"])["sgd_chosen"].to_numpy()) for o in out)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-9)


# -- `preflens attribute` ------------------------------------------------------------------------------


def test_attribute_command_matches_explicit_gradients_and_filters(tmp_path) -> None:
    """Each row's effect_chosen equals -lr * sum_j <grad l_i, grad logp(y_w,j)> from explicit autograd
    (l_i: DPO at the current model as its own reference); --drop-top writes the rest of the pairs."""
    import json

    import pandas as pd

    from preflens.data.collate import collate_pairs, tokenize_pairs
    from preflens.data.formats import load_pairs
    from preflens.data.synthetic import sentiment_pairs
    from preflens.diagnostics.attribution_scan import run_attribution
    from preflens.models import tiny_model

    model, tok = tiny_model(hidden_size=32, seed=3)
    model = model.double()
    for name, n in (("train", 6), ("eval", 3)):
        rows = sentiment_pairs(n, seed=1 if name == "train" else 2, response_length=4)
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_attribution(
        model=None, data=tmp_path / "train.jsonl", eval_data=tmp_path / "eval.jsonl",
        output=tmp_path / "attr.parquet", probe_pairs=2, lr=0.5, batch_size=4, drop_top=0.34,
        filtered_output=tmp_path / "kept.jsonl", progress=False, _model_obj=(model, tok),
    )  # fmt: skip
    df = pd.read_parquet(tmp_path / "attr.parquet").set_index("pair_index")
    assert len(df) == 6 and summary["dropped"] == 2 and df["dropped"].sum() == 2
    kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert len(kept) == 4
    worst = set(df.sort_values("effect_chosen").index[:2])
    assert set(df.index[df["dropped"]]) == worst

    params = [p for p in model.parameters() if p.requires_grad]

    def flat(grads):
        return torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
        )

    items, _ = tokenize_pairs(load_pairs(tmp_path / "train.jsonl")[0], tok)
    probe_items, _ = tokenize_pairs(load_pairs(tmp_path / "eval.jsonl")[0], tok)
    pb = collate_pairs(sorted(probe_items, key=lambda it: it.pair_id)[:2], tok.pad_token_id)
    g_probe = per_sequence_grads(model, pb["input_ids"], pb["attention_mask"], pb["response_mask"].bool())
    g_chosen = g_probe[:2].sum(0)
    for it in items:
        b = collate_pairs([it], tok.pad_token_id)
        lp = sequence_logps(model, b["input_ids"], b["attention_mask"], b["response_mask"].bool()).logps
        margin = 0.1 * ((lp[0] - lp[0].detach()) - (lp[1] - lp[1].detach()))  # DPO, beta 0.1
        loss = -torch.nn.functional.logsigmoid(margin)
        g = flat(torch.autograd.grad(loss, params, allow_unused=True)).double()
        expect = -0.5 * float(g @ g_chosen)
        got = float(df.loc[it.pair_id, "effect_chosen"])
        assert abs(got - expect) <= 1e-5 * abs(expect) + 1e-12, (it.pair_id, got, expect)


def test_attribute_cli_refuses_bad_options(tmp_path) -> None:
    from typer.testing import CliRunner

    from preflens.cli import app

    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    res = CliRunner().invoke(app, ["attribute", "--data", str(tmp_path / "d.jsonl"), "-o", str(tmp_path / "o.parquet"),
                                   "--drop-top", "0.2"])  # fmt: skip
    assert res.exit_code != 0 and "--filtered-output" in str(res.exception or res.output)


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_processes_attribute_what_one_does(tmp_path) -> None:
    """DDP (torchrun, gloo): every (step, pair, probe) row of a 2-process run equals the 1-process run's
    (each process attributes its share of the batch; the rows are gathered, the 1/N of DDP's average applied)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pandas as pd

    from test_multiprocess import _free_port, _write_inputs

    mdir, data = _write_inputs(tmp_path)
    script = Path(__file__).with_name("_mp_train_script.py")
    out = {}
    for n in (1, 2):
        cfg = dict(model=str(mdir), data=str(data), eval_fraction=0.25, output_dir=str(tmp_path / f"run{n}"),
                   steps=2, batch_size=4, lr=1e-3, scheduler="constant", eval_every=0, save_every=0,
                   attribute_every=1, attribute_pairs=3, report_to="none", progress=False, seed=0)  # fmt: skip
        (tmp_path / f"cfg{n}.json").write_text(json.dumps(cfg))
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        cmd = [sys.executable, str(script), str(tmp_path / f"cfg{n}.json")]
        if n > 1:
            port = _free_port()
            env["ACCELERATE_USE_CPU"] = "true"
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={port}",
                   str(script), str(tmp_path / f"cfg{n}.json")]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        df = pd.read_parquet(tmp_path / f"run{n}" / "attribution.parquet")
        out[n] = df.sort_values(["step", "pair_id", "probe_pair_id"]).reset_index(drop=True)
    a, b = out[1], out[2]
    assert len(a) == len(b) == 2 * 4 * 3
    assert (
        a[["step", "pair_id", "probe_pair_id"]].to_numpy()
        == b[["step", "pair_id", "probe_pair_id"]].to_numpy()
    ).all()
    for col in ("sgd_chosen", "sgd_rejected", "cosine"):
        x, y = torch.tensor(a[col].to_numpy()), torch.tensor(b[col].to_numpy())
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-4 * float(x.abs().max())), col
