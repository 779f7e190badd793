"""Gradient imbalance (Ma et al. 2025, arXiv 2502.20847, Eq. 2) against the paper's closed forms and autograd in probability space."""

from __future__ import annotations

import math

import torch

from preflens.diagnostics.imbalance import (
    balanced_dpo_lambda,
    gradient_imbalance,
    imbalance_from_margin_weights,
    imbalance_metrics,
)
from preflens.losses import PairLogps, get_loss, margin_weights


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
    expect = (p.rejected - p.chosen).exp()  # Ma et al. 2025, Eq. 2
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


def test_imbalance_from_margin_weights_is_the_written_out_formula() -> None:
    """log ratio = log|d_w| - log|d_l| + log pi_l - log pi_w (Ma et al. 2025, arXiv 2502.20847, Eq. 2 for
    any loss), NaN where both weights vanish; lambda_w = rejected / (chosen + rejected)."""
    d_w = torch.tensor([0.2, -0.5, 0.0, 0.0, 1e-3], dtype=torch.float64)
    d_l = torch.tensor([0.1, 0.25, 0.0, 0.3, 2.0], dtype=torch.float64)
    chosen = torch.tensor([-2.0, -5.0, -1.0, -4.0, -900.0], dtype=torch.float64)
    rejected = torch.tensor([-3.0, -4.0, -2.0, -1.0, -10.0], dtype=torch.float64)
    st = imbalance_from_margin_weights(d_w, d_l, chosen, rejected)
    for i in (0, 1, 4):
        want = math.log(abs(float(d_w[i]))) - math.log(abs(float(d_l[i]))) + float(rejected[i] - chosen[i])
        assert math.isclose(float(st.log_ratio[i]), want, rel_tol=1e-12)
        lam = float(rejected[i]) / float(chosen[i] + rejected[i])
        assert math.isclose(float(st.lambda_w[i]), lam, rel_tol=1e-12)
    assert math.isnan(float(st.log_ratio[2])) and float(st.log_ratio[3]) == -math.inf
    assert math.isinf(float(st.ratio[4])) and st.d_w is d_w and st.d_l is d_l
    assert st.log_ratio.dtype == torch.float64


def test_imbalance_from_margin_weights_is_bit_identical_to_the_trainer_formula() -> None:
    """The expression the trainer wrote by hand (training.metrics) gives the same bits: one owner now."""
    g = torch.Generator().manual_seed(0)
    d_w = torch.randn(64, generator=g, dtype=torch.float64)
    d_l = torch.randn(64, generator=g, dtype=torch.float64)
    d_w[:4] = 0.0
    d_l[2:6] = 0.0
    chosen = -torch.rand(64, generator=g, dtype=torch.float64) * 300
    rejected = -torch.rand(64, generator=g, dtype=torch.float64) * 300
    chosen[7] = rejected[7] = 0.0
    dw, dl = d_w.abs(), d_l.abs()
    log_ratio = torch.log(dw) - torch.log(dl) + (rejected - chosen)
    log_ratio = torch.where((dw == 0) & (dl == 0), torch.full_like(log_ratio, math.nan), log_ratio)
    lam = balanced_dpo_lambda(chosen, rejected)
    st = imbalance_from_margin_weights(d_w, d_l, chosen, rejected)
    assert torch.equal(st.log_ratio.nan_to_num(7.0), log_ratio.nan_to_num(7.0))
    assert torch.equal(st.ratio.nan_to_num(7.0), log_ratio.exp().nan_to_num(7.0))
    assert torch.equal(st.lambda_w, lam)
    assert imbalance_metrics(st) == imbalance_metrics(type(st)(log_ratio, log_ratio.exp(), lam, d_w, d_l))


def test_gradient_imbalance_goes_through_imbalance_from_margin_weights() -> None:
    p = _pairs()
    loss_fn = get_loss("ipo")
    st = gradient_imbalance(loss_fn, p)
    d_w, d_l = margin_weights(loss_fn, p)
    ref = imbalance_from_margin_weights(d_w.double(), d_l.double(), p.chosen.double(), p.rejected.double())
    assert torch.equal(st.log_ratio, ref.log_ratio.float()) and torch.equal(st.ratio, ref.ratio.float())
    assert torch.equal(st.lambda_w, ref.lambda_w.float())
    assert torch.equal(st.d_w, d_w) and st.d_w.dtype == p.chosen.dtype
