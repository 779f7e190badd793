"""Every loss in DESIGN.md's table against the formula written out independently here.

Values and gradients w.r.t. chosen/rejected/ref_chosen/ref_rejected are compared in float64 to 1e-6.
The reference formulas below use only math on Python floats-as-tensors, not preflens code.
"""

from __future__ import annotations

import math

import pytest
import torch

from preflens.errors import PreflensError
from preflens.losses import LOSSES, PairLogps, get_loss, loss_hparams, margin_weights


@pytest.fixture(autouse=True)
def _float64():
    """float64 for this module only (the default dtype is process-global)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def logsig(x):
    # log sigma(x) written out, stable for the ranges used here
    return -torch.log1p(torch.exp(-x))


def relu(x):
    return torch.where(x > 0, x, torch.zeros_like(x))


# name -> (hparams to use, reference formula f(c, r, rc, rr, nw, nl, hp))
REFERENCE = {
    "dpo": ({"beta": 0.3}, lambda c, r, rc, rr, nw, nl, h: -logsig(h["beta"] * ((c - rc) - (r - rr)))),
    "ipo": (
        {"beta": 0.2},
        lambda c, r, rc, rr, nw, nl, h: (((c - rc) / nw - (r - rr) / nl) - 1 / (2 * h["beta"])) ** 2,
    ),
    "simpo": (
        {"beta": 2.5, "gamma": 0.7},
        lambda c, r, rc, rr, nw, nl, h: -logsig(h["beta"] * (c / nw - r / nl) - h["gamma"]),
    ),
    "cpo": (
        {"beta": 0.2, "alpha": 0.5},
        lambda c, r, rc, rr, nw, nl, h: -logsig(h["beta"] * (c - r)) - h["alpha"] * c / nw,
    ),
    "slic": (
        {"delta": 2.0, "lam": 0.3},
        lambda c, r, rc, rr, nw, nl, h: relu(h["delta"] - (c - r)) - h["lam"] * c / nw,
    ),
    "rrhf": ({"lam": 0.5}, lambda c, r, rc, rr, nw, nl, h: relu(r / nl - c / nw) - h["lam"] * c / nw),
    "dpop": (
        {"beta": 0.1, "lam": 5.0},
        lambda c, r, rc, rr, nw, nl, h: -logsig(h["beta"] * ((c - rc) - (r - rr) - h["lam"] * relu(rc - c))),
    ),
    "rdpo": (
        {"beta": 0.1, "alpha": 0.05},
        lambda c, r, rc, rr, nw, nl, h: -logsig(h["beta"] * ((c - rc) - (r - rr)) - h["alpha"] * (nw - nl)),
    ),
    "sppo": (
        {"beta": 0.5},
        lambda c, r, rc, rr, nw, nl, h: (
            ((c - rc) - 1 / (2 * h["beta"])) ** 2 + ((r - rr) + 1 / (2 * h["beta"])) ** 2
        ),
    ),
    "rpo": (
        {"beta": 0.1, "alpha": 0.4},
        lambda c, r, rc, rr, nw, nl, h: -logsig(h["beta"] * ((c - rc) - (r - rr))) - h["alpha"] * c / nw,
    ),
    "bdpo": (
        {"beta": 1.0},
        lambda c, r, rc, rr, nw, nl, h: (
            -logsig(
                h["beta"]
                * (
                    (r.detach() / (c.detach() + r.detach())) * (c - rc)
                    - (1 - r.detach() / (c.detach() + r.detach())) * (r - rr)
                )
            )
        ),
    ),
    "nbdpo": (
        {"beta": 1.0, "clip": 0.3},
        lambda c, r, rc, rr, nw, nl, h: (
            -logsig(h["beta"] * ((1 + torch.clamp((c - r).detach(), 0.0, h["clip"])) * (c - rc) - (r - rr)))
        ),
    ),
}


def make_inputs(seed: int = 0, b: int = 16):
    g = torch.Generator().manual_seed(seed)
    # log-probs are negative; spread so that hinges and clips are hit on both sides
    c = -torch.rand(b, generator=g) * 40 - 1
    r = -torch.rand(b, generator=g) * 40 - 1
    rc = c + torch.randn(b, generator=g) * 3
    rr = r + torch.randn(b, generator=g) * 3
    nw = torch.randint(1, 30, (b,), generator=g)
    nl = torch.randint(1, 30, (b,), generator=g)
    return c, r, rc, rr, nw, nl


@pytest.mark.parametrize("name", sorted(REFERENCE))
@pytest.mark.parametrize("use_defaults", [False, True])
def test_loss_value_and_gradient_match_formula(name, use_defaults):
    hp, ref = REFERENCE[name]
    if use_defaults:
        hp = loss_hparams(name)
    c, r, rc, rr, nw, nl = make_inputs(seed=hash(name) % 1000)
    leaves = [x.clone().requires_grad_(True) for x in (c, r, rc, rr)]
    p = PairLogps(
        chosen=leaves[0],
        rejected=leaves[1],
        ref_chosen=leaves[2],
        ref_rejected=leaves[3],
        chosen_len=nw,
        rejected_len=nl,
    )
    got = get_loss(name, **({} if use_defaults else hp))(p)
    assert got.shape == (16,)
    got_grads = torch.autograd.grad(got.sum(), leaves, allow_unused=True)

    leaves2 = [x.clone().requires_grad_(True) for x in (c, r, rc, rr)]
    want = ref(*leaves2, nw.double(), nl.double(), hp)
    want_grads = torch.autograd.grad(want.sum(), leaves2, allow_unused=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for g1, g2 in zip(got_grads, want_grads):
        g1 = torch.zeros_like(c) if g1 is None else g1
        g2 = torch.zeros_like(c) if g2 is None else g2
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-6)


def test_defaults_are_the_design_table():
    assert loss_hparams("dpo") == {"beta": 0.1}
    assert loss_hparams("ipo") == {"beta": 0.1, "length_normalize": True}
    assert loss_hparams("simpo") == {"beta": 2.0, "gamma": 1.0}
    assert loss_hparams("cpo") == {"beta": 0.1, "alpha": 1.0}
    assert loss_hparams("slic") == {"delta": 1.0, "lam": 0.1}
    assert loss_hparams("rrhf") == {"lam": 1.0}
    assert loss_hparams("dpop") == {"beta": 0.1, "lam": 50.0}
    assert loss_hparams("rdpo") == {"beta": 0.1, "alpha": 0.01}
    assert loss_hparams("sppo") == {"beta": 0.1}
    assert loss_hparams("rpo") == {"beta": 0.1, "alpha": 1.0}
    assert loss_hparams("bdpo") == {"beta": 1.0}
    assert loss_hparams("nbdpo") == {"beta": 1.0, "clip": 0.3, "symmetric": False}
    assert loss_hparams("sparse") == {"beta": 0.1, "mask": "diff", "l1": 0.01}


def test_ipo_without_length_normalization_is_razins_form():
    c, r, rc, rr, nw, nl = make_inputs(3)
    p = PairLogps(chosen=c, rejected=r, ref_chosen=rc, ref_rejected=rr, chosen_len=nw, rejected_len=nl)
    got = get_loss("ipo", beta=0.1, length_normalize=False)(p)
    torch.testing.assert_close(got, ((c - rc) - (r - rr) - 5.0) ** 2)


def test_nbdpo_symmetric_clip_lower_bound():
    c = torch.tensor([-10.0, -2.0])
    r = torch.tensor([-2.0, -10.0])
    rc, rr = c - 1.0, r + 1.0
    p = PairLogps(
        chosen=c,
        rejected=r,
        ref_chosen=rc,
        ref_rejected=rr,
        chosen_len=torch.tensor([3, 3]),
        rejected_len=torch.tensor([3, 3]),
    )
    clip = 0.3
    lam = 1 + torch.tensor([1 / (1 + clip) - 1, clip])  # chosen - rejected = -8 -> d_min, +8 -> clip
    want = -logsig(1.0 * (lam * (c - rc) - (r - rr)))
    torch.testing.assert_close(get_loss("nbdpo", symmetric=True)(p), want)


def test_bdpo_gradient_ratio_is_the_papers_balance():
    """Seed 004: dL/dpi_w : dL/dpi_l = -pi_l log pi_l / (pi_w log pi_w)."""
    lw = torch.tensor([-0.5, -3.0, -7.0]).requires_grad_(True)
    ll = torch.tensor([-2.0, -1.0, -9.0]).requires_grad_(True)
    p = PairLogps(
        chosen=lw,
        rejected=ll,
        ref_chosen=lw.detach() - 0.3,
        ref_rejected=ll.detach() + 0.2,
        chosen_len=torch.ones(3),
        rejected_len=torch.ones(3),
    )
    loss = get_loss("bdpo")(p).sum()
    gw, gl = torch.autograd.grad(loss, (lw, ll))
    # dL/dpi = dL/dlogpi / pi
    pw, pl = lw.detach().exp(), ll.detach().exp()
    ratio = (gw / pw) / (gl / pl)
    want = -(pl * ll.detach()) / (pw * lw.detach())
    torch.testing.assert_close(ratio, want)


def test_dpo_gradient_ratio_is_the_imbalance():
    """Seed 004, Eq. 2: for DPO dL/dpi_w : dL/dpi_l = -pi_l / pi_w."""
    lw = torch.tensor([-0.5, -3.0]).requires_grad_(True)
    ll = torch.tensor([-2.0, -1.0]).requires_grad_(True)
    p = PairLogps(chosen=lw, rejected=ll, ref_chosen=torch.zeros(2), ref_rejected=torch.zeros(2))
    gw, gl = torch.autograd.grad(get_loss("dpo")(p).sum(), (lw, ll))
    ratio = (gw / lw.detach().exp()) / (gl / ll.detach().exp())
    torch.testing.assert_close(ratio, -(ll.detach().exp() / lw.detach().exp()))


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_margin_weights_are_minus_dl_dchosen_and_dl_drejected(name):
    hp, ref = REFERENCE[name]
    c, r, rc, rr, nw, nl = make_inputs(7)
    p = PairLogps(chosen=c, rejected=r, ref_chosen=rc, ref_rejected=rr, chosen_len=nw, rejected_len=nl)
    d_w, d_l = margin_weights(get_loss(name, **hp), p)
    cc, rr_ = c.clone().requires_grad_(True), r.clone().requires_grad_(True)
    want = ref(cc, rr_, rc, rr, nw.double(), nl.double(), hp)
    gc, gr = torch.autograd.grad(want.sum(), (cc, rr_))
    torch.testing.assert_close(d_w, -gc)
    torch.testing.assert_close(d_l, gr)


def test_dpo_margin_weights_closed_form():
    """DPO: d_w = d_l = beta sigma(-beta (r_w - r_l)) (Yuan et al. 2024, arXiv 2410.13828, Sec. 3)."""
    c, r, rc, rr, nw, nl = make_inputs(11)
    p = PairLogps(chosen=c, rejected=r, ref_chosen=rc, ref_rejected=rr)
    d_w, d_l = margin_weights(get_loss("dpo", beta=0.1), p)
    want = 0.1 / (1 + torch.exp(0.1 * ((c - rc) - (r - rr))))
    torch.testing.assert_close(d_w, want)
    torch.testing.assert_close(d_l, want)


def _sparse_reference(tw, tl, rtw, rtl, mw, ml, iw, il, beta):
    b = tw.shape[0]
    out = []
    for i in range(b):
        cw = [int(x) for x, m in zip(iw[i], mw[i]) if m]
        cl = [int(x) for x, m in zip(il[i], ml[i]) if m]
        sw = 0.0
        for j in range(len(cw)):
            if j >= len(cl) or cw[j] != cl[j]:
                sw = sw + (tw[i, j] - rtw[i, j])
        sl = 0.0
        for j in range(len(cl)):
            if j >= len(cw) or cw[j] != cl[j]:
                sl = sl + (tl[i, j] - rtl[i, j])
        out.append(-logsig(torch.as_tensor(beta * (sw - sl))))
    return torch.stack(out)


def test_sparse_diff_mask_matches_written_out_loop():
    g = torch.Generator().manual_seed(5)
    b, lw, ll = 4, 6, 5
    iw = torch.randint(0, 3, (b, lw), generator=g)
    il = torch.randint(0, 3, (b, ll), generator=g)
    mw = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] * 5 + [0]]).bool()
    ml = torch.tensor([[1] * 5, [1] * 5, [1] * 3 + [0] * 2, [1] * 1 + [0] * 4]).bool()
    tw = (-torch.rand(b, lw, generator=g) * 3).requires_grad_(True)
    tl = (-torch.rand(b, ll, generator=g) * 3).requires_grad_(True)
    rtw, rtl = (
        tw.detach() + 0.1 * torch.randn(b, lw, generator=g),
        tl.detach() + 0.1 * torch.randn(b, ll, generator=g),
    )
    p = PairLogps(
        chosen=(tw * mw).sum(1),
        rejected=(tl * ml).sum(1),
        chosen_tokens=tw,
        rejected_tokens=tl,
        ref_chosen_tokens=rtw,
        ref_rejected_tokens=rtl,
        chosen_mask=mw,
        rejected_mask=ml,
        chosen_token_ids=iw,
        rejected_token_ids=il,
    )
    got = get_loss("sparse", beta=0.5)(p)
    want = _sparse_reference(tw, tl, rtw, rtl, mw, ml, iw, il, 0.5)
    torch.testing.assert_close(got, want)
    g1 = torch.autograd.grad(got.sum(), (tw, tl))
    tw2, tl2 = tw.detach().clone().requires_grad_(True), tl.detach().clone().requires_grad_(True)
    g2 = torch.autograd.grad(_sparse_reference(tw2, tl2, rtw, rtl, mw, ml, iw, il, 0.5).sum(), (tw2, tl2))
    for a, bb in zip(g1, g2):
        torch.testing.assert_close(a, bb)


def test_sparse_learned_mask_has_l1_penalty_and_gradient_to_mask():
    b, L = 2, 3
    tw, tl = -torch.rand(b, L), -torch.rand(b, L)
    ones = torch.ones(b, L, dtype=torch.bool)
    logits_w = torch.zeros(b, L, requires_grad=True)
    logits_l = torch.zeros(b, L, requires_grad=True)
    p = PairLogps(
        chosen=tw.sum(1),
        rejected=tl.sum(1),
        chosen_tokens=tw,
        rejected_tokens=tl,
        ref_chosen_tokens=torch.zeros(b, L),
        ref_rejected_tokens=torch.zeros(b, L),
        chosen_mask=ones,
        rejected_mask=ones,
        chosen_mask_logits=logits_w,
        rejected_mask_logits=logits_l,
    )
    got = get_loss("sparse", mask="learned", beta=1.0, l1=0.2)(p)
    want = -logsig(0.5 * tw.sum(1) - 0.5 * tl.sum(1)) + 0.2 * 0.5
    torch.testing.assert_close(got, want)
    gw, _ = torch.autograd.grad(got.sum(), (logits_w, logits_l))
    assert gw.abs().sum() > 0


def test_errors_are_clear():
    with pytest.raises(PreflensError, match="unknown loss 'dop'"):
        get_loss("dop")
    with pytest.raises(PreflensError, match="no hyper-parameter"):
        get_loss("dpo", gamma=1.0)
    p = PairLogps(chosen=torch.zeros(2), rejected=torch.zeros(2))
    with pytest.raises(PreflensError, match="ref_chosen"):
        get_loss("dpo")(p)
    with pytest.raises(PreflensError, match="chosen_len"):
        get_loss("simpo")(p)


def test_registry_holds_the_table():
    table = {
        "dpo",
        "ipo",
        "simpo",
        "cpo",
        "slic",
        "rrhf",
        "dpop",
        "rdpo",
        "sppo",
        "rpo",
        "bdpo",
        "nbdpo",
        "sparse",
    }
    assert table <= set(LOSSES)


def test_stable_for_large_margins():
    c = torch.tensor([-1e4, 0.0])
    r = torch.tensor([0.0, -1e4])
    p = PairLogps(chosen=c, rejected=r, ref_chosen=torch.zeros(2), ref_rejected=torch.zeros(2))
    out = get_loss("dpo", beta=1.0)(p)
    assert torch.isfinite(out).all()
    assert math.isclose(float(out[0]), 1e4, rel_tol=1e-9)


def test_margin_weights_of_token_level_loss_are_mean_token_weights():
    """sparse with every token different (diff mask all ones) is DPO over the token sums: the mean
    per-token weight equals DPO's beta sigma(-beta m) on every token."""
    b, L = 3, 4
    tw, tl = -torch.rand(b, L), -torch.rand(b, L)
    rtw, rtl = tw + 0.2 * torch.randn(b, L), tl + 0.2 * torch.randn(b, L)
    ones = torch.ones(b, L, dtype=torch.bool)
    ids_w, ids_l = torch.zeros(b, L, dtype=torch.long), torch.ones(b, L, dtype=torch.long)
    p = PairLogps(
        chosen=tw.sum(1),
        rejected=tl.sum(1),
        chosen_tokens=tw,
        rejected_tokens=tl,
        ref_chosen_tokens=rtw,
        ref_rejected_tokens=rtl,
        chosen_mask=ones,
        rejected_mask=ones,
        chosen_token_ids=ids_w,
        rejected_token_ids=ids_l,
    )
    d_w, d_l = margin_weights(get_loss("sparse", beta=0.5), p)
    m = (tw - rtw).sum(1) - (tl - rtl).sum(1)
    want = 0.5 / (1 + torch.exp(0.5 * m))
    torch.testing.assert_close(d_w, want)
    torch.testing.assert_close(d_l, want)


