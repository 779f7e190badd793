"""Peer test: every TRL `DPOTrainer` loss type and objective option against TRL's own code.

The same per-token log-probs go (a) through TRL's `DPOTrainer._compute_loss` (TRL 1.x, called on a minimal
trainer-like object whose "model" returns those log-probs from its fused LM head: no model, no download) and
(b) through `preflens.losses.get_loss(name, **TRL's hyper-parameter names)` on `PairLogps` built from them.
The batch loss and its gradient with respect to the per-token log-probs must agree to 1e-6 relative.
Where preflens deliberately differs (`sft`'s per-pair average), the test shows the difference.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from preflens.errors import PreflensError
from preflens.losses import LOSSES, TRL_LOSS_TYPES, PairLogps, get_loss, loss_hparams, loss_needs_tokens

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
DPOConfig = pytest.importorskip("trl").DPOConfig

B = 5
REL = 1e-6


class _FusedHeadModel(torch.nn.Module):
    """Stands in for a model patched with TRL's fused LM head: returns fixed per-token log-probs."""

    is_gradient_checkpointing = False

    def __init__(self, log_probs: torch.Tensor, log_sum_sq: torch.Tensor | None = None):
        super().__init__()
        self.log_probs, self.log_sum_sq = log_probs, log_sum_sq

    def forward(self, **kwargs):
        z = torch.zeros_like(self.log_probs.detach())
        return SimpleNamespace(
            log_probs=self.log_probs,
            entropy=z,
            mean_logits=z,
            is_top1=z.bool(),
            log_sum_sq_probs=self.log_sum_sq,
        )


def _batch(seed: int = 0, equal_chosen: bool = False, dtype=torch.float64):
    """Prompt/response lengths, the [2B, T] completion mask (chosen rows then rejected), per-token values."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 4, (2 * B,), generator=g)
    prompt[B:] = prompt[:B]
    resp = torch.randint(2, 7, (2 * B,), generator=g)
    resp[0], resp[B] = 6, 2  # one pair with a long tail past the shorter response
    if equal_chosen:
        resp[:B] = 4
    T = int((prompt + resp).max()) + 1
    cm = torch.zeros(2 * B, T, dtype=torch.long)
    for i in range(2 * B):
        cm[i, prompt[i] : prompt[i] + resp[i]] = 1
    shift = cm[:, 1:].to(dtype)
    vals = (-3.0 * torch.rand(2 * B, T - 1, generator=g, dtype=dtype) - 0.05).requires_grad_(True)
    ref = -3.0 * torch.rand(2 * B, T - 1, generator=g, dtype=dtype) - 0.05
    lss = -1.5 * torch.rand(2 * B, T - 1, generator=g, dtype=dtype) - 0.1  # log sum_v p_v^2 (<= log max p)
    return cm, shift, vals, ref, lss


def _left_aligned(x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, T-1] values at the response positions -> [N, L] left-aligned, and its mask (differentiable)."""
    n = shift.sum(-1).long()
    L = int(n.max())
    idx = torch.zeros(x.shape[0], L, dtype=torch.long)
    mask = torch.zeros(x.shape[0], L, dtype=torch.bool)
    for i in range(x.shape[0]):
        pos = shift[i].nonzero().flatten()
        idx[i, : len(pos)] = pos
        mask[i, : len(pos)] = True
    return torch.gather(x, 1, idx) * mask, mask


def _pair_logps(shift, vals, ref, lss) -> PairLogps:
    tok, mask = _left_aligned(vals, shift)
    rtok, _ = _left_aligned(ref, shift)
    ltok, _ = _left_aligned(lss, shift)
    n = mask.sum(-1)
    return PairLogps(
        chosen=tok[:B].sum(-1),
        rejected=tok[B:].sum(-1),
        ref_chosen=rtok[:B].sum(-1),
        ref_rejected=rtok[B:].sum(-1),
        chosen_len=n[:B],
        rejected_len=n[B:],
        chosen_tokens=tok[:B],
        rejected_tokens=tok[B:],
        ref_chosen_tokens=rtok[:B],
        ref_rejected_tokens=rtok[B:],
        chosen_mask=mask[:B],
        rejected_mask=mask[B:],
        chosen_log_sum_sq=ltok[:B],
        rejected_log_sum_sq=ltok[B:],
    )


