"""Entanglement statistics (Yuan et al. 2024, arXiv 2410.13828, Sec. 3-4) against written-out formulas and an actual SGD step."""

from __future__ import annotations

import math

import pytest
import torch

from preflens.diagnostics.entanglement import (
    entanglement_from_gram,
    first_order_change,
    pair_entanglement,
    token_entanglement,
)
from preflens.grad import sequence_gram
from preflens.logprobs import sequence_logps
from preflens.losses import PairLogps, get_loss, margin_weights
from test_gram import V, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def shared_prefix_pairs(b: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Pairs whose rejected response is the chosen one plus a few tokens (high entanglement)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(b):
        prompt = torch.randint(1, V, (3,), generator=g)
        yw = torch.randint(1, V, (4 + i % 3,), generator=g)
        yl = torch.cat([yw, torch.randint(1, V, (2 + i % 2,), generator=g)])
        rows.append((prompt, yw, yl))
    t = max(len(p) + len(yl) for p, _, yl in rows)
    ids = torch.zeros(2 * b, t, dtype=torch.long)
    att = torch.zeros_like(ids)
    rm = torch.zeros(2 * b, t, dtype=torch.bool)
    for i, (p, yw, yl) in enumerate(rows):
        for r, y in ((i, yw), (b + i, yl)):
            s = torch.cat([p, y])
            ids[r, : len(s)] = s
            att[r, : len(s)] = 1
            rm[r, len(p) : len(s)] = True
    return {"input_ids": ids, "attention_mask": att, "response_mask": rm, "pair_index": torch.arange(b)}


def logps(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logps(
            model, batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        ).logps


def test_stats_match_paper_formulas() -> None:
    torch.manual_seed(0)
    b = 5
    x = torch.randn(2 * b, 7, dtype=torch.float64)
    gram = x @ x.T
    chosen, rejected = -torch.rand(b) * 20, -torch.rand(b) * 20
    ref_c, ref_r = chosen + torch.randn(b), rejected + torch.randn(b)
    p = PairLogps(chosen=chosen, rejected=rejected, ref_chosen=ref_c, ref_rejected=ref_r)
    beta, eta = 0.1, 0.3
    st = entanglement_from_gram(gram, p, get_loss("dpo", beta=beta), eta=eta, reduction="mean")
    # DPO: d_w = d_l = beta sigma(-beta (r_w - r_l))
    d = beta * torch.sigmoid(-beta * ((chosen - ref_c) - (rejected - ref_r)))
    for i in range(b):
        gw, gl = x[i], x[b + i]
        assert torch.isclose(st.inner[i].double(), gw @ gl, rtol=1e-5)
        assert torch.isclose(st.cosine[i].double(), gw @ gl / (gw.norm() * gl.norm()), rtol=1e-5)
        dc = eta * d[i] * (gw @ gw - gw @ gl)
        dr = eta * d[i] * (gw @ gl - gl @ gl)
        assert torch.isclose(st.pred_delta_chosen[i].double(), dc.double(), rtol=1e-4)
        assert torch.isclose(st.pred_delta_rejected[i].double(), dr.double(), rtol=1e-4)
        assert bool(st.cond1_violated[i]) == bool(gw @ gl > gw @ gw)
        assert bool(st.cond2_violated[i]) == bool(gw @ gl > gl @ gl)
    # batch prediction: -eta sum_j dL/dlogp_j <g_i, g_j> with L the mean of the per-pair losses
    c = torch.cat([-d, d]).double() / b
    expect = -eta * gram @ c
    assert torch.allclose(st.batch_pred_delta_chosen.double(), expect[:b], rtol=1e-4, atol=1e-8)
    assert torch.allclose(st.batch_pred_delta_rejected.double(), expect[b:], rtol=1e-4, atol=1e-8)
    rows = st.rows(step=3, pair_id=list(range(10, 10 + b)))
    assert rows[2]["pair_id"] == 12 and rows[2]["step"] == 3 and rows[2]["inner"] == float(st.inner[2])


def test_first_order_change_is_the_written_out_formula() -> None:
    """delta chosen = eta (d_w |g_w|^2 - d_l <g_w,g_l>), delta rejected = eta (d_w <g_w,g_l> - d_l |g_l|^2)
    (Yuan et al. 2024, arXiv 2410.13828, Sec. 3), for unequal weights (not only DPO's d_w = d_l)."""
    torch.manual_seed(1)
    b = 6
    gw, gl = torch.randn(b, 9, dtype=torch.float64), torch.randn(b, 9, dtype=torch.float64)
    d_w, d_l = torch.rand(b, dtype=torch.float64), torch.rand(b, dtype=torch.float64) * 3
    eta = 0.7
    dc, dr = first_order_change(d_w, d_l, (gw * gw).sum(1), (gw * gl).sum(1), (gl * gl).sum(1), eta=eta)
    for i in range(b):
        want_c = eta * (float(d_w[i]) * float(gw[i] @ gw[i]) - float(d_l[i]) * float(gw[i] @ gl[i]))
        want_r = eta * (float(d_w[i]) * float(gw[i] @ gl[i]) - float(d_l[i]) * float(gl[i] @ gl[i]))
        assert math.isclose(float(dc[i]), want_c, rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(float(dr[i]), want_r, rel_tol=1e-12, abs_tol=1e-12)
    # entanglement_from_gram's per-pair prediction and conditions are this function's, bit for bit
    x = torch.cat([gw, gl])
    gram = x @ x.T
    chosen, rejected = -torch.rand(b) * 10, -torch.rand(b) * 10
    p = PairLogps(chosen=chosen, rejected=rejected, ref_chosen=chosen + 0.3, ref_rejected=rejected - 0.2)
    loss_fn = get_loss("bdpo")
    st = entanglement_from_gram(gram, p, loss_fn, eta=eta)
    i = torch.arange(b)
    mw, ml = margin_weights(loss_fn, p)
    mc, mr = first_order_change(mw.double(), ml.double(), gram[i, i], gram[i, i + b], gram[i + b, i + b])
    assert torch.equal(st.pred_delta_chosen, (eta * mc).float())
    assert torch.equal(st.pred_delta_rejected, (eta * mr).float())
    assert torch.equal(st.cond1_violated, mc < 0) and torch.equal(st.cond2_violated, mr > 0)


def test_predicted_vs_observed_sgd_step() -> None:
    """One small SGD step on the batch DPO loss moves chosen/rejected as -eta Gram c predicts."""
    model = tiny_llama(tied=True, bias=True, seed=1)
    batch = shared_prefix_pairs(b=8)
    lp0 = logps(model, batch)
    b = 8
    ref = (lp0[:b] + 0.5 * torch.randn(b), lp0[b:] + 0.5 * torch.randn(b))
    loss_fn = get_loss("dpo", beta=0.5)
    eta = 0.05
    st = pair_entanglement(model, batch, loss_fn, ref=ref, eta=eta)
    assert torch.allclose(st.chosen, lp0[:b], atol=1e-5)

    seq = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"]).logps
    p = PairLogps(chosen=seq[:b], rejected=seq[b:], ref_chosen=ref[0], ref_rejected=ref[1])
    loss_fn(p).mean().backward()
    with torch.no_grad():
        for q in model.parameters():
            q -= eta * q.grad
    lp1 = logps(model, batch)
    obs = torch.cat([lp1[:b] - lp0[:b], lp1[b:] - lp0[b:]])
    pred = torch.cat([st.batch_pred_delta_chosen, st.batch_pred_delta_rejected])
    assert float((torch.sign(obs) == torch.sign(pred)).float().mean()) >= 0.95
    assert float((obs - pred).norm() / pred.norm()) < 0.05


def test_token_inner_products_sum_to_sentence_inner() -> None:
    """<g_w, g_l> is the sum of the token-level products (computed from separate truncated rows)."""
    model = tiny_llama(tied=True, seed=2)
    batch = shared_prefix_pairs(b=2, seed=4)
    gram = sequence_gram(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    te = token_entanglement(model, batch, pair=1)
    lw = int(batch["response_mask"][1].sum())
    ll = int(batch["response_mask"][3].sum())
    assert te.inner.shape == (lw, ll)
    assert abs(te.sentence_inner - float(gram[1, 3])) < 1e-4 * float(gram[1, 1].sqrt() * gram[3, 3].sqrt())
    s = te.summary()
    total = s["inner_from_same_tokens"] + s["inner_from_different_tokens"]
    assert abs(total - te.sentence_inner) < 1e-3 * abs(te.sentence_inner) + 1e-6


def test_normalized_loss_runs_through_pair_entanglement() -> None:
    model = tiny_llama(seed=3)
    batch = shared_prefix_pairs(b=3)
    lp = logps(model, batch)
    st = pair_entanglement(model, batch, get_loss("normalized"), ref=(lp[:3], lp[3:]))
    # first-order guarantee of normalized PO: no pair violates either condition
    assert not bool(st.cond1_violated.any()) and not bool(st.cond2_violated.any())
    assert not any(bool(t.requires_grad) for t in (st.d_w, st.d_l))


# ------------------------------------------------------------------------------------------------
# in-training probes (preflens.probes)


def test_probe_runner_observed_changes_and_restores_mode() -> None:
    from preflens.probes import ProbeRunner

    model = tiny_llama(seed=5)
    model.train()
    batch = shared_prefix_pairs(b=4)
    lp = logps(model, batch)
    runner = ProbeRunner(model, batch, get_loss("dpo"), (lp[:4] - 0.1, lp[4:] + 0.1))
    rows0, agg0 = runner.run(0, lr=0.01)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert len(rows0) == 4 and rows0[1]["pair_id"] == 1 and math.isnan(rows0[0]["obs_delta_chosen"])
    assert 0.0 <= agg0["probe/frac_cond1_violated"] <= 1.0 and -1 <= agg0["probe/cosine"] <= 1
    with torch.no_grad():
        for q in model.parameters():
            q.add_(1e-3 * torch.randn_like(q))
    lp1 = logps(model, batch)
    rows1, agg1 = runner.run(3, lr=0.01)
    for i, r in enumerate(rows1):
        assert r["obs_steps"] == 3
        assert abs(r["obs_delta_chosen"] - float(lp1[i] - lp[i])) < 1e-4
        assert abs(r["obs_delta_rejected"] - float(lp1[4 + i] - lp[4 + i])) < 1e-4
        assert r["pred_at_prev_chosen"] == pytest.approx(3 * rows0[i]["batch_pred_delta_chosen"])
    assert agg1["probe/frac_chosen_fell"] == pytest.approx(float((lp1[:4] < lp[:4] - 1e-4).float().mean()))


def test_probe_counts_a_fall_only_beyond_the_noise_threshold() -> None:
    """Re-scoring noise (here: a start 5e-5 nats above the current log-prob) is not displacement; a drop
    of 1e-3 is, in float32 (threshold 1e-4) but not under a bf16 threshold (1e-2)."""
    from preflens.probes import ProbeRunner

    model = tiny_llama(seed=5)
    batch = shared_prefix_pairs(b=4)
    lp = logps(model, batch)
    ref = (lp[:4] - 0.1, lp[4:] + 0.1)
    for tol, above, expected in [(1e-4, 5e-5, 0.0), (1e-4, 1e-3, 1.0), (1e-2, 1e-3, 0.0)]:
        runner = ProbeRunner(model, batch, get_loss("dpo"), ref, fell_tol=tol)
        runner.first = (lp[:4].detach() + above, lp[4:].detach())
        _, agg = runner.run(1, lr=0.01)
        assert agg["probe/frac_chosen_fell"] == expected, (tol, above)


@pytest.mark.parametrize("loss", ["dpo", "normalized"])
def test_trainer_writes_probes_and_step_entanglement(tmp_path, loss: str) -> None:
    import json

    import pandas as pd

    from preflens.data.synthetic import sentiment_pairs
    from preflens.models import tiny_model
    from preflens.train import TrainConfig, train

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_pairs(16, seed=0, response_length=4)))
    model, tok = tiny_model(hidden_size=32, seed=0)
    cfg = TrainConfig(
        data=str(data),
        output_dir=str(tmp_path / "run"),
        steps=4,
        batch_size=4,
        lr=1e-3,
        eval_every=0,
        save_every=0,
        report_to="none",
        progress=False,
        eval_fraction=0.25,
        probe_every=2,
        probe_pairs=3,
        step_entanglement=True,
        loss=loss,
    )
    run = train(cfg, model=model, tokenizer=tok)
    probes = pd.read_parquet(run / "probes.parquet")
    assert sorted(probes["step"].unique().tolist()) == [0, 2, 4]
    assert (probes.groupby("step").size() == 3).all()
    for col in ("pair_id", "chosen", "inner", "norm_w", "cosine", "d_w", "d_l", "pred_delta_chosen",
                "cond1_violated", "obs_delta_chosen", "imbalance_log_ratio"):  # fmt: skip
        assert col in probes.columns, col
    s2 = probes[probes.step == 2].set_index("pair_id")
    s0 = probes[probes.step == 0].set_index("pair_id")
    assert ((s2["chosen"] - s0["chosen"]) - s2["obs_delta_chosen"]).abs().max() < 1e-5
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    probe_rows = [r for r in rows if r["split"] == "probe"]
    assert [r["step"] for r in probe_rows] == [0, 2, 4]
    assert "probe/frac_cond1_violated" in probe_rows[0] and "probe/cosine" in probe_rows[0]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert all(-1.0 <= r["entanglement/cosine"] <= 1.0 for r in train_rows)
    assert all(0.0 <= r["entanglement/frac_cond1_violated"] <= 1.0 for r in train_rows)


def test_probe_cli_end_to_end(tmp_path) -> None:
    """`preflens probe` on a saved tiny model: parquet rows match the library's numbers for a pair."""
    import json

    import pandas as pd
    from typer.testing import CliRunner

    from preflens.cli import app
    from preflens.data.collate import collate_pairs, tokenize_pairs
    from preflens.data.formats import load_pairs
    from preflens.data.synthetic import sentiment_pairs
    from preflens.models import tiny_model

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_pairs(6, seed=1, response_length=4)))
    model, tok = tiny_model(hidden_size=32, seed=0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "probe.parquet"
    res = CliRunner().invoke(
        app,
        ["probe", "--model", str(tmp_path / "m"), "--data", str(data), "-o", str(out), "--token-level", "1"],
    )
    assert res.exit_code == 0, res.output
    assert "condition 1 violated" in res.output
    df = pd.read_parquet(out)
    assert len(df) == 6 and df["pair_id"].tolist() == list(range(6))
    assert df["token/sentence_inner"].notna().sum() == 1
    # pair 0 alone, through the library: same inner product and cosine
    pairs, _ = load_pairs(data)
    items, _ = tokenize_pairs(pairs, tok)
    batch = collate_pairs([it for it in items if it.pair_id == 0], tok.pad_token_id)
    g = sequence_gram(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    assert df.loc[0, "inner"] == pytest.approx(float(g[0, 1]), rel=1e-4)
    assert df.loc[0, "cosine"] == pytest.approx(float(g[0, 1] / (g[0, 0] * g[1, 1]).sqrt()), rel=1e-4)
