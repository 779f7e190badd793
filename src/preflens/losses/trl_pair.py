"""Every `loss_type` of TRL's `DPOTrainer`, under TRL's names, with TRL's hyper-parameter names.

A TRL user brings `loss_type="bco_pair"`, `beta`, `label_smoothing`, `f_divergence_type`, `ld_alpha`,
`use_weighting`: `get_loss("bco_pair", beta=0.1, ld_alpha=0.5)` is the same objective (the peer test
`tests/test_losses_trl.py` feeds one set of per-token log-probs through TRL's own `DPOTrainer._compute_loss`
and through these, and compares loss and gradient). Each is still a function of `PairLogps` only, so the
margin weights and the entanglement probes apply to every one of them.

Where a TRL name is a loss preflens already had, the one function serves both names: `LOSSES["sigmoid"]
is LOSSES["dpo"]`, `LOSSES["sppo_hard"] is LOSSES["sppo"]`, and `ipo` is the same name (their formulas are
TRL's to 1e-14). TRL's names add TRL's objective options (`registry.register_options`, applied by
`trl_objective`): `get_loss("sigmoid", ld_alpha=0.5)` works, `get_loss("dpo", ld_alpha=0.5)` does not (the
contract of `dpo` is `beta` alone), and at their defaults the loss is the function itself.

TRL's objective options, as TRL applies them (`DPOTrainer._compute_loss`, TRL 1.x):
- `ld_alpha` (LD-DPO, Liu et al. 2024, "Length Desensitization in Direct Preference Optimization",
  arXiv 2409.06411): every summed log-prob (policy and reference) becomes shared + ld_alpha * tail,
  the shared part being the first min(n_w, n_l) response tokens; token level (reads the per-token fields).
- `f_divergence_type` (f-DPO, Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference
  Optimization with Diverse Divergence Constraints", arXiv 2309.16240): the log-ratio r = log pi/pi_ref
  of each response is replaced by the score f'(pi/pi_ref): reverse_kl r, forward_kl 1 - e^-r,
  js_divergence log 2 + log sigma(r), alpha_divergence (e^((a-1) r) - 1)/(a-1) with a =
  f_alpha_divergence_coef (r reverse_kl when |a - 1| < 1e-6; the exponent capped at 80 as TRL does).
  Only for the losses of the chosen-minus-rejected score (TRL's own list); the others do not take it.
- `use_weighting` (WPO, Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization",
  arXiv 2406.11827, Eq. 2): each pair's loss times w_w w_l, w = exp(mean over the response of
  (log pi(y_t) - log sum_v pi(v)^2)), detached (TRL computes it under `torch.no_grad()`). It reads, per
  response token, log sum_v pi(v | prefix)^2 from `PairLogps.chosen_log_sum_sq` / `rejected_log_sum_sq`
  ([B, L], like `chosen_tokens`), which the head of `preflens.logprobs` computes in its own chunks when
  asked (`sequence_logps(return_log_sum_sq=True)`: the trainer asks when `losses.loss_needs_log_sum_sq`);
  a caller that did not fill them gets a one-line error. As TRL, not with `aot`/`aot_unpaired` (they sort
  the pairs, so pair i's weight would multiply another pair's loss).

Losses that couple the pairs of a batch (`aot`, `aot_unpaired`, and `sft` with `token_average=True`)
return a [B] vector whose *mean* is TRL's batch loss, but whose element i is not "pair i's loss": see
each docstring. The margin weights (`margin_weights` differentiates the sum) are still each pair's exact
weights in the batch objective, so the entanglement prediction holds for the batch the loss saw.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from preflens.errors import PreflensError
from preflens.logprobs import PairLogps
from preflens.losses.margin import dpo, ipo, sppo
from preflens.losses.registry import register_loss, register_options
from preflens.losses.terms import implicit_rewards, response_lengths

__all__ = [
    "F_DIVERGENCES",
    "TRL_LOSS_TYPES",
    "TRL_F_DIVERGENCE_LOSSES",
    "f_divergence_score",
    "ld_weighted",
    "wpo_weights",
    "trl_objective",
    "hinge",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
    "TRL_TO_PREFLENS",
    "loss_from_trl_args",
]

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
TRL_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
"""TRL 1.x `DPOConfig.loss_type` values; each is a registered preflens loss of the same name."""
TRL_F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
"""The loss types TRL allows with an f-divergence other than reverse_kl."""


# -- TRL's objective options -------------------------------------------------------------------------


def f_divergence_score(r: Tensor, f_divergence_type: str, f_alpha_divergence_coef: float) -> Tensor:
    """f'(pi/pi_ref) written in the log-ratio r (Wang et al. 2023, arXiv 2309.16240, Table 1; TRL's forms)."""
    if f_divergence_type == "reverse_kl":
        return r
    if f_divergence_type == "forward_kl":
        return 1.0 - torch.exp(-r)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(r)
    if f_divergence_type == "alpha_divergence":
        a = float(f_alpha_divergence_coef)
        if abs(a - 1.0) < 1e-6:  # the limit a -> 1 is reverse KL
            return r
        cap = 11.0 if r.dtype == torch.float16 else 80.0
        return torch.expm1(torch.clamp((a - 1.0) * r, max=cap)) / (a - 1.0)
    raise PreflensError(
        f"f_divergence_type must be one of {', '.join(F_DIVERGENCES)}; got {f_divergence_type!r}"
    )


def ld_weighted(p: PairLogps, ld_alpha: float, loss: str) -> PairLogps:
    """LD-DPO's sums (Liu et al. 2024, arXiv 2409.06411, Eq. 9): shared + ld_alpha * tail for the policy
    and the reference, shared = the first min(n_w, n_l) response tokens of the pair; as TRL's `ld_alpha`."""
    p.require("chosen_tokens", "rejected_tokens", "chosen_mask", "rejected_mask", loss=loss)
    if not 0.0 <= float(ld_alpha) <= 1.0:
        raise PreflensError(f"loss '{loss}': ld_alpha must be in [0, 1], got {ld_alpha}")
    mw, ml = p.chosen_mask.to(p.chosen.dtype), p.rejected_mask.to(p.rejected.dtype)  # type: ignore[union-attr]
    shared = torch.minimum(mw.sum(-1), ml.sum(-1)).unsqueeze(-1)

    def weights(mask: Tensor) -> Tensor:
        pos = mask.cumsum(-1)  # 1-based position among the response tokens
        return mask * torch.where(
            pos <= shared, torch.ones_like(mask), torch.full_like(mask, float(ld_alpha))
        )

    ww, wl = weights(mw), weights(ml)
    out = {"chosen": (p.chosen_tokens * ww).sum(-1), "rejected": (p.rejected_tokens * wl).sum(-1)}  # type: ignore[operator]
    if p.ref_chosen_tokens is not None and p.ref_rejected_tokens is not None:
        out["ref_chosen"] = (p.ref_chosen_tokens * ww).sum(-1)
        out["ref_rejected"] = (p.ref_rejected_tokens * wl).sum(-1)
    elif p.ref_chosen is not None:
        raise PreflensError(f"loss '{loss}' with ld_alpha needs the reference's per-token log-probs too")
    return p.replace(**out)


