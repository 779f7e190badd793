"""The rule registry: which exact per-sequence gradient rule covers a module's own parameters.

A rule is registered for module types with the `register_rule` decorator (the way Opacus registers
its per-sample gradient functions, `opacus.grad_sample.utils.register_grad_sampler`); the hook
engine (`preflens.grad.capture`) looks a module up with `rule_for` and knows nothing about kinds.
Lookup walks the module's class hierarchy (a subclass of nn.Linear is a Linear), then asks the
rules registered with a `match` predicate (norm classes that transformers defines per model family
and that share no base class). A parameter whose module has no rule is refused by name
(`GramError`), never skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from torch import Tensor, nn

from preflens.grad.layout import SequenceRows
from preflens.grad.parts import Call, Part

__all__ = ["Rule", "register_rule", "registered_rules", "rule_for"]


class Rule:
    """How the own parameters of one module kind get their per-sequence gradient parts.

    Subclasses set `kind` and `supports` (the phrase the unsupported-parameter error lists), and
    implement `parts`. The class attributes below tell the engine how the module's rows look.
    """

    kind: ClassVar[str] = ""
    supports: ClassVar[str] = ""
    # The input is token ids: its rows are all of x's dims (not x.shape[:-1]).
    token_rows: ClassVar[bool] = False
    # The output gets a zero anchor (`GramCapture`): the module starts a branch of the activations.
    anchored: ClassVar[bool] = False
    # [N, ...] inputs beyond the [N, T] grid are accepted (per-head norms).
    per_head: ClassVar[bool] = False

    def accepts(self, module: nn.Module) -> bool:
        """Whether this rule covers `module` at all (False: its parameters are unsupported)."""
        return True

    def refuse(self, module: nn.Module) -> str | None:
        """A reason why this module's configuration is not exact (e.g. Embedding max_norm), or None."""
        return None

    def save(self, module: nn.Module, x: Tensor, out: Tensor) -> Any:
        """What `parts` needs from the forward besides the input (kept on the `Call` as `saved`)."""
        return None

    def parts(self, call: Call, grad: Tensor, rows: SequenceRows) -> list[tuple[nn.Parameter, Part]]:
        """One part per own parameter in `call.params`, from the call's output-gradient `grad`."""
        raise NotImplementedError


_BY_TYPE: dict[type[nn.Module], Rule] = {}
_BY_MATCH: list[tuple[Callable[[nn.Module], bool], Rule]] = []
_ORDER: list[Rule] = []

R = TypeVar("R", bound=type[Rule])


def register_rule(
    *module_types: type[nn.Module], match: Callable[[nn.Module], bool] | None = None
) -> Callable[[R], R]:
    """Class decorator: register one instance of the rule for `module_types` (and/or a `match` predicate)."""
    if not module_types and match is None:
        raise TypeError("register_rule needs module types or a match predicate")

    def deco(cls: R) -> R:
        rule = cls()
        for t in module_types:
            _BY_TYPE[t] = rule
        if match is not None:
            _BY_MATCH.append((match, rule))
        _ORDER.append(rule)
        return cls

    return deco


def rule_for(module: nn.Module) -> Rule | None:
    """The rule covering `module`'s own parameters, or None (they are unsupported)."""
    rule = next((_BY_TYPE[c] for c in type(module).__mro__ if c in _BY_TYPE), None)
    if rule is None:
        rule = next((r for pred, r in _BY_MATCH if pred(module)), None)
    return rule if rule is not None and rule.accepts(module) else None


def registered_rules() -> dict[str, Rule]:
    """The registered rules by kind, in registration order."""
    return {r.kind: r for r in _ORDER}