def _trl_loss(cm, shift, vals, ref, lss, **trl_args) -> torch.Tensor:
    """TRL's own `_compute_loss` on a minimal trainer-like object (the attributes its __init__ sets)."""
    args = DPOConfig(output_dir="/tmp/preflens-trl-peer", report_to=[], bf16=False, use_cpu=True, **trl_args)
    t = SimpleNamespace()
    t.args = args
    t.model = _FusedHeadModel(vals * shift, lss * shift)
    t.ref_model = _FusedHeadModel(ref * shift)
    t.accelerator = SimpleNamespace(
        device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x
    )
    t.aux_loss_enabled = False
    t.precompute_ref_logps = False
    t.beta = args.beta
    t.loss_types = args.loss_type
    t.loss_weights = args.loss_weights or [1.0] * len(t.loss_types)
    t.ld_alpha = args.ld_alpha
    t.f_divergence_type = args.f_divergence_type
    t.f_alpha_divergence_coef = args.f_alpha_divergence_coef
    t.label_smoothing = args.label_smoothing
    t.use_weighting = args.use_weighting
    t._metrics = {
        "train": __import__("collections").defaultdict(list),
        "eval": __import__("collections").defaultdict(list),
    }
    t._total_train_tokens = 0
    t._tp_size = 1
    inputs = {
        "input_ids": torch.zeros_like(cm),
        "attention_mask": torch.ones_like(cm),
        "completion_mask": cm,
    }
    return trl_dpo.DPOTrainer._compute_loss(t, t.model, inputs, return_outputs=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _compare(
    spec: str, trl_args: dict, ours: dict, *, seed: int = 0, equal_chosen: bool = False, dtype=torch.float64
):
    cm, shift, vals, ref, lss = _batch(seed, equal_chosen, dtype)
    want = _trl_loss(cm, shift, vals, ref, lss, **trl_args)
    (g_want,) = torch.autograd.grad(want, vals)
    got = get_loss(spec, **ours)(_pair_logps(shift, vals, ref, lss)).mean()
    (g_got,) = torch.autograd.grad(got, vals)
    assert _rel(got.detach(), want.detach()) < REL, (spec, float(got.detach()), float(want.detach()))
    assert _rel(g_got, g_want) < REL, (spec, _rel(g_got, g_want))
    assert float(g_want.abs().max()) > 0  # the check has something to check
    return float(want.detach())


# every loss type at TRL's defaults, and with its own hyper-parameters moved off them
CASES = [
    ("sigmoid", {}),
    ("sigmoid", {"beta": 0.3}),
    ("hinge", {"beta": 0.5}),
    ("ipo", {"beta": 0.2}),
    ("exo_pair", {"beta": 0.2, "label_smoothing": 1e-3}),
    ("exo_pair", {"label_smoothing": 0.2}),
    ("nca_pair", {"beta": 0.2}),
    ("robust", {}),
    ("robust", {"beta": 0.2, "label_smoothing": 0.2}),
    ("bco_pair", {"beta": 0.2}),
    ("sppo_hard", {"beta": 0.5}),
    ("aot", {"beta": 0.2}),
    ("aot", {"beta": 0.2, "label_smoothing": 0.1}),
    ("aot_unpaired", {"beta": 0.2}),
    ("aot_unpaired", {"beta": 0.2, "label_smoothing": 0.1}),
    ("apo_zero", {"beta": 0.2}),
    ("apo_down", {"beta": 0.2}),
    ("discopop", {"beta": 0.3}),
    ("discopop", {"beta": 0.3, "discopop_tau": 0.5}),
    ("sigmoid_norm", {"beta": 0.5}),
]


@pytest.mark.parametrize(
    "name,hp", CASES, ids=[f"{n}-{'-'.join(map(str, h.values())) or 'default'}" for n, h in CASES]
)
def test_every_trl_loss_type_matches_trl(name, hp):
    _compare(name, {"loss_type": [name], **hp}, hp)


def test_the_peer_check_can_fail():
    with pytest.raises(AssertionError):
        _compare("sigmoid", {"loss_type": ["sigmoid"], "beta": 0.2}, {"beta": 0.2000005})
    with pytest.raises(AssertionError):
        _compare("slic", {"loss_type": ["hinge"]}, {})  # preflens's slic is not TRL's hinge


def test_every_trl_loss_type_is_registered_under_trls_name():
    assert set(TRL_LOSS_TYPES) <= set(LOSSES)
    assert set(TRL_LOSS_TYPES) == {c[0] for c in CASES} | {"sft"}
    assert LOSSES["sigmoid"] is LOSSES["dpo"] and LOSSES["sppo_hard"] is LOSSES["sppo"]
    assert get_loss("exo_pair").hparams["label_smoothing"] == 1e-3  # EXO's epsilon (TRL's 0.0 is refused)


def test_sft_token_average_matches_trl_and_the_per_pair_default_differs():
    """TRL's `sft` is the NLL averaged over all chosen tokens of the batch; preflens's default averages each
    pair's tokens and then the pairs. `token_average=True` is TRL's number; with equal chosen lengths the
    two agree, with unequal ones the default weights pairs equally and so differs."""
    trl_value = _compare("sft", {"loss_type": ["sft"]}, {"token_average": True})
    cm, shift, vals, ref, lss = _batch()
    p = _pair_logps(shift, vals, ref, lss)
    per_pair = get_loss("sft")(p).mean()
    assert abs(float(per_pair) - trl_value) > 1e-3  # unequal lengths: a real difference
    written_out = -(p.chosen / p.chosen_len).mean()
    assert float(per_pair) == pytest.approx(float(written_out), rel=1e-12)
    _compare("sft", {"loss_type": ["sft"]}, {}, equal_chosen=True)  # equal lengths: the same number


F_DIV = [
    ("forward_kl", {}),
    ("js_divergence", {}),
    ("alpha_divergence", {"f_alpha_divergence_coef": 0.5}),
    ("alpha_divergence", {"f_alpha_divergence_coef": 0.3}),
    ("alpha_divergence", {"f_alpha_divergence_coef": 1.0}),
]


@pytest.mark.parametrize(
    "name", ["sigmoid", "hinge", "ipo", "robust", "discopop", "sigmoid_norm", "exo_pair"]
)
@pytest.mark.parametrize(
    "fdiv,extra", F_DIV, ids=[f"{f}-{e.get('f_alpha_divergence_coef', '')}" for f, e in F_DIV]
)
def test_f_divergence_matches_trl(name, fdiv, extra):
    hp = {"beta": 0.2, "f_divergence_type": fdiv, **extra}
    if name == "exo_pair":
        hp["label_smoothing"] = 0.01
    if name == "robust":
        hp["label_smoothing"] = 0.1
    # TRL's alpha-divergence clamp table has no float64 entry: that case runs in float32 on both sides
    dtype = torch.float32 if fdiv == "alpha_divergence" else torch.float64
    _compare(name, {"loss_type": [name], **hp}, hp, dtype=dtype)


def test_f_divergence_is_refused_where_trl_refuses_it():
    with pytest.raises(PreflensError, match="f_divergence_type"):
        get_loss("bco_pair", f_divergence_type="js_divergence")
    with pytest.raises(PreflensError, match="f-divergence"):
        get_loss("sigmoid,bco_pair", f_divergence_type="js_divergence")
    with pytest.raises(PreflensError, match="f_divergence_type must be"):
        get_loss("sigmoid", f_divergence_type="kl")


@pytest.mark.parametrize("name", [n for n in TRL_LOSS_TYPES if n != "sft"])
@pytest.mark.parametrize("ld_alpha", [0.0, 0.4])
def test_ld_alpha_matches_trl(name, ld_alpha):
    hp = {"beta": 0.2, "ld_alpha": ld_alpha}
    if name == "exo_pair":
        hp["label_smoothing"] = 0.01
    _compare(name, {"loss_type": [name], **hp}, hp)
    assert loss_needs_tokens(name, ld_alpha=ld_alpha) and not loss_needs_tokens(name)


def test_ld_alpha_one_is_plain_and_sft_ignores_it_as_trl_does():
    cm, shift, vals, ref, lss = _batch()
    p = _pair_logps(shift, vals, ref, lss)
    assert torch.allclose(get_loss("sigmoid", ld_alpha=1.0)(p), get_loss("dpo")(p), rtol=1e-12)
    assert not torch.allclose(get_loss("sigmoid", ld_alpha=0.3)(p), get_loss("dpo")(p))
    _compare("sft", {"loss_type": ["sft"], "ld_alpha": 0.3}, {"ld_alpha": 0.3, "token_average": True})


@pytest.mark.parametrize(
    "name", [n for n in TRL_LOSS_TYPES if n not in ("aot", "aot_unpaired", "sft", "hinge")]
)
def test_use_weighting_matches_trl(name):
    """Every loss type TRL allows use_weighting with (aot/aot_unpaired are refused; sft and hinge fail in
    TRL 1.16: below)."""
    hp = {
        "beta": 0.2,
        "use_weighting": True,
        **({"label_smoothing": 0.1} if name in ("exo_pair", "robust") else {}),
    }
    _compare(name, {"loss_type": [name], **hp}, hp)


def test_use_weighting_with_sft_where_trl_fails():
    """TRL 1.16 multiplies `sft`'s expanded (stride-0) batch value in place by the WPO weights and raises;
    preflens gives what that line means: mean_i(w_i * TRL's sft value), written out here."""
    cm, shift, vals, ref, lss = _batch()
    with pytest.raises(RuntimeError, match="memory location"):
        _trl_loss(cm, shift, vals, ref, lss, loss_type=["sft"], use_weighting=True)
    p = _pair_logps(shift, vals, ref, lss)
    got = get_loss("sft", token_average=True, use_weighting=True)(p).mean()
    m = shift
    w = torch.exp(((vals - lss) * m).sum(-1) / m.sum(-1)).detach()
    nll = -(vals[:B] * m[:B]).sum() / m[:B].sum()
    assert float(got) == pytest.approx(float((w[:B] * w[B:] * nll).mean()), rel=1e-12)


def test_use_weighting_with_hinge_where_trls_backward_fails():
    """TRL 1.16 multiplies hinge's relu output in place by the WPO weights: its loss value is right but its
    backward raises (relu saved that output). The value matches TRL's; the gradient matches autograd on
    mean_i(w_w w_l relu(1 - beta (r_w - r_l))) written out here, w detached."""
    cm, shift, vals, ref, lss = _batch()
    want = _trl_loss(cm, shift, vals, ref, lss, loss_type=["hinge"], beta=0.2, use_weighting=True)
    with pytest.raises(RuntimeError, match="inplace operation"):
        torch.autograd.grad(want, vals)
    p = _pair_logps(shift, vals, ref, lss)
    got = get_loss("hinge", beta=0.2, use_weighting=True)(p).mean()
    (g_got,) = torch.autograd.grad(got, vals)
    m = shift
    w = torch.exp(((vals - lss) * m).sum(-1) / m.sum(-1)).detach()
    r = ((vals - ref) * m).sum(-1)
    formula = (w[:B] * w[B:] * torch.relu(1 - 0.2 * (r[:B] - r[B:]))).mean()
    (g_formula,) = torch.autograd.grad(formula, vals)
    assert _rel(got.detach(), want.detach()) < REL and _rel(formula.detach(), want.detach()) < REL
    assert _rel(g_got, g_formula) < REL and float(g_formula.abs().max()) > 0


def test_use_weighting_without_the_head_numbers_is_a_clear_error():
    """A caller that did not ask the head for log sum p^2 is told how to get it (the trainer asks:
    tests/test_losses_wpo_train.py); the message no longer says the head cannot."""
    cm, shift, vals, ref, lss = _batch()
    p = _pair_logps(shift, vals, ref, lss).replace(chosen_log_sum_sq=None, rejected_log_sum_sq=None)
    with pytest.raises(PreflensError, match="return_log_sum_sq=True") as e:
        get_loss("sigmoid", use_weighting=True)(p)
    assert "does not compute" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_use_weighting_with_aot_is_refused_as_trl_refuses_it(name):
    """TRL's `DPOTrainer.__init__` raises NotImplementedError for use_weighting with aot/aot_unpaired (its
    `_compute_loss`, called directly, would multiply rank k's loss by pair k's weight): refused here too."""
    with pytest.raises(PreflensError, match=f"loss '{name}': use_weighting"):
        get_loss(name, use_weighting=True)
    with pytest.raises(PreflensError, match="use_weighting"):
        get_loss(f"sigmoid,{name}", use_weighting=True)


def test_weighted_combination_matches_trl_mpo_recipe():
    """TRL's `loss_type=["sigmoid", "bco_pair", "sft"]`, `loss_weights=[0.8, 0.2, 1.0]` (the MPO recipe)."""
    trl = {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0], "beta": 0.2}
    _compare(
        "sigmoid,bco_pair,sft", trl, {"loss_weights": [0.8, 0.2, 1.0], "beta": 0.2, "token_average": True}
    )
    # with options shared by all (TRL applies ld_alpha / use_weighting to each listed loss)
    ours2 = {"loss_weights": [0.8, 0.2, 1.0], "beta": 0.2, "token_average": True, "ld_alpha": 0.5}
    _compare("sigmoid,bco_pair,sft", {**trl, "ld_alpha": 0.5}, ours2)
    trl3 = {
        "loss_type": ["sigmoid", "bco_pair"],
        "loss_weights": [0.8, 0.2],
        "beta": 0.2,
        "use_weighting": True,
    }
    _compare("sigmoid,bco_pair", trl3, {"loss_weights": [0.8, 0.2], "beta": 0.2, "use_weighting": True})
    _compare(
        "hinge,robust", {"loss_type": ["hinge", "robust"], "label_smoothing": 0.1}, {"label_smoothing": 0.1}
    )
    # one loss with a weight (TRL's loss_type=["ipo"], loss_weights=[2.0])
    _compare("ipo", {"loss_type": ["ipo"], "loss_weights": [2.0]}, {"loss_weights": [2.0]})


