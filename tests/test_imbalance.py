"""Gradient imbalance (seed 004, Eq. 2) against the paper's closed forms and autograd in probability space."""

from __future__ import annotations

import math

import torch

from preflens.diagnostics.imbalance import balanced_dpo_lambda, gradient_imbalance, imbalance_metrics
from preflens.losses import PairLogps, get_loss


def _pairs() -> PairLogps:
    chosen = torch.tensor([-2.0, -5.0, -1.5, -8.0])
    rejected = torch.tensor([-3.0, -4.0, -6.0, -2.5])
    return PairLogps(
        chosen=chosen,
        rejected=rejected,
        ref_chosen=chosen + torch.tensor([0.3, -0.2, 0.1, 0.0]),
        ref_rejected=rejected + torch.tensor([-0.1, 0.4, 0.2, -0.3]),
        chosen_len=torch.tensor([3, 4, 2, 5]),
        rejected_len=torch.tensor([4, 3, 5, 2]),
    )


def _prob_space_ratio(name: str, p: PairLogps) -> torch.Tensor:
    """|dL/dpi_w| / |dL/dpi_l| by autograd with the probabilities themselves as leaves."""
    pi_w = p.chosen.double().exp().requires_grad_(True)
    pi_l = p.rejected.double().exp().requires_grad_(True)
    q = PairLogps(
        chosen=pi_w.log(),
        rejected=pi_l.log(),
        ref_chosen=p.ref_chosen.double(),
        ref_rejected=p.ref_rejected.double(),
        chosen_len=p.chosen_len,
        rejected_len=p.rejected_len,
    )
    gw, gl = torch.autograd.grad(get_loss(name)(q).sum(), (pi_w, pi_l))
    return gw.abs() / gl.abs()


def test_dpo_ratio_is_pi_l_over_pi_w() -> None:
    p = _pairs()
    st = gradient_imbalance(get_loss("dpo"), p)
    expect = (p.rejected - p.chosen).exp()  # seed 004, Eq. 2
    assert torch.allclose(st.ratio, expect, rtol=1e-5)
    assert torch.allclose(st.ratio.double(), _prob_space_ratio("dpo", p), rtol=1e-5)


def test_bdpo_ratio_and_lambda() -> None:
    p = _pairs()
    st = gradient_imbalance(get_loss("bdpo"), p)
    # Balanced-DPO: -pi_l log pi_l / (pi_w log pi_w), in absolute value
    expect = (p.rejected.exp() * p.rejected) / (p.chosen.exp() * p.chosen)
    assert torch.allclose(st.ratio, expect, rtol=1e-5)
    assert torch.allclose(st.ratio.double(), _prob_space_ratio("bdpo", p), rtol=1e-5)
    assert torch.allclose(st.lambda_w, p.rejected / (p.chosen + p.rejected))
    assert float(balanced_dpo_lambda(torch.tensor([0.0]), torch.tensor([0.0]))) == 0.5


def test_other_losses_match_probability_space_autograd() -> None:
    p = _pairs()
    for name in ("ipo", "simpo", "cpo", "rdpo", "sppo"):
        st = gradient_imbalance(get_loss(name), p)
        ok = torch.isfinite(st.log_ratio)
        assert torch.allclose(st.ratio[ok].double(), _prob_space_ratio(name, p)[ok], rtol=1e-4), name


def test_log_space_survives_long_sequences() -> None:
    p = PairLogps(
        chosen=torch.tensor([-900.0, -10.0]),
        rejected=torch.tensor([-10.0, -11.0]),
        ref_chosen=torch.tensor([-900.0, -10.0]),
        ref_rejected=torch.tensor([-10.0, -11.0]),
    )
    st = gradient_imbalance(get_loss("dpo"), p)
    assert math.isclose(float(st.log_ratio[0]), 890.0, rel_tol=1e-6)
    assert math.isinf(float(st.ratio[0]))
    m = imbalance_metrics(st)
    assert math.isfinite(m["imbalance/log_ratio"]) and m["imbalance/ratio"] > 0