# ------------------------------------------------------------------------------------------------
# the package layout (preflens/losses/): registration order, traits, one owner of Balanced-DPO's lambda


def test_registration_order_is_the_loss_table_order():
    """Users see LOSSES's order (`preflens compare`, CLI help): the family imports must keep it."""
    assert list(LOSSES)[:14] == ["dpo", "ipo", "simpo", "cpo", "slic", "rrhf", "dpop", "rdpo", "sppo", "rpo",
                                 "bdpo", "nbdpo", "normalized", "sparse"]  # fmt: skip
    # then TRL's loss types in TRL's order (ipo is already there under its name)
    from preflens.losses import TRL_LOSS_TYPES

    assert list(LOSSES)[14 : 14 + len(TRL_LOSS_TYPES) - 1] == [n for n in TRL_LOSS_TYPES if n != "ipo"]


def test_loss_traits_and_old_module_attributes():
    import preflens.losses as losses
    from preflens.losses import REFERENCE_FREE_LOSSES, TOKEN_LEVEL_LOSSES

    assert TOKEN_LEVEL_LOSSES == frozenset({"sparse"})
    assert REFERENCE_FREE_LOSSES >= frozenset({"simpo", "cpo", "slic", "rrhf", "sft"})
    assert not REFERENCE_FREE_LOSSES & {"dpo", "sigmoid", "ipo", "hinge", "aot", "bdpo"}
    # every loss stays importable by name from preflens.losses, as a function (not a family module)
    for name in LOSSES:
        assert getattr(losses, name) is LOSSES[name], name
    assert callable(losses.diff_token_mask) and callable(losses.balanced_dpo_lambda)


def test_bdpo_uses_the_one_balanced_dpo_lambda():
    """bdpo's loss is DPO-like with rewards weighted by balanced_dpo_lambda (the imbalance diagnostic's)."""
    from preflens.diagnostics.imbalance import balanced_dpo_lambda as lam_diag
    from preflens.losses.balanced import balanced_dpo_lambda

    assert lam_diag is balanced_dpo_lambda
    chosen, rejected = torch.tensor([-2.0, 0.0, -7.0]), torch.tensor([-3.0, 0.0, -1.0])
    p = PairLogps(chosen=chosen, rejected=rejected, ref_chosen=chosen - 0.5, ref_rejected=rejected + 0.25)
    lam = balanced_dpo_lambda(chosen, rejected)
    assert lam.tolist() == [3.0 / 5.0, 0.5, 1.0 / 8.0]
    want = -logsig(1.0 * (lam * 0.5 - (1 - lam) * (-0.25)))
    torch.testing.assert_close(get_loss("bdpo")(p), want)
