"""Normalized PO (Yuan et al. 2024, arXiv 2410.13828, Sec. 5.1): chosen rises and rejected falls for every
pair, where DPO does not.

Each pair gets its own small SGD step (the paper's per-pair first-order argument) on a tiny model
whose rejected responses extend the chosen ones (strongly entangled gradients).
"""

from __future__ import annotations

import copy

import pytest
import torch

from preflens.grad import sequence_grad_norms
from preflens.logprobs import pair_logps_from_batch, sequence_logps
from preflens.losses import PairLogps, get_loss
from test_entanglement import shared_prefix_pairs
from test_gram import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

B = 8


def _pair(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: torch.cat([v[i : i + 1], v[B + i : B + i + 1]]) for k, v in batch.items() if k != "pair_index"}


def _step(model, sub, ref, name: str, lr: float) -> tuple[float, float]:
    """(change of chosen, change of rejected) after one SGD step on this pair's loss."""
    m = copy.deepcopy(model)
    args = (sub["input_ids"], sub["attention_mask"], sub["response_mask"])
    seq = sequence_logps(m, *args)
    p = pair_logps_from_batch(seq, ref)
    if name == "normalized":
        norms = sequence_grad_norms(m, *args)
        p.chosen_grad_norm, p.rejected_grad_norm = norms[:1], norms[1:]
    get_loss(name)(p).sum().backward()
    with torch.no_grad():
        for q in m.parameters():
            q -= lr * q.grad
        new = sequence_logps(m, *args).logps
    d = new - seq.logps.detach()
    return float(d[0]), float(d[1])


def test_normalized_moves_every_pair_the_right_way_where_dpo_does_not() -> None:
    model = tiny_llama(seed=0)
    batch = shared_prefix_pairs(b=B)
    with torch.no_grad():
        lp = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"]).logps
    dpo_both_fell = 0
    for i in range(B):
        sub = _pair(batch, i)
        ref = (lp[i : i + 1], lp[B + i : B + i + 1])
        dc, dr = _step(model, sub, ref, "dpo", lr=1e-3)
        dpo_both_fell += dc < 0 and dr < 0
        nc, nr = _step(model, sub, ref, "normalized", lr=1e-1)
        assert nc > 0 and nr < 0, (i, nc, nr)
    assert dpo_both_fell >= 1


def test_normalized_loss_formula_and_gradient_weights() -> None:
    chosen = torch.tensor([-3.0, -7.0], requires_grad=True)
    rejected = torch.tensor([-4.0, -2.0], requires_grad=True)
    p = PairLogps(
        chosen=chosen,
        rejected=rejected,
        ref_chosen=torch.tensor([-3.5, -6.0]),
        ref_rejected=torch.tensor([-4.2, -2.5]),
        chosen_grad_norm=torch.tensor([2.0, 5.0]),
        rejected_grad_norm=torch.tensor([4.0, 1.0]),
    )
    beta = 0.1
    loss = get_loss("normalized", beta=beta)(p)
    c = beta * torch.sigmoid(-beta * ((chosen - p.ref_chosen) - (rejected - p.ref_rejected)))
    assert torch.allclose(loss, c * (rejected / p.rejected_grad_norm - chosen / p.chosen_grad_norm))
    gw, gl = torch.autograd.grad(loss.sum(), (chosen, rejected))
    # the weights are c/|g_w| and c/|g_l| exactly: c and the norms carry no gradient
    assert torch.allclose(-gw, c.detach() / p.chosen_grad_norm)
    assert torch.allclose(gl, c.detach() / p.rejected_grad_norm)
