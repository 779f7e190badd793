"""The first-order prediction for the optimizer's own update (`diagnostics.update_prediction`):
<g_i, delta theta> against the change observed by scoring the sequences before and after one real step."""

from __future__ import annotations

import pytest
import torch

from preflens.diagnostics.update_prediction import prediction_agreement, update_prediction
from preflens.logprobs import pair_logps_from_batch, sequence_logps
from preflens.losses import get_loss
from test_entanglement import logps, shared_prefix_pairs
from test_gram import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_step(model, batch, opt) -> list[torch.Tensor]:
    """One DPO step (reference = the start); returns the parameters before it."""
    before = [p.detach().clone() for p in model.parameters()]
    ref = logps(model, batch)
    b = batch["pair_index"].numel()
    seq = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    p = pair_logps_from_batch(seq, (ref[:b], ref[b:]))
    get_loss("dpo", beta=0.1)(p).mean().backward()
    opt.step()
    opt.zero_grad()
    return before


@pytest.mark.parametrize("opt_name,lr", [("adamw", 1e-4), ("sgd", 1e-2)])
def test_prediction_matches_the_observed_change_of_one_step(opt_name, lr):
    torch.manual_seed(0)
    model = tiny_llama().float()
    batch = shared_prefix_pairs(8)
    opt = (
        torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        if opt_name == "adamw"
        else torch.optim.SGD(model.parameters(), lr=lr)
    )
    start = logps(model, batch)
    before = _one_step(model, batch, opt)
    observed = logps(model, batch) - start  # the reference: score before and after, nothing else
    res = update_prediction(model, batch, before)
    torch.testing.assert_close(res["obs"].float(), observed, atol=1e-5, rtol=0)
    agree = (torch.sign(res["pred"]) == torch.sign(observed.double())).double().mean()
    assert agree >= 0.95, (res["pred"], observed)
    # small step: first order is close in value too (the cut-off is loose on purpose, not a tuning)
    rel = (res["pred"] - observed.double()).abs().max() / observed.double().abs().max()
    assert rel < 0.2
    # the model holds the updated parameters again
    torch.testing.assert_close(logps(model, batch) - start, observed)


def test_sgd_prediction_is_minus_lr_times_the_gradient_inner_product():
    """For plain SGD the update is -lr * grad L, so <g_i, delta> = -lr <g_i, grad L>: written out with an
    explicit per-sequence autograd loop."""
    torch.manual_seed(1)
    model = tiny_llama().double()
    batch = shared_prefix_pairs(4)
    lr = 1e-3
    params = list(model.parameters())
    ref = logps(model, batch)
    b = 4
    seq = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    loss = get_loss("dpo", beta=0.1)(pair_logps_from_batch(seq, (ref[:b], ref[b:]))).mean()
    g_loss = torch.autograd.grad(loss, params, retain_graph=True)
    expected = []
    for i in range(2 * b):
        gi = torch.autograd.grad(seq.logps[i], params, retain_graph=True)
        expected.append(-lr * sum(float((a * c).sum()) for a, c in zip(gi, g_loss)))
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, g_loss):
            p -= lr * g
    res = update_prediction(model, batch, before)
    torch.testing.assert_close(
        res["pred"], torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-12
    )


def test_agreement_summary_counts_signs_and_skips_unmoved():
    import pandas as pd

    t = pd.DataFrame(
        {
            "update_pred_chosen": [1.0, -1.0, 2.0, float("nan")],
            "update_obs_chosen": [0.5, 0.5, 1e-9, 1.0],
            "update_pred_rejected": [-1.0, -2.0, -3.0, -4.0],
            "update_obs_rejected": [-1.0, -1.5, -2.0, -2.5],
        }
    )
    agree, corr, n = prediction_agreement(t, tol=1e-6)
    # chosen: rows 0 (agree), 1 (disagree); row 2 unmoved, row 3 NaN; rejected: 4 of 4 agree -> 5 / 6
    assert n == 6 and agree == pytest.approx(5 / 6)
    assert corr is not None and -1 <= corr <= 1