def wpo_weights(p: PairLogps, loss: str) -> Tensor:
    """WPO's weight w_w w_l per pair (Zhou et al. 2024, arXiv 2406.11827, Eq. 2, TRL's form), detached:
    w = exp(mean over response tokens of (log pi(y_t) - log sum_v pi(v)^2))."""
    p.require("chosen_tokens", "rejected_tokens", "chosen_mask", "rejected_mask", loss=loss)
    if p.chosen_log_sum_sq is None or p.rejected_log_sum_sq is None:
        raise PreflensError(
            f"loss '{loss}' with use_weighting=True (WPO) needs log sum_v pi(v)^2 per response token "
            "(PairLogps.chosen_log_sum_sq / rejected_log_sum_sq): compute the log-probs with "
            "sequence_logps(..., return_log_sum_sq=True) and pair_logps_from_batch, or drop use_weighting"
        )
    with torch.no_grad():

        def w(tokens: Tensor, lss: Tensor, mask: Tensor) -> Tensor:
            m = mask.to(tokens.dtype)
            return torch.exp(((tokens - lss.to(tokens)) * m).sum(-1) / m.sum(-1).clamp(min=1))

        return w(p.chosen_tokens, p.chosen_log_sum_sq, p.chosen_mask) * w(  # type: ignore[arg-type]
            p.rejected_tokens,
            p.rejected_log_sum_sq,
            p.rejected_mask,  # type: ignore[arg-type]
        )