def test_combination_errors_name_the_problem():
    with pytest.raises(PreflensError, match="loss_weights has 2 entries for 3"):
        get_loss("sigmoid,bco_pair,sft", loss_weights=[1, 2])
    with pytest.raises(PreflensError, match="no loss in it"):
        get_loss("sigmoid,bco_pair", gamma=1.0)
    with pytest.raises(PreflensError, match="unknown loss 'nope'"):
        get_loss("sigmoid,nope")
    with pytest.raises(PreflensError, match="repeated"):
        get_loss("sigmoid,sigmoid")
    assert "loss_weights" in loss_hparams("sigmoid,sft")


def test_loss_from_trl_args_reads_a_dpo_config():
    from preflens.losses.trl_pair import loss_from_trl_args

    args = DPOConfig(output_dir="/tmp/preflens-trl-peer", report_to=[], bf16=False, use_cpu=True,
                     loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], beta=0.3)  # fmt: skip
    assert loss_from_trl_args(args) == ("dpo,bco_pair,sft", {"beta": 0.3, "loss_weights": [0.8, 0.2, 1.0]})
    args = DPOConfig(output_dir="/tmp/preflens-trl-peer", report_to=[], bf16=False, use_cpu=True,
                     loss_type=["robust"], label_smoothing=0.2, ld_alpha=0.5, f_divergence_type="js_divergence")  # fmt: skip
    spec, hp = loss_from_trl_args(args)
    assert spec == "robust" and hp["ld_alpha"] == 0.5 and hp["f_divergence_type"] == "js_divergence"
    trl = {
        "loss_type": ["robust"],
        "label_smoothing": 0.2,
        "ld_alpha": 0.5,
        "f_divergence_type": "js_divergence",
    }
    _compare(spec, trl, hp)
    assert "ld_alpha" not in loss_from_trl_args(args, token_options=False)[1]


def test_bad_option_values_are_one_line_errors():
    with pytest.raises(PreflensError, match="ld_alpha must be a number in"):
        get_loss("sigmoid", ld_alpha="half")
    with pytest.raises(PreflensError, match="ld_alpha must be a number in"):
        get_loss("sigmoid", ld_alpha=1.5)
    with pytest.raises(PreflensError, match="use_weighting must be true or false"):
        get_loss("sigmoid", use_weighting="yes")
