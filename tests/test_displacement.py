"""Single-token likelihood displacement (Razin et al. 2024, arXiv 2410.08847) and the run-directory tables."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from preflens.diagnostics.displacement import (
    ches_vs_change,
    chosen_change_table,
    max_decrease,
    single_token_dpo,
    unembedding_prediction,
)


def _tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def test_max_decrease_is_largest_later_drop():
    # brute force over t < t' as the paper's code defines it
    for traj in ([0.9, 0.5, 0.95, 0.1, 0.3], [0.1, 0.2, 0.3], [0.5], [0.4, 0.4, 0.1, 0.9, 0.85]):
        want = max([traj[t] - traj[u] for t in range(len(traj)) for u in range(t + 1, len(traj))] + [0.0])
        assert max_decrease(traj) == pytest.approx(want)


def test_unembedding_prediction_is_inner_product():
    w = torch.randn(10, 4)
    pred = unembedding_prediction(w, 2, 7)
    for z in range(10):
        assert pred[z].item() == pytest.approx(torch.dot(w[z], w[2] - w[7]).item(), rel=1e-5)


def test_features_model_first_step_follows_unembedding_geometry():
    """The theorem's setting (h and W trainable, one small SGD step): the change of ln pi(z) for
    z not in {y+, y-}, centred to remove the shared normaliser, has the sign of <W_z, W_y+ - W_y->
    (centred) for (almost) every token; checked here against an explicit autograd step."""
    model = _tiny()
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    yp, ym = 5, 17
    res = single_token_dpo(model, prompt, yp, ym, steps=1, lr=1e-3, optimizer="sgd", mode="features")
    assert res.sign_agreement > 0.95
    assert res.rank_correlation > 0.95

    # independent recomputation of the same step with plain autograd
    with torch.no_grad():
        h0 = model(input_ids=prompt, output_hidden_states=True).hidden_states[-1][0, -1].double()
    w0 = model.lm_head.weight.detach().double()
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    logp = F.log_softmax(w @ h, -1)
    ref = logp.detach()
    margin = 0.1 * ((logp[yp] - ref[yp]) - (logp[ym] - ref[ym]))
    (-F.logsigmoid(margin)).backward()
    with torch.no_grad():
        logp1 = F.log_softmax((w - 1e-3 * w.grad) @ (h - 1e-3 * h.grad), -1)
        # W_z for z not in {y+, y-} gets no gradient from DPO (the softmax terms cancel)
        others = [z for z in range(128) if z not in (yp, ym)]
        assert w.grad[others].abs().max() < 1e-7
        change = (logp1 - ref)[others]
        pred = (w0 @ (w0[yp] - w0[ym]))[others]
        agree = ((change - change.mean() > 0) == (pred - pred.mean() > 0)).float().mean()
    assert agree > 0.95
    assert res.p_chosen[-1] == pytest.approx(logp1[yp].exp().item(), rel=1e-4)


def test_full_model_step_raises_margin_and_reports_top_tokens():
    model = _tiny()
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = single_token_dpo(model, prompt, 3, 9, steps=5, lr=1e-3, optimizer="rmsprop", top_k=5)
    assert len(res.p_chosen) == 6 and len(res.top_increase) == 5
    margin0 = torch.log(torch.tensor(res.p_chosen[0] / res.p_rejected[0]))
    margin1 = torch.log(torch.tensor(res.p_chosen[-1] / res.p_rejected[-1]))
    assert margin1 > margin0  # DPO did its job on the margin
    gains = [t.p_after - t.p_before for t in res.top_increase]
    assert gains == sorted(gains, reverse=True)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def _write_run(tmp_path, rows):
    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame(rows).to_parquet(run / "pairs.parquet")
    return run


def test_chosen_change_table_uses_first_and_last_eval(tmp_path):
    rows = []
    # pair 0: chosen falls; pair 1: chosen rises; evals at steps 0, 10, 20 written out of order
    for step, c0, c1 in [(20, -9.0, -3.0), (0, -5.0, -4.0), (10, -7.0, -3.5)]:
        rows.append(
            dict(
                step=step,
                split="train",
                pair_id=0,
                chosen=c0,
                rejected=-6.0,
                ref_chosen=-5.0,
                ref_rejected=-6.0,
            )
        )
        rows.append(
            dict(
                step=step,
                split="train",
                pair_id=1,
                chosen=c1,
                rejected=-8.0 - step,
                ref_chosen=-4.0,
                ref_rejected=-8.0,
            )
        )
    run = _write_run(tmp_path, rows)
    t = chosen_change_table(run).set_index("pair_id")
    assert t.loc[0, "first_step"] == 0 and t.loc[0, "last_step"] == 20
    assert t.loc[0, "chosen_change"] == pytest.approx(-4.0) and bool(t.loc[0, "chosen_fell"])
    assert t.loc[1, "chosen_change"] == pytest.approx(1.0) and not bool(t.loc[1, "chosen_fell"])
    assert t.loc[1, "rejected_change"] == pytest.approx(-20.0)


def test_ches_vs_change_orders_by_score(tmp_path):
    rows = []
    for pid in range(8):
        rows.append(
            dict(
                step=0,
                split="train",
                pair_id=pid,
                chosen=-5.0,
                rejected=-5.0,
                ref_chosen=-5.0,
                ref_rejected=-5.0,
            )
        )
        rows.append(
            dict(
                step=5,
                split="train",
                pair_id=pid,
                chosen=-5.0 - pid,
                rejected=-9.0,
                ref_chosen=-5.0,
                ref_rejected=-5.0,
            )
        )
    run = _write_run(tmp_path, rows)
    scores = pd.DataFrame(
        {"pair_index": range(8), "score": [float(p) for p in range(8)], "edit_similarity": [0.5] * 8}
    )
    scores.to_parquet(tmp_path / "scores.parquet")
    res = ches_vs_change(tmp_path / "scores.parquet", run)
    assert res.spearman_ches == pytest.approx(-1.0)  # higher CHES, larger fall
    assert list(res.by_quartile["pairs"]) == [2, 2, 2, 2]
    assert list(res.by_quartile["frac_fell"]) == [0.5, 1.0, 1.0, 1.0]


def test_full_model_first_step_sign_matches_geometry_for_most_tokens():
    """The real (tiny) model, all parameters, one small SGD step: the hidden state moves mostly along
    W_y+ - W_y-, so the prediction still has the observed sign for most tokens (Razin et al. 2024, arXiv 2410.08847, Sec. 4)."""
    model = _tiny(seed=2)
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    yp, ym = 11, 40
    with torch.no_grad():
        logp0 = F.log_softmax(model(input_ids=prompt).logits[0, -1].double(), -1)
    w0 = model.lm_head.weight.detach().double().clone()
    single_token_dpo(model, prompt, yp, ym, steps=1, lr=1e-2, optimizer="sgd")
    with torch.no_grad():
        logp1 = F.log_softmax(model(input_ids=prompt).logits[0, -1].double(), -1)
    others = [z for z in range(128) if z not in (yp, ym)]
    change = (logp1 - logp0)[others]
    pred = (w0 @ (w0[yp] - w0[ym]))[others]
    agree = ((change - change.mean() > 0) == (pred - pred.mean() > 0)).double().mean()
    assert agree > 0.75


def test_ches_vs_change_on_a_real_training_run(tmp_path):
    """Integration: `preflens train` writes pairs.parquet, `preflens ches` scores the same data, and the
    join matches every train-subset pair (pair ids are the dataset rows in both)."""
    import json

    from preflens.data.synthetic import sentiment_pairs
    from preflens.diagnostics.ches_scan import run_ches
    from preflens.models import tiny_model
    from preflens.train import TrainConfig, train

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_pairs(12, seed=0, shared_tokens=1)))
    model, tok = tiny_model(seed=0)
    cfg = TrainConfig(
        data=str(data), output_dir=str(tmp_path / "run"), steps=2, batch_size=4, eval_every=2, lr=1e-3,
        eval_fraction=0.25, pairs_train_subset=8, report_to="none", progress=False, save_every=0,
    )  # fmt: skip
    run = train(cfg, model=model, tokenizer=tok)
    fresh, _ = tiny_model(seed=0)  # the scores belong to the model DPO starts from
    run_ches(model="tiny", data=data, output=tmp_path / "s.parquet", progress=False, _model_obj=(fresh, tok))
    res = ches_vs_change(tmp_path / "s.parquet", run)
    table = chosen_change_table(run, split="train")
    assert len(res.table) == len(table) > 0
    assert set(res.table["pair_id"]) == set(table["pair_id"])
    assert (table["last_step"] > table["first_step"]).all()


def test_chosen_change_table_counts_falls_beyond_the_runs_noise_threshold(tmp_path):
    """A float32 run counts a chosen drop of more than 1e-4 nats as a fall, a bf16 run more than 1e-2
    (`preflens.train.fell_tolerance`): the same threshold as the trainer's metrics and the report."""
    import pandas as pd

    from preflens.diagnostics.displacement import chosen_change_table
    from preflens.tracking import write_config

    drops = [5e-5, 1e-3, 0.5]  # noise, a float32-visible fall, a fall in any precision
    rows = [
        dict(step=s, split="eval", pair_id=i, chosen=-10.0 - (d if s else 0.0), rejected=-12.0)
        for i, d in enumerate(drops)
        for s in (0, 5)
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "pairs.parquet")
    for dtype, expected in [("float32", [False, True, True]), ("bfloat16", [False, False, True])]:
        write_config(tmp_path, {"dtype": dtype, "mixed_precision": "no"})
        assert chosen_change_table(tmp_path)["chosen_fell"].tolist() == expected, dtype
    assert chosen_change_table(tmp_path, fell_tol=0.0)["chosen_fell"].tolist() == [True, True, True]