def trl_objective(name: str, fn: Callable[..., Tensor], options: dict[str, Any]) -> Callable[..., Tensor]:
    """`fn` (the loss registered as TRL's `name`) with TRL's objective options applied, as TRL's
    `_compute_loss` applies them: `ld_alpha` re-weights the summed log-probs (policy and reference),
    `f_divergence_type` replaces each log-ratio r by its score f'(e^r) (handed to `fn` as the policy
    log-prob with a zero reference: every f-divergence loss reads them only through r = chosen -
    ref_chosen), `use_weighting` multiplies each pair's loss by WPO's weight. `sft` reads its log-probs
    raw (TRL's `sft` ignores `ld_alpha` and the f-divergence): only the WPO weight applies to it.
    """
    fdiv = options.get("f_divergence_type", "reverse_kl")
    if fdiv not in F_DIVERGENCES:
        raise PreflensError(
            f"loss '{name}': f_divergence_type must be one of {', '.join(F_DIVERGENCES)}; got {fdiv!r}"
        )
    ld_alpha = options.get("ld_alpha")
    bad = ld_alpha is not None and (
        isinstance(ld_alpha, bool) or not isinstance(ld_alpha, (int, float)) or not 0.0 <= ld_alpha <= 1.0
    )
    if bad:
        raise PreflensError(f"loss '{name}': ld_alpha must be a number in [0, 1] (or None), got {ld_alpha!r}")
    if not isinstance(options.get("use_weighting", False), bool):
        raise PreflensError(
            f"loss '{name}': use_weighting must be true or false, got {options['use_weighting']!r}"
        )
    if options.get("use_weighting") and name in ("aot", "aot_unpaired"):
        raise PreflensError(
            f"loss '{name}': use_weighting (WPO) is not defined for it (as in TRL): it sorts the batch's "
            "margins, so a pair's weight would multiply the loss of another rank"
        )
    coef = float(options.get("f_alpha_divergence_coef", 0.5))
    scores = name != "sft"

    def loss(p: PairLogps, **hparams: Any) -> Tensor:
        orig = p
        if scores and ld_alpha is not None:
            p = ld_weighted(p, ld_alpha, name)
        if scores and fdiv != "reverse_kl":
            r_w, r_l = implicit_rewards(p, name)
            zero = torch.zeros_like(r_w)
            p = p.replace(
                chosen=f_divergence_score(r_w, fdiv, coef),
                rejected=f_divergence_score(r_l, fdiv, coef),
                ref_chosen=zero,
                ref_rejected=zero,
            )
        out = fn(p, **hparams)
        if options.get("use_weighting"):
            out = out * wpo_weights(orig, name)
        return out

    return loss


def _needs_tokens(hp: dict[str, Any]) -> bool:
    return hp.get("ld_alpha") is not None or bool(hp.get("use_weighting"))


def _weighs_tokens(hp: dict[str, Any]) -> bool:
    # ld_alpha's tail weight is per token; WPO's weight is per pair and detached (not a token weight)
    return hp.get("ld_alpha") is not None


# -- the loss types preflens did not have ------------------------------------------------------------


