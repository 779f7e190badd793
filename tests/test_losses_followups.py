"""The follow-up losses (Cal-DPO, SimPER, DPO-Shift, chi-PO), ORPO and kto_pair against their papers'
formulas written out per pair with `math`, and every registered loss through the margin weights (against
finite differences) and the entanglement probes (against a real SGD step) on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from preflens.diagnostics.entanglement import entanglement_from_gram
from preflens.grad import sequence_gram
from preflens.logprobs import sequence_logps, split_pairs
from preflens.losses import LOSSES, PairLogps, get_loss, loss_hparams, margin_weights
from test_entanglement import shared_prefix_pairs
from test_gram import tiny_llama


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


# the papers' losses for one pair: (c, r, rc, rr, nw, nl, hp) -> float
def cal_dpo_ref(c, r, rc, rr, nw, nl, hp):  # Xiao et al. 2024, arXiv 2412.14516
    hw, hl, t = c - rc, r - rr, 1.0 / (2.0 * hp["beta"])
    return -_logsig(hw - hl) + hp["calibration"] * ((hw - t) ** 2 + (hl + t) ** 2)


def simper_ref(c, r, rc, rr, nw, nl, hp):  # Xiao et al. 2025, arXiv 2502.00883
    return -math.exp(c / nw) + math.exp(r / nl)


def dpo_shift_ref(c, r, rc, rr, nw, nl, hp):  # Yang et al. 2025, arXiv 2502.07599
    b = hp["beta"]
    return -_logsig(
        b * math.log(math.exp(c) / math.exp(rc)) - hp["lam"] * b * math.log(math.exp(r) / math.exp(rr))
    )


def chipo_ref(c, r, rc, rr, nw, nl, hp):  # Huang et al. 2024, arXiv 2407.13399, Algorithm 1
    def phi(z):  # z = pi / pi_ref
        return z + math.log(z)

    b = hp["beta"]
    h = b * phi(math.exp(c - rc)) - b * phi(math.exp(r - rr))
    if hp["r_max"] is not None:
        h = max(-2 * hp["r_max"], min(2 * hp["r_max"], h))
    return -_logsig(h)


def orpo_ref(c, r, rc, rr, nw, nl, hp):  # Hong et al. 2024, arXiv 2403.07691, Eq. 4-7
    pw, pl = math.exp(c / nw), math.exp(r / nl)
    odds_ratio = (pw / (1 - pw)) / (pl / (1 - pl))
    return -c / nw - hp["beta"] * _logsig(math.log(odds_ratio))


REFERENCE = {
    "cal_dpo": ({"beta": 0.5, "calibration": 1.0}, cal_dpo_ref),
    "simper": ({}, simper_ref),
    "dpo_shift": ({"beta": 0.3, "lam": 0.8}, dpo_shift_ref),
    "chipo": ({"beta": 0.2, "r_max": None}, chipo_ref),
    "orpo": ({"beta": 0.3}, orpo_ref),
}


def _inputs(b: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    nw = torch.randint(1, 8, (b,), generator=g)
    nl = torch.randint(1, 8, (b,), generator=g)
    c = (
        -(torch.rand(b, generator=g, dtype=torch.float64) * 1.5 + 0.05) * nw
    )  # mean token log-prob in (-1.55, -0.05)
    r = -(torch.rand(b, generator=g, dtype=torch.float64) * 1.5 + 0.05) * nl
    rc = c + torch.randn(b, generator=g, dtype=torch.float64)
    rr = r + torch.randn(b, generator=g, dtype=torch.float64)
    return c, r, rc, rr, nw, nl


def _numeric_grad(ref, args, i, hp, k, h=1e-6):
    lo, hi = list(args), list(args)
    lo[k] -= h
    hi[k] += h
    return (ref(*hi, hp) - ref(*lo, hp)) / (2 * h)


@pytest.mark.parametrize("name", sorted(REFERENCE))
@pytest.mark.parametrize("hp_set", ["paper", "defaults"])
def test_followup_matches_the_papers_formula(name, hp_set):
    hp, ref = REFERENCE[name]
    if hp_set == "defaults":
        hp = loss_hparams(name)
    c, r, rc, rr, nw, nl = _inputs(seed=len(name))
    p = PairLogps(chosen=c, rejected=r, ref_chosen=rc, ref_rejected=rr, chosen_len=nw, rejected_len=nl)
    got = get_loss(name, **hp)(p)
    d_w, d_l = margin_weights(get_loss(name, **hp), p)
    for i in range(len(c)):
        args = (float(c[i]), float(r[i]), float(rc[i]), float(rr[i]), int(nw[i]), int(nl[i]))
        assert float(got[i]) == pytest.approx(ref(*args, hp), rel=1e-10, abs=1e-12), (name, i)
        # margin weights d_w = -dl/d chosen, d_l = dl/d rejected, by central differences of the paper's formula
        assert float(d_w[i]) == pytest.approx(-_numeric_grad(ref, args, i, hp, 0), rel=1e-5, abs=1e-8)
        assert float(d_l[i]) == pytest.approx(_numeric_grad(ref, args, i, hp, 1), rel=1e-5, abs=1e-8)


def test_followups_differ_from_dpo_where_they_should():
    c, r, rc, rr, nw, nl = _inputs()
    p = PairLogps(chosen=c, rejected=r, ref_chosen=rc, ref_rejected=rr, chosen_len=nw, rejected_len=nl)
    dpo = get_loss("dpo", beta=0.3)(p)
    assert torch.allclose(get_loss("dpo_shift", beta=0.3, lam=1.0)(p), dpo, rtol=1e-14)  # lam = 1 is DPO
    assert not torch.allclose(get_loss("dpo_shift", beta=0.3, lam=0.8)(p), dpo)
    assert torch.allclose(get_loss("cal_dpo", beta=0.3, calibration=0.0)(p), get_loss("dpo", beta=1.0)(p))
    # chi-PO's clip caps the argument of log sigma
    big = p.replace(rejected=p.rejected + 30.0)
    clipped = get_loss("chipo", beta=1.0, r_max=2.0)(big)
    assert float(clipped.max()) <= -math.log(_sig(-4.0)) + 1e-12
    # DPO-Shift with lam < 1 pulls less on the rejected side: d_l shrinks relative to d_w
    dw, dl = margin_weights(get_loss("dpo_shift", beta=0.3, lam=0.5), p)
    assert torch.allclose(dl, 0.5 * dw, rtol=1e-12)


def kto_pair_ref(c, r, rc, rr, beta):  # Ethayarajh et al. 2024, arXiv 2402.01306, paired, KL detached
    b = len(c)
    z_w = max(0.0, sum(c[i] - rc[i] for i in range(b)) / b)
    z_l = max(0.0, sum(r[i] - rr[i] for i in range(b)) / b)
    out = [
        (1 - _sig(beta * ((c[i] - rc[i]) - z_l))) + (1 - _sig(beta * (z_w - (r[i] - rr[i]))))
        for i in range(b)
    ]
    return sum(out) / (2 * b)  # TRL's former kto_pair: the mean over its 2B-vector


def test_kto_pair_matches_the_paired_kto_formula():
    c, r, rc, rr, nw, nl = _inputs()
    rc = rc - 2.0  # positive batch-mean log-ratios: the reference points z are active
    for shift in (0.0, -5.0):
        p = PairLogps(
            chosen=c, rejected=r + shift, ref_chosen=rc, ref_rejected=rr, chosen_len=nw, rejected_len=nl
        )
        got = get_loss("kto_pair", beta=0.7)(p).mean()
        want = kto_pair_ref(c.tolist(), (r + shift).tolist(), rc.tolist(), rr.tolist(), 0.7)
        assert float(got) == pytest.approx(want, rel=1e-12)


def test_orpo_matches_trls_odds_ratio_term():
    """ORPO's odds-ratio term against TRL's own `ORPOTrainer.odds_ratio_loss` (experimental), and the NLL
    term: per pair here, TRL averages over all chosen tokens (`token_average=True` gives TRL's)."""
    orpo_mod = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    from types import SimpleNamespace

    c, r, rc, rr, nw, nl = _inputs()
    leaves = [c.clone().requires_grad_(True), r.clone().requires_grad_(True)]
    trainer = SimpleNamespace(beta=0.3, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, *_ = orpo_mod.ORPOTrainer.odds_ratio_loss(trainer, leaves[0] / nw, leaves[1] / nl)
    want = (-leaves[0].sum() / nw.sum()) - losses.mean()  # TRL: policy_nll_loss - losses.mean()
    gw = torch.autograd.grad(want, leaves)
    leaves2 = [c.clone().requires_grad_(True), r.clone().requires_grad_(True)]
    p = PairLogps(chosen=leaves2[0], rejected=leaves2[1], chosen_len=nw, rejected_len=nl)
    got = get_loss("orpo", beta=0.3, token_average=True)(p).mean()
    gg = torch.autograd.grad(got, leaves2)
    # TRL computes the odds ratio in float32 (`.float()`): agreement to float32 precision
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    for a, b in zip(gg, gw):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-6
    per_pair = get_loss("orpo", beta=0.3)(p.replace(chosen=c, rejected=r)).mean()
    assert (
        abs(float(per_pair.detach()) - float(want.detach())) > 1e-3
    )  # unequal lengths: the per-pair NLL differs


# -- every registered loss through the diagnostics ---------------------------------------------------

_HP = {  # hyper-parameters some losses need to run on any batch
    "exo_pair": {"label_smoothing": 0.01},
}


@pytest.fixture(scope="module")
def probe_batch():
    torch.set_num_threads(1)
    model = tiny_llama(seed=3)
    batch = shared_prefix_pairs(b=4, seed=1)
    seq = sequence_logps(
        model, batch["input_ids"], batch["attention_mask"], batch["response_mask"], return_tokens=True
    )
    gram = sequence_gram(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"]).double()
    lp = seq.logps.detach().double()
    ref = (lp[:4] + 0.3, lp[4:] - 0.2)
    p = split_pairs(lp, seq.lengths, ref, grad_norms=gram.diagonal().clamp_min(0).sqrt())
    tok, mask, ids = seq.token_logps.detach().double(), seq.token_mask, seq.token_ids
    p = p.replace(
        chosen_tokens=tok[:4],
        rejected_tokens=tok[4:],
        ref_chosen_tokens=tok[:4] + 0.3 / seq.lengths[:4, None],
        ref_rejected_tokens=tok[4:] - 0.2 / seq.lengths[4:, None],
        chosen_mask=mask[:4],
        rejected_mask=mask[4:],
        chosen_token_ids=ids[:4],
        rejected_token_ids=ids[4:],
    )
    return gram, p


@pytest.mark.parametrize("name", list(LOSSES))
def test_margin_weights_and_entanglement_probe_run_for_every_loss(name, probe_batch):
    gram, p = probe_batch
    loss_fn = get_loss(name, **_HP.get(name, {}))
    d_w, d_l = margin_weights(loss_fn, p)
    assert d_w.shape == d_l.shape == (4,) and torch.isfinite(d_w).all() and torch.isfinite(d_l).all()
    st = entanglement_from_gram(gram, p, loss_fn, eta=0.1)
    assert torch.isfinite(st.pred_delta_chosen).all() and torch.isfinite(st.batch_pred_delta_chosen).all()
    # the per-pair prediction is the paper's eta (d_w |g_w|^2 - d_l <g_w, g_l>) with this loss's weights
    i = torch.arange(4)
    gw2, gwl = gram[i, i], gram[i, i + 4]
    want = 0.1 * (d_w.double() * gw2 - d_l.double() * gwl)
    torch.testing.assert_close(st.pred_delta_chosen.double(), want, rtol=1e-4, atol=1e-9)
    if name in ("dpo", "sigmoid", "bco_pair", "cal_dpo", "simper", "orpo"):
        assert float(d_w.abs().max()) > 0  # a loss that pulls on chosen gives it a nonzero weight


# -- every registered loss: margin weights against finite differences, the probe against a real step ----

_EVERY = list(LOSSES)
_NAMED = {"orpo", "kto_pair", "cal_dpo", "simper", "dpo_shift", "chipo", "sigmoid", "hinge", "exo_pair",
          "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down",
          "discopop", "sft", "sigmoid_norm", "ipo", "dpo", "sparse", "normalized"}  # fmt: skip


def test_the_parametrized_list_is_every_registered_loss():
    assert set(_EVERY) == set(LOSSES) and _NAMED <= set(_EVERY) and len(_EVERY) == len(LOSSES)


@pytest.fixture(scope="module")
def step_setup():
    """A tiny Llama, a pair batch and per-pair reference log-probs below the policy's on both sides (so
    kto_pair's detached reference points max(0, mean r) stay 0 under a small perturbation and the finite
    differences of its function are its margin weights), with pair-to-pair spread."""
    torch.set_num_threads(1)
    model = tiny_llama(seed=3)
    batch = shared_prefix_pairs(b=4, seed=1)
    ids, am, rm = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    seq = sequence_logps(model, ids, am, rm, return_tokens=True)
    gram = sequence_gram(model, ids, am, rm).double()
    lp = seq.logps.detach().double()
    g = torch.Generator().manual_seed(0)
    u = 0.1 + 0.8 * torch.rand(8, generator=g, dtype=torch.float64)
    ref = (lp[:4] + u[:4], lp[4:] + u[4:] * 0.5)  # the reference above the policy: r_w, r_l < 0, unequal
    return model, batch, seq, gram, ref


def _pairs(seq, gram, ref, *, tokens=None) -> PairLogps:
    lp = seq.logps.double() if tokens is None else seq.logps
    p = split_pairs(lp, seq.lengths, ref, grad_norms=gram.diagonal().clamp_min(0).sqrt())
    tok = seq.token_logps.detach().double() if tokens is None else tokens
    ref_tok = seq.token_logps.detach().double()
    n = seq.lengths.double()[:, None]
    return p.replace(
        chosen_tokens=tok[:4], rejected_tokens=tok[4:],
        ref_chosen_tokens=ref_tok[:4] + (ref[0] - lp[:4].detach().double())[:, None] / n[:4],
        ref_rejected_tokens=ref_tok[4:] + (ref[1] - lp[4:].detach().double())[:, None] / n[4:],
        chosen_mask=seq.token_mask[:4], rejected_mask=seq.token_mask[4:],
        chosen_token_ids=seq.token_ids[:4], rejected_token_ids=seq.token_ids[4:],
    )  # fmt: skip


def _finite_difference_weights(loss_fn, p: PairLogps, h: float = 1e-6):
    """d_w = -d(sum loss)/d chosen_i, d_l = d(sum loss)/d rejected_i by central differences in float64; for
    losses that read the per-token log-probs, plus the mean over response tokens of the per-token
    differences (the sequence-level weight `margin_weights` documents). No autograd."""

    def total(q: PairLogps) -> float:
        with torch.no_grad():
            return float(loss_fn(q).double().sum())

    out = []
    for field, tok_field, mask in (("chosen", "chosen_tokens", p.chosen_mask),
                                   ("rejected", "rejected_tokens", p.rejected_mask)):  # fmt: skip
        base, tok = getattr(p, field).detach().double(), getattr(p, tok_field).detach().double()
        d = torch.zeros(4, dtype=torch.float64)
        for i in range(4):
            for sgn in (1, -1):
                x = base.clone()
                x[i] += sgn * h
                d[i] += sgn * total(p.replace(**{field: x, tok_field: tok})) / (2 * h)
            for t in range(int(mask[i].sum())):
                acc = 0.0
                for sgn in (1, -1):
                    y = tok.clone()
                    y[i, t] += sgn * h
                    acc += sgn * total(p.replace(**{field: base, tok_field: y})) / (2 * h)
                d[i] += acc / float(mask[i].sum())
        out.append(d)
    return -out[0], out[1]


def _frozen(name: str, p0: PairLogps):
    """For the losses with a detached coefficient, the paper's loss with that coefficient frozen at the
    base point (its value there, no gradient through it), written out: the function whose finite
    differences are the margin weights. None for the other losses (their own function is that)."""
    F_ = torch.nn.functional
    c0, r0, rc, rr = (x.detach().double() for x in (p0.chosen, p0.rejected, p0.ref_chosen, p0.ref_rejected))
    if name == "bdpo":  # Ma et al. 2025, arXiv 2502.20847, Sec. 5, beta = 1
        lam = r0 / (c0 + r0)
        return lambda q: -F_.logsigmoid(lam * (q.chosen - rc) - (1 - lam) * (q.rejected - rr))
    if name == "nbdpo":  # the same section, clip 0.3, one-sided
        lam = 1 + torch.clamp(c0 - r0, 0.0, 0.3)
        return lambda q: -F_.logsigmoid(lam * (q.chosen - rc) - (q.rejected - rr))
    if name == "kto_pair":  # Ethayarajh et al. 2024, arXiv 2402.01306, beta = 0.1
        z_w, z_l = (c0 - rc).mean().clamp(min=0), (r0 - rr).mean().clamp(min=0)
        return lambda q: (
            0.5
            * (
                (1 - torch.sigmoid(0.1 * ((q.chosen - rc) - z_l)))
                + (1 - torch.sigmoid(0.1 * (z_w - (q.rejected - rr))))
            )
        )
    if name == "normalized":  # Yuan et al. 2024, arXiv 2410.13828, Sec. 5.1, beta = 0.1
        c = 0.1 * torch.sigmoid(-0.1 * ((c0 - rc) - (r0 - rr)))
        n_w, n_l = p0.chosen_grad_norm.double(), p0.rejected_grad_norm.double()
        return lambda q: c * (q.rejected / n_l - q.chosen / n_w)
    return None


@pytest.mark.parametrize("name", _EVERY)
def test_every_loss_margin_weights_and_the_probe_prediction_against_independent_numbers(name, step_setup):
    """For every registered loss: (1) `margin_weights` equals central finite differences of the loss (no
    autograd; for bdpo, nbdpo, kto_pair and normalized, of the paper's loss with its detached coefficient
    frozen, `_frozen`); (2) the entanglement probe's batch prediction -eta G c (Yuan et al. 2024, arXiv 2410.13828,
    Sec. 3) equals the change of the model's log-probs after a real SGD step of size eta on that loss, to
    first order. `sparse` weighs tokens, so its sequence-level prediction is an approximation (the
    per-token weights are what the update uses): (2) is not asserted for it."""
    from preflens.losses import TOKEN_LEVEL_LOSSES

    model, batch, seq, gram, ref = step_setup
    loss_fn = get_loss(name, **_HP.get(name, {}))
    p = _pairs(seq, gram, ref)
    d_w, d_l = margin_weights(loss_fn, p)
    fd_w, fd_l = _finite_difference_weights(_frozen(name, p) or loss_fn, p)
    scale = max(float(fd_w.abs().max()), float(fd_l.abs().max()), 1e-12)
    torch.testing.assert_close(d_w.double(), fd_w, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(d_l.double(), fd_l, rtol=1e-5, atol=1e-6 * scale)
    if name in TOKEN_LEVEL_LOSSES:
        return
    st = entanglement_from_gram(gram, p, loss_fn, eta=1.0)
    pred = torch.cat([st.batch_pred_delta_chosen, st.batch_pred_delta_rejected]).double()
    assert float(pred.abs().max()) > 0, "every loss moves some log-prob on this batch"
    eta = 3e-3 / float(pred.abs().max())  # a step that moves the largest log-prob by ~3e-3 nats
    step_model = __import__("copy").deepcopy(model)
    ids, am, rm = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    live = sequence_logps(step_model, ids, am, rm, return_tokens=True)
    q = _pairs(live, gram, ref, tokens=live.token_logps)
    q = q.replace(chosen=live.logps[:4], rejected=live.logps[4:])
    params = [w for w in step_model.parameters() if w.requires_grad]
    grads = torch.autograd.grad(loss_fn(q).mean(), params, allow_unused=True)
    with torch.no_grad():
        for w, gr in zip(params, grads):
            if gr is not None:
                w -= eta * gr
        after = sequence_logps(step_model, ids, am, rm).logps.double()
    observed = after - seq.logps.detach().double()
    torch.testing.assert_close(observed, eta * pred, rtol=0.05, atol=0.03 * eta * float(pred.abs().max()))
