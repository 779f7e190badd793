"""The loss registry: name -> loss function, and the binding of a loss to its hyper-parameters.

Why a registry and not an `if loss_type == ...` chain: a loss is added by decorating one function in one
family module, its hyper-parameters are the function's keyword arguments (so `loss_hparams`, the CLI and
`preflens compare` read them from the signature), and every diagnostic works on every registered loss
through `margin_weights` without a special case. `LOSSES` keeps registration order, which users see
(`preflens compare`, CLI help): `preflens/losses/__init__.py` imports the family modules in a fixed order.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor

from preflens.errors import PreflensError
from preflens.logprobs import PairLogps

__all__ = [
    "LOSSES",
    "LossFn",
    "register_loss",
    "get_loss",
    "loss_hparams",
    "losses_with",
    "loss_names",
    "loss_needs_tokens",
    "loss_needs_log_sum_sq",
    "loss_token_weighted",
    "loss_options",
    "register_options",
    "LOSS_SEPARATOR",
]

LOSS_SEPARATOR = ","
"""`get_loss("sigmoid,bco_pair,sft", loss_weights=[0.8, 0.2, 1.0])`: a weighted sum, as TRL's `loss_type` list."""


LossFn = Callable[[PairLogps], Tensor]
LOSSES: dict[str, Callable[..., Tensor]] = {}
"""Registry: name -> loss function `f(p: PairLogps, **hparams) -> Tensor[B]`; `get_loss` binds hparams."""

# Traits a loss declares when it registers (`register_loss(..., token_level=True)`); the trainer reads
# them as `TOKEN_LEVEL_LOSSES` / `REFERENCE_FREE_LOSSES` (built in `preflens.losses` once every family
# module has registered).
_TRAITS: dict[str, set[str]] = {"token_level": set(), "reference_free": set()}
# Losses that read the per-token fields only for some hyper-parameters (TRL's `ld_alpha`, `use_weighting`):
# name -> predicate on the bound hyper-parameters (`loss_needs_tokens`).
_TOKEN_LEVEL_WHEN: dict[str, Callable[[dict[str, Any]], bool]] = {}
# Losses whose gradient reaches the per-token log-probs with weights of their own (not one weight per
# sequence) only for some hyper-parameters (TRL's `ld_alpha`): name -> predicate (`loss_token_weighted`).
_TOKEN_WEIGHTED_WHEN: dict[str, Callable[[dict[str, Any]], bool]] = {}
# Objective options of a loss that are not arguments of its function (TRL's `ld_alpha`,
# `f_divergence_type`, `use_weighting` around `dpo` registered as `sigmoid`): name -> (defaults, apply),
# apply(name, fn, options) -> a function of (p, **hparams) with the options applied (`register_options`).
_OPTIONS: dict[str, tuple[dict[str, Any], Callable[..., Callable[..., Tensor]]]] = {}