def hinge(p: PairLogps, beta: float = 0.1) -> Tensor:
    """TRL's reference-based hinge: max(0, 1 - beta (r_w - r_l)).

    The hinge of SLiC (Zhao et al. 2023, arXiv 2305.10425) on DPO's implicit rewards, as TRL writes it;
    preflens's `slic` is the reference-free SLiC-HF with its SFT term (a different loss).
    """
    r_w, r_l = implicit_rewards(p, "hinge")
    return torch.relu(1.0 - beta * (r_w - r_l))


def exo_pair(p: PairLogps, beta: float = 0.1, label_smoothing: float = 1e-3) -> Tensor:
    """EXO, pairwise (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment",
    arXiv 2402.00856, Eq. 16): KL(q || p_eps) over {chosen, rejected}, q = (sigma(h), sigma(-h)),
    h = beta (r_w - r_l), p_eps = (1 - eps, eps), eps = `label_smoothing` (> 0; the paper uses 1e-3).
    TRL's default label_smoothing is 0, which TRL refuses for exo_pair; the default here is the paper's.
    """
    eps = float(label_smoothing)
    if not 0.0 < eps < 1.0:
        raise PreflensError(f"loss 'exo_pair': label_smoothing (EXO's epsilon) must be in (0, 1), got {eps}")
    r_w, r_l = implicit_rewards(p, "exo_pair")
    h = beta * (r_w - r_l)
    return torch.sigmoid(h) * (F.logsigmoid(h) - math.log1p(-eps)) + torch.sigmoid(-h) * (
        F.logsigmoid(-h) - math.log(eps)
    )


def nca_pair(p: PairLogps, beta: float = 0.1) -> Tensor:
    """NCA, pairwise (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit
    Rewards", arXiv 2402.05369): -log sigma(beta r_w) - 1/2 log sigma(-beta r_w) - 1/2 log sigma(-beta r_l)."""
    r_w, r_l = implicit_rewards(p, "nca_pair")
    return -F.logsigmoid(beta * r_w) - 0.5 * F.logsigmoid(-beta * r_w) - 0.5 * F.logsigmoid(-beta * r_l)


