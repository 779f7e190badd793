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

__all__ = ["LOSSES", "LossFn", "register_loss", "get_loss", "loss_hparams", "losses_with"]


LossFn = Callable[[PairLogps], Tensor]
LOSSES: dict[str, Callable[..., Tensor]] = {}
"""Registry: name -> loss function `f(p: PairLogps, **hparams) -> Tensor[B]`; `get_loss` binds hparams."""

# Traits a loss declares when it registers (`register_loss(..., token_level=True)`); the trainer reads
# them as `TOKEN_LEVEL_LOSSES` / `REFERENCE_FREE_LOSSES` (built in `preflens.losses` once every family
# module has registered).
_TRAITS: dict[str, set[str]] = {"token_level": set(), "reference_free": set()}


def register_loss(
    name: str, *, token_level: bool = False, reference_free: bool = False
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator adding a loss to `LOSSES`; its keyword arguments (with defaults) are its hparams.

    `token_level`: the loss reads per-token log-probs of policy and reference (the trainer then keeps
    them). `reference_free`: the loss never reads the reference log-probs (no reference pass is needed).
    """

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in LOSSES:
            raise ValueError(f"loss '{name}' registered twice")
        LOSSES[name] = fn
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


def loss_hparams(name: str) -> dict[str, Any]:
    """The hyper-parameters of a loss and their defaults."""
    fn = _lookup(name)
    sig = inspect.signature(fn)
    return {
        k: v.default for k, v in list(sig.parameters.items())[1:] if v.default is not inspect.Parameter.empty
    }


def _lookup(name: str) -> Callable[..., Tensor]:
    if name not in LOSSES:
        raise PreflensError(f"unknown loss '{name}'; available: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def get_loss(name: str, **hparams: Any) -> LossFn:
    """Bind a registered loss to its hyper-parameters: returns `fn(p: PairLogps) -> Tensor[B]`.

    Unknown hyper-parameter names are an error (a typo would otherwise silently use a default).
    """
    fn = _lookup(name)
    allowed = loss_hparams(name)
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise PreflensError(
            f"loss '{name}' has no hyper-parameter(s) {unknown}; its hyper-parameters are "
            + (", ".join(f"{k}={v!r}" for k, v in allowed.items()) or "none")
        )
    bound = {**allowed, **hparams}

    def loss_fn(p: PairLogps) -> Tensor:
        return fn(p, **bound)

    loss_fn.__name__ = f"{name}_loss"
    loss_fn.loss_name = name  # type: ignore[attr-defined]
    loss_fn.hparams = dict(bound)  # type: ignore[attr-defined]
    return loss_fn