def register_loss(
    name: str,
    *,
    token_level: bool = False,
    reference_free: bool = False,
    token_level_when: Callable[[dict[str, Any]], bool] | None = None,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator adding a loss to `LOSSES`; its keyword arguments (with defaults) are its hparams.

    `token_level`: the loss reads per-token log-probs of policy and reference (the trainer then keeps
    them). `reference_free`: the loss never reads the reference log-probs (no reference pass is needed).
    `token_level_when(hparams)`: the loss reads the per-token fields only under these hyper-parameters
    (e.g. TRL's `ld_alpha`); `loss_needs_tokens` asks it. The same function may be registered under a
    second name (TRL's `sigmoid` is `dpo`): decorate it again, `register_loss("sigmoid")(dpo)`.
    """

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in LOSSES or LOSS_SEPARATOR in name or not name:
            raise ValueError(f"loss '{name}' registered twice or not a loss name")
        LOSSES[name] = fn
        if token_level_when is not None:
            _TOKEN_LEVEL_WHEN[name] = token_level_when
        for trait, on in (("token_level", token_level), ("reference_free", reference_free)):
            if on:
                _TRAITS[trait].add(name)
        return fn

    return deco


def losses_with(trait: str) -> frozenset[str]:
    """Names of the registered losses that declared `trait` ("token_level" or "reference_free")."""
    if trait not in _TRAITS:
        raise ValueError(f"unknown loss trait {trait!r}; known: {', '.join(sorted(_TRAITS))}")
    return frozenset(_TRAITS[trait])


def loss_names(spec: str) -> list[str]:
    """The registered names in a loss spec: "dpo" -> ["dpo"], "sigmoid,bco_pair,sft" -> all three.

    An unknown or repeated name is an error naming the registered losses.
    """
    names = [s.strip() for s in str(spec).split(LOSS_SEPARATOR)]
    if not all(names):
        raise PreflensError(f"loss '{spec}': empty name in the comma-separated list")
    for n in names:
        _lookup(n)
    if len(set(names)) != len(names):
        raise PreflensError(f"loss '{spec}': a name is repeated; give each loss once with its weight")
    return names


def _single_hparams(name: str, options: bool = True) -> dict[str, Any]:
    sig = inspect.signature(_lookup(name))
    out = {
        k: v.default for k, v in list(sig.parameters.items())[1:] if v.default is not inspect.Parameter.empty
    }
    return {**out, **loss_options(name)} if options else out


def loss_hparams(name: str, *, options: bool = False) -> dict[str, Any]:
    """The hyper-parameters of a loss and their defaults (DESIGN.md's table: the function's arguments).

    `options=True` adds the loss's objective options (`loss_options`: TRL's `ld_alpha`, ... for TRL's
    loss names), which `get_loss` accepts as well. For a combination ("sigmoid,bco_pair,sft") the union over its losses (a name several share, such as
    `beta`, is one hyper-parameter given to each of them, as TRL shares `beta`; its default is the first
    loss's) plus `loss_weights` (default: 1 each).
    """
    names = loss_names(name)
    if len(names) == 1:
        return _single_hparams(names[0], options)
    out: dict[str, Any] = {}
    for n in names:
        for k, v in _single_hparams(n, options).items():
            out.setdefault(k, v)
    out["loss_weights"] = None
    return out


def register_options(
    name: str,
    defaults: dict[str, Any],
    apply: Callable[..., Callable[..., Tensor]],
    *,
    token_level_when: Callable[[dict[str, Any]], bool] | None = None,
    token_weighted_when: Callable[[dict[str, Any]], bool] | None = None,
) -> None:
    """Give the registered loss `name` objective options beyond its function's arguments.

    Why not arguments: the same function serves two names (TRL's `sigmoid` is `dpo`, whose contract is
    `beta` alone), and TRL's options (`ld_alpha`, `f_divergence_type`, ...) belong to TRL's names.
    `get_loss(name, **options)` calls `apply(name, fn, options)` when an option differs from its
    default (at the defaults the loss is `fn` itself); `loss_hparams(name, options=True)` lists them.
    `token_level_when(hparams)`: the options make the loss read the per-token fields; `token_weighted_when`:
    they make its gradient weigh tokens individually (see `loss_token_weighted`).
    """
    _lookup(name)
    _OPTIONS[name] = (dict(defaults), apply)
    if token_level_when is not None:
        _TOKEN_LEVEL_WHEN[name] = token_level_when
    if token_weighted_when is not None:
        _TOKEN_WEIGHTED_WHEN[name] = token_weighted_when


def loss_options(name: str) -> dict[str, Any]:
    """The objective options of a registered loss and their defaults (empty for most losses)."""
    _lookup(name)
    return dict(_OPTIONS[name][0]) if name in _OPTIONS else {}


def loss_needs_tokens(name: str, **hparams: Any) -> bool:
    """Whether the loss (or any loss of a combination) reads the per-token fields of `PairLogps` under
    these hyper-parameters: a `token_level` loss always, TRL's `ld_alpha` / `use_weighting` when set."""
    for n in loss_names(name):
        if n in _TRAITS["token_level"]:
            return True
        when = _TOKEN_LEVEL_WHEN.get(n)
        if when is not None and when({**_single_hparams(n), **hparams}):
            return True
    return False


def loss_needs_log_sum_sq(name: str, **hparams: Any) -> bool:
    """Whether the loss (or a loss of a combination) reads `PairLogps.chosen_log_sum_sq` /
    `rejected_log_sum_sq`: TRL's `use_weighting` (WPO) set on a loss that has that option. The trainer
    then asks the head for log sum_v pi(v)^2 per token (`sequence_logps(return_log_sum_sq=True)`);
    every other run skips that work."""
    return bool(hparams.get("use_weighting")) and any(
        "use_weighting" in loss_options(n) for n in loss_names(name)
    )


def loss_token_weighted(name: str, **hparams: Any) -> list[str]:
    """Why the gradient of this loss (or of a loss of a combination) is not one weight per sequence times
    the gradient of its summed log-prob: one reason per such loss, empty when it is.

    Diagnostics that read a step's gradient through the per-sequence weight dL/d logp_s (the fused
    `--step-entanglement`, `grad.StepGramCapture`) are exact only when it is empty. A `token_level` loss
    (`sparse`) weighs each token; TRL's `ld_alpha` weighs the tail beyond the shorter response by ld_alpha.
    TRL's `use_weighting` is not a reason: WPO's weight is detached, so it only scales the pair's weight.
    """
    reasons = []
    for n in loss_names(name):
        if n in _TRAITS["token_level"]:
            reasons.append(f"'{n}' weighs the response tokens individually")
            continue
        when = _TOKEN_WEIGHTED_WHEN.get(n)
        if when is not None and when({**_single_hparams(n), **hparams}):
            reasons.append(
                f"'{n}' with ld_alpha={hparams.get('ld_alpha')} differentiates the per-token log-probs "
                "(the tail beyond the shorter response weighs ld_alpha)"
            )
    return reasons


def _lookup(name: str) -> Callable[..., Tensor]:
    if name not in LOSSES:
        raise PreflensError(f"unknown loss '{name}'; available: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def get_loss(name: str, **hparams: Any) -> LossFn:
    """Bind a registered loss to its hyper-parameters: returns `fn(p: PairLogps) -> Tensor[B]`.

    Unknown hyper-parameter names are an error (a typo would otherwise silently use a default).
    `name` may be a comma-separated combination with `loss_weights` (TRL's `loss_type` list and
    `loss_weights`, e.g. the MPO recipe "sigmoid,bco_pair,sft" with [0.8, 0.2, 1.0]): see `_combined`.
    """
    if LOSS_SEPARATOR in str(name):
        return _combined(loss_names(name), hparams)
    weights = hparams.pop("loss_weights", None)
    if weights is not None:  # TRL's loss_type=["x"], loss_weights=[w]: one loss, scaled
        return _combined([name], {**hparams, "loss_weights": weights})
    fn = _lookup(name)
    allowed = _single_hparams(name, options=False)
    opts = loss_options(name)
    unknown = sorted(set(hparams) - set(allowed) - set(opts))
    if unknown:
        raise PreflensError(
            f"loss '{name}' has no hyper-parameter(s) {unknown}; its hyper-parameters are "
            + (", ".join(f"{k}={v!r}" for k, v in {**allowed, **opts}.items()) or "none")
        )
    bound = {**allowed, **{k: v for k, v in hparams.items() if k in allowed}}
    chosen = {**opts, **{k: v for k, v in hparams.items() if k in opts}}
    if any(chosen[k] != opts[k] for k in opts):
        fn = _OPTIONS[name][1](name, fn, chosen)

    def loss_fn(p: PairLogps) -> Tensor:
        return fn(p, **bound)

    loss_fn.__name__ = f"{name}_loss"
    loss_fn.loss_name = name  # type: ignore[attr-defined]
    loss_fn.hparams = {**bound, **{k: v for k, v in chosen.items() if v != opts[k]}}  # type: ignore[attr-defined]
    return loss_fn


def _combined(names: list[str], hparams: dict[str, Any]) -> LossFn:
    """sum_k w_k loss_k(p), per pair: TRL's `loss = sum_k w_k mean(per_sequence_loss_k)` is its mean.

    Each hyper-parameter goes to every loss of the list that takes it (TRL shares `beta`,
    `label_smoothing`, ... across its `loss_type` list); one that no loss takes is an error.
    TRL refuses an f-divergence other than reverse_kl when a listed loss has no f-divergence form;
    so does this (that loss would silently ignore it).
    """
    spec = LOSS_SEPARATOR.join(names)
    hparams = dict(hparams)
    weights = hparams.pop("loss_weights", None)
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names):
        raise PreflensError(
            f"loss '{spec}': loss_weights has {len(weights)} entries for {len(names)} losses (one each)"
        )
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise PreflensError(f"loss '{spec}': loss_weights must be numbers, got {weights!r}") from None
    accepted = {n: _single_hparams(n) for n in names}
    unknown = sorted(k for k in hparams if not any(k in a for a in accepted.values()))
    if unknown:
        have = ", ".join(f"{n}: {sorted(a)}" for n, a in accepted.items())
        raise PreflensError(f"loss '{spec}': no loss in it has hyper-parameter(s) {unknown} ({have})")
    fdiv = hparams.get("f_divergence_type", "reverse_kl")
    lacking = [n for n, a in accepted.items() if "f_divergence_type" not in a]  # TRL refuses these too
    if fdiv != "reverse_kl" and lacking:
        raise PreflensError(
            f"loss '{spec}': f_divergence_type={fdiv!r} is defined only for losses of the f-divergence "
            f"score (as in TRL); {lacking} have none: use reverse_kl with them"
        )
    parts = [get_loss(n, **{k: v for k, v in hparams.items() if k in accepted[n]}) for n in names]

    def loss_fn(p: PairLogps) -> Tensor:
        total = weights[0] * parts[0](p)
        for w, part in zip(weights[1:], parts[1:]):
            total = total + w * part(p)
        return total

    loss_fn.__name__ = "combined_loss"
    loss_fn.loss_name = spec  # type: ignore[attr-defined]
    loss_fn.hparams = {**{k: v for part in parts for k, v in part.hparams.items()}, "loss_weights": weights}  # type: ignore[attr-defined]
    loss_fn.parts = list(zip(names, weights, parts))  # type: ignore[attr-defined]
    return loss_fn