def robust(p: PairLogps, beta: float = 0.1, label_smoothing: float = 0.0) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback", arXiv 2403.00409, Eq. 8): ((1 - eps) l(h) - eps l(-h)) / (1 - 2 eps), l(h) = -log sigma(h),
    h = beta (r_w - r_l), eps = `label_smoothing` in [0, 1/2) (the assumed label-flip rate)."""
    eps = float(label_smoothing)
    if not 0.0 <= eps < 0.5:
        raise PreflensError(f"loss 'robust': label_smoothing must be in [0, 0.5), got {eps}")
    r_w, r_l = implicit_rewards(p, "robust")
    h = beta * (r_w - r_l)
    return (-(1.0 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1.0 - 2.0 * eps)


def bco_pair(p: PairLogps, beta: float = 0.1) -> Tensor:
    """BCO, pairwise (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
    Alignment", arXiv 2404.04656), TRL's form without BCO's running reward shift:
    -log sigma(beta r_w) - log sigma(-beta r_l). Not margin-based: chosen and rejected have separate
    targets (like `sppo`), so the margin does not entangle their changes."""
    r_w, r_l = implicit_rewards(p, "bco_pair")
    return -F.logsigmoid(beta * r_w) - F.logsigmoid(-beta * r_l)


def _aot_core(delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
    return (
        -F.logsigmoid(beta * delta) * (1.0 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    )


def aot(p: PairLogps, beta: float = 0.1, label_smoothing: float = 0.0) -> Tensor:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport", arXiv 2406.05882): sort the batch's policy margins m_i = chosen_i - rejected_i and the
    reference margins m^ref_i separately, and apply DPO's (label-smoothed) logistic loss to
    beta (m_(k) - m^ref_(k)) for each rank k.

    Couples the batch: element k of the returned vector is the loss at rank k (the k-th smallest margins),
    not pair k's; the mean is TRL's batch loss. The margin weights (by autograd on the sum) are each pair's
    exact weights in that batch loss: pair i gets the weight of the rank its margin holds.
    """
    p.require("ref_chosen", "ref_rejected", loss="aot")
    r_ref = p.ref_chosen - p.ref_rejected  # type: ignore[operator]
    m, _ = torch.sort(p.chosen - p.rejected, dim=0)
    m_ref, _ = torch.sort(r_ref, dim=0)
    return _aot_core(m - m_ref, beta, label_smoothing)


def aot_unpaired(p: PairLogps, beta: float = 0.1, label_smoothing: float = 0.0) -> Tensor:
    """AOT, unpaired (Melnyk et al. 2024, arXiv 2406.05882): sort the batch's chosen log-ratios r_w and
    rejected log-ratios r_l separately and apply DPO's (label-smoothed) logistic loss to
    beta (r_w,(k) - r_l,(k)) for each rank k: the chosen reward distribution should dominate the
    rejected one. Element k is the loss at rank k, not pair k's; the mean is TRL's batch loss."""
    r_w, r_l = implicit_rewards(p, "aot_unpaired")
    a, _ = torch.sort(r_w, dim=0)
    b, _ = torch.sort(r_l, dim=0)
    return _aot_core(a - b, beta, label_smoothing)


def apo_zero(p: PairLogps, beta: float = 0.1) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions",
    arXiv 2408.06266, Eq. 7): (1 - sigma(beta r_w)) + sigma(beta r_l): raise chosen, lower rejected, each
    against the reference (for chosen responses better than the model's own)."""
    r_w, r_l = implicit_rewards(p, "apo_zero")
    return (1.0 - torch.sigmoid(beta * r_w)) + torch.sigmoid(beta * r_l)


def apo_down(p: PairLogps, beta: float = 0.1) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 8): sigma(beta r_w) +
    (1 - sigma(beta (r_w - r_l))): lower chosen, lower rejected more (chosen worse than the model's own)."""
    r_w, r_l = implicit_rewards(p, "apo_down")
    return torch.sigmoid(beta * r_w) + (1.0 - torch.sigmoid(beta * (r_w - r_l)))


def discopop(p: PairLogps, beta: float = 0.1, discopop_tau: float = 0.05) -> Tensor:
    """DiscoPOP / log-ratio modulated loss (Chan et al. 2024, "Discovering Preference Optimization
    Algorithms with and for Large Language Models", arXiv 2406.08414, Eq. 5): with h = beta (r_w - r_l)
    and s = sigma(h / tau), (1 - s) (-log sigma(h)) + s e^-h; tau = `discopop_tau` (paper: 0.05)."""
    r_w, r_l = implicit_rewards(p, "discopop")
    h = beta * (r_w - r_l)
    s = torch.sigmoid(h / discopop_tau)
    return -F.logsigmoid(h) * (1.0 - s) + torch.exp(-h) * s


def sft(p: PairLogps, token_average: bool = False) -> Tensor:
    """The NLL of the chosen response: per pair -chosen / n_w (the mean log-prob of its tokens).

    TRL's `sft` averages over *all chosen tokens of the batch*: -sum_i chosen_i / sum_i n_w,i, one number
    for the batch. The per-pair vector here has mean -(1/B) sum_i chosen_i / n_w,i, which equals TRL's
    when every chosen response has the same length; otherwise TRL weights each pair by its length
    (n_w,i / mean n_w) and this weights pairs equally (as `rpo` and `cpo` do). `token_average=True`
    gives TRL's number exactly, expanded to [B] as TRL expands it (every element is the batch value, so
    the vector's mean is TRL's loss and its margin weights are n_w-proportional). Reference-free.
    `tests/test_losses_trl.py` shows both.
    """
    n_w, _ = response_lengths(p, "sft")
    if token_average:
        return (-p.chosen.sum() / n_w.sum()).expand(p.chosen.shape[0])
    return -p.chosen / n_w


def sigmoid_norm(p: PairLogps, beta: float = 0.1) -> Tensor:
    """Length-normalized DPO, TRL's `sigmoid_norm`: -log sigma(beta (r_w / n_w - r_l / n_l)) (the per-token
    average implicit reward, as SimPO averages but with the reference; cf. Meng et al. 2024, arXiv
    2405.14734, and the length-normalized DPO of the Tulu 3 report, Lambert et al. 2024, arXiv 2411.15124)."""
    r_w, r_l = implicit_rewards(p, "sigmoid_norm")
    n_w, n_l = response_lengths(p, "sigmoid_norm")
    return -F.logsigmoid(beta * (r_w / n_w - r_l / n_l))


# Registration order is TRL's `loss_type` order. `sigmoid` is `dpo`, `sppo_hard` is `sppo` (the same
# function object under both names); `ipo` is preflens's `ipo` (registered by `margin` under TRL's name).
_BASES: dict[str, Callable[..., Tensor]] = {
    "sigmoid": dpo,
    "hinge": hinge,
    "ipo": ipo,
    "exo_pair": exo_pair,
    "nca_pair": nca_pair,
    "robust": robust,
    "bco_pair": bco_pair,
    "sppo_hard": sppo,
    "aot": aot,
    "aot_unpaired": aot_unpaired,
    "apo_zero": apo_zero,
    "apo_down": apo_down,
    "discopop": discopop,
    "sft": sft,
    "sigmoid_norm": sigmoid_norm,
}
for _name in TRL_LOSS_TYPES:
    if _name != "ipo":
        register_loss(_name, reference_free=_name == "sft")(_BASES[_name])
    _opts: dict[str, Any] = {"ld_alpha": None, "use_weighting": False}
    if _name in TRL_F_DIVERGENCE_LOSSES:  # TRL's defaults
        _opts = {"f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5, **_opts}
    register_options(
        _name,
        _opts,
        trl_objective,
        token_level_when=_needs_tokens,
        token_weighted_when=None if _name == "sft" else _weighs_tokens,  # TRL's sft ignores ld_alpha
    )


TRL_TO_PREFLENS = {**{n: n for n in TRL_LOSS_TYPES}, "sigmoid": "dpo", "sppo_hard": "sppo"}
"""TRL `loss_type` -> the preflens name of the same function (sigmoid and sppo_hard keep preflens's names)."""


def loss_from_trl_args(args: Any, *, token_options: bool = True) -> tuple[str, dict[str, Any]]:
    """The preflens loss spec and hyper-parameters of a TRL `DPOConfig` (or anything with its attributes):
    `loss_type` (a list becomes "a,b,c"), `loss_weights`, `beta`, `label_smoothing`, `discopop_tau` and the
    objective options where they differ from TRL's defaults. `token_options=False` drops `ld_alpha` and
    `use_weighting` (for a caller that has only summed log-probs, such as the TRL callback's probes).
    Without objective options, sigmoid and sppo_hard are named dpo and sppo (the same functions).
    """
    from preflens.losses.registry import loss_hparams

    types = getattr(args, "loss_type", None) or ["sigmoid"]
    types = [types] if isinstance(types, str) else [str(getattr(t, "value", t)) for t in types]
    spec = ",".join(types)
    accepted = loss_hparams(spec, options=True)
    options = {
        "f_divergence_type": "reverse_kl",
        "f_alpha_divergence_coef": 0.5,
        "ld_alpha": None,
        "use_weighting": False,
    }
    hp: dict[str, Any] = {}
    for key in ("beta", "label_smoothing", "discopop_tau", *options):
        if key not in accepted or not hasattr(args, key):
            continue
        value = getattr(args, key)
        value = getattr(value, "value", value)  # an enum
        if (key in options and value == options[key]) or (
            key in ("ld_alpha", "use_weighting") and not token_options
        ):
            continue
        hp[key] = value
    if not set(hp) & set(options):
        spec = ",".join(TRL_TO_PREFLENS.get(t, t) for t in types)
    weights = getattr(args, "loss_weights", None)
    if weights:
        hp["loss_weights"] = [float(w) for w in weights]
    return spec, hp
