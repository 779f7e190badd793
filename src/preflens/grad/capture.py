"""The hook engine: forward hooks record each call of a module with a rule, tensor hooks on the call's
output hand its output-gradient to the rule, and the parts are reduced into the Gram per parameter.

`GramCapture` is used by the two drivers in `preflens.grad.api` (a standalone pass that drives its
own activation-only backward, and `StepGramCapture` riding on a training step's backward) and
directly by `preflens.diagnostics.reward_std`. Captures can nest: the `normalized` loss asks for
gradient norms (a standalone pass) inside a training step whose step capture is active on the same
modules. `ActiveCaptures` holds that state explicitly: the captures entered and not yet removed.

FSDP2 (`torch.distributed.fsdp.fully_shard`): a sharded module holds DTensor shards outside its forward and
swaps in gathered (unsharded) parameters for its forward and backward, so the Parameter objects a hook sees
are not the ones `model.named_parameters()` listed. A parameter is therefore tracked by its place (module,
attribute) and the objects seen in a forward are aliased to it. The hooks read the layer's input and
output-gradient, which each rank holds in full for its own micro-batch, and build the per-sequence parts
from those while the layer is gathered: the Gram of a rank's sequences needs no cross-rank reduction (no
weight gradient, sharded or gathered, is ever read). The root module's own parameters (embeddings, final
norm, head) are gathered for the capture's lifetime, because `preflens.logprobs.sequence_logps` calls the
decoder and the head directly, not through the root's forward. Fused weight gradients (`fuse_grads`) are
switched off under FSDP2: FSDP's reduce-scatter runs on autograd's gradients.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from preflens.grad.errors import GramError
from preflens.grad.kernels import STRATEGIES, Strategy, param_gram
from preflens.grad.layout import SequenceRows
from preflens.grad.parts import Call, Outer
from preflens.grad.rules import Rule, registered_rules, rule_for

__all__ = ["ACTIVE_CAPTURES", "ActiveCaptures", "GramCapture", "gathered_root", "select_params"]


def _gather_root(model: nn.Module) -> bool:
    """FSDP2: gather the root module's own parameters; False (nothing done) for an unsharded model."""
    if not isinstance(model, FSDPModule):
        return False
    state = model._get_fsdp_state()  # type: ignore[operator]
    if getattr(state, "_is_root", False) is None:
        state._lazy_init()  # no forward ran yet: make the model the root before a layer claims it
    model.unshard()
    return True


@contextlib.contextmanager
def gathered_root(model: nn.Module) -> Iterator[None]:
    """Within the block, an FSDP2 root's own parameters (embeddings, final norm, head) are gathered, so a
    forward that calls the decoder and the head directly (`preflens.logprobs.sequence_logps`, not the
    root's forward) runs on a sharded model; the decoder layers gather themselves. Resharded at exit. A
    no-op for an unsharded model. For no-grad passes and the capture's own (which drives its backward)."""
    gathered = _gather_root(model)
    try:
        yield
    finally:
        if gathered:
            model.reshard()  # type: ignore[operator]


class ActiveCaptures:
    """The `GramCapture`s entered and not yet removed, in entry order.

    Two facts about nested captures live here instead of in module-level counters:
    - while a capture that drives its own backward (`anchor=True`: a standalone pass) is active, a
      capture that rides on someone else's backward ignores forward calls: the standalone pass's
      forward is not part of the training step (e.g. the `normalized` loss's gradient norms);
    - parameters a fused capture switched off (`requires_grad=False` for the step) still count as
      trainable when a nested pass selects the trainable parameters.
    One instance per process (`ACTIVE_CAPTURES`): the captures involved do not know each other, only
    the modules they hook.
    """

    def __init__(self) -> None:
        self._entered: list[GramCapture] = []

    def enter(self, cap: GramCapture) -> None:
        self._entered.append(cap)

    def leave(self, cap: GramCapture) -> None:
        if cap in self._entered:
            self._entered.remove(cap)

    def standalone_running(self) -> bool:
        return any(c.use_anchor for c in self._entered)

    def switched_off(self) -> set[int]:
        """ids of the parameters whose requires_grad a fused capture has switched off for this step."""
        return {id(p) for c in self._entered for p, _ in c.saved_requires_grad}


ACTIVE_CAPTURES = ActiveCaptures()


@dataclass
class _ParamState:
    """A selected parameter's parts of the current pass, until all its hooked calls got a gradient."""

    name: str
    param: nn.Parameter
    pending: int = 0
    outers: list[Outer] = field(default_factory=list)
    vector: Tensor | None = None


def select_params(
    model: nn.Module, params: Iterable[str | nn.Parameter] | None, active: ActiveCaptures = ACTIVE_CAPTURES
) -> dict[int, tuple[str, nn.Parameter]]:
    """{id: (name, parameter)} of `params` (names or Parameters), or of the trainable parameters."""
    named = list(model.named_parameters())  # deduplicates tied parameters (first name kept)
    if params is None:
        # parameters a fused StepGramCapture switched off for this step still count as trainable
        off = active.switched_off()
        chosen = [(n, p) for n, p in named if p.requires_grad or id(p) in off]
        if not chosen:
            raise GramError("the model has no trainable parameters (requires_grad): nothing to differentiate")
    else:
        by_name = dict(named)
        by_id = {id(p): n for n, p in named}
        chosen = []
        for item in params:
            if isinstance(item, str):
                if item not in by_name:
                    raise GramError(f"params: '{item}' is not a parameter name of the model")
                chosen.append((item, by_name[item]))
            elif isinstance(item, torch.Tensor):
                if id(item) not in by_id:
                    raise GramError("params: a tensor that is not a parameter of the model was passed")
                chosen.append((by_id[id(item)], item))  # type: ignore[arg-type]
            else:
                raise GramError(f"params: expected parameter names or Parameters, got {type(item).__name__}")
        if not chosen:
            raise GramError("params is empty: nothing to differentiate")
    return {id(p): (n, p) for n, p in chosen}


def _unsupported_error(unsupported: list[str]) -> GramError:
    supported = ", ".join(r.supports for r in registered_rules().values())
    return GramError(
        "sequence_gram cannot compute exact per-sequence gradients for these parameters: "
        + ", ".join(unsupported)
        + f". Supported: {supported}. Exclude them with `params=` (names of the others)."
    )


class GramCapture:
    """Forward/backward hooks that accumulate the per-sequence-gradient Gram of the selected parameters.

    Usage (what `sequence_gram` and `StepGramCapture` do):

        cap = GramCapture(model, attention_mask, response_mask, params)
        with cap:                       # hooks installed
            logps = sequence_logps(model, ...).logps
            cap.check_graph(logps)      # every use of every selected parameter is hooked
            <backward of sum_s c_s logp_s>
        gram = cap.finish()             # [N, N] Gram of the per-sequence gradients of sum_s c_s logp_s

    The module's rows must be the N sequences (`preflens.grad.layout`). `anchor=True`: the capture
    drives its own activation-only backward (`torch.autograd.grad(..., cap.anchors)`); it then pauses
    the captures that ride on a step's backward (`ActiveCaptures`).
    """

    def __init__(
        self,
        model: nn.Module,
        attention_mask: Tensor,
        response_mask: Tensor,
        params: Iterable[str | nn.Parameter] | None = None,
        *,
        strategy: Strategy = "auto",
        compute_dtype: torch.dtype = torch.float32,
        anchor: bool = False,
        fuse_grads: bool = False,
        active: ActiveCaptures = ACTIVE_CAPTURES,
    ) -> None:
        if strategy not in STRATEGIES:
            raise GramError(f"strategy must be 'auto', 'ghost' or 'materialize', got {strategy!r}")
        self.model = model
        self.strategy: Strategy = strategy
        self.dtype = compute_dtype
        self.rows = SequenceRows(attention_mask, response_mask, compute_dtype)
        self.n, self.t = self.rows.n, self.rows.t
        self.active_captures = active
        self.selected = select_params(model, params, active)
        self.states = {pid: _ParamState(name, p) for pid, (name, p) in self.selected.items()}
        self.gram = torch.zeros(self.n, self.n, dtype=compute_dtype, device=response_mask.device)
        self.calls: list[Call] = []
        self.handles: list[Any] = []
        self.uses: dict[int, int] = defaultdict(int)
        self.anchor: Tensor | None = None
        self.anchors: list[Tensor] = []
        self.use_anchor = anchor  # standalone: this capture drives its own activation-only backward
        self.fsdp = any(isinstance(m, FSDPModule) for m in model.modules())
        # FSDP2 reduce-scatters autograd's weight gradients: the hooks cannot write them instead
        self.fuse_grads = fuse_grads and not self.fsdp
        self.alias: dict[int, int] = {}  # id of a Parameter object seen in a forward -> the selected one's id
        self._gathered_root = False
        self.saved_requires_grad: list[tuple[nn.Parameter, bool]] = []
        self.hooked = self._plan()

    # -- set-up ------------------------------------------------------------------------------

    def _plan(self) -> list[tuple[nn.Module, Rule, list[tuple[str, str, nn.Parameter]]]]:
        """Which modules to hook with which rule, as (module, rule, [(name, attribute, parameter)]);
        refuse parameters that no exact rule covers."""
        hooked: list[tuple[nn.Module, Rule, list[tuple[str, str, nn.Parameter]]]] = []
        unsupported: list[str] = []
        for mname, m in self.model.named_modules():
            own = [(pn, p) for pn, p in m._parameters.items() if p is not None and id(p) in self.selected]
            if not own:
                continue
            rule = rule_for(m)
            if rule is None:
                unsupported += [f"{mname}.{pn} ({type(m).__name__})" for pn, _ in own]
                continue
            reason = rule.refuse(m)
            if reason is not None:
                label = f"{mname}.{own[0][0]}" if mname else own[0][0]
                unsupported.append(f"{label} ({reason})")
                continue
            hooked.append((m, rule, [(self.selected[id(p)][0], pn, p) for pn, p in own]))
        if unsupported:
            raise _unsupported_error(unsupported)
        return hooked

    def __enter__(self) -> GramCapture:
        self.active_captures.enter(self)
        try:
            self._install()
        except BaseException:
            self.remove()  # a failed set-up leaves no hook and no switched-off parameter behind
            raise
        return self

    def _install(self) -> None:
        if self.fuse_grads:
            # Autograd computes no weight gradient for these; the hooks write it (the sum of the
            # per-sequence gradients they build anyway). The anchor keeps activations differentiable.
            self.saved_requires_grad = [(p, p.requires_grad) for _, p in self.selected.values()]
            for p, _ in self.saved_requires_grad:
                p.requires_grad_(False)
        if self.use_anchor or self.fuse_grads:
            emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
            if emb is None:
                raise GramError("sequence_gram needs a model with get_input_embeddings() (a causal LM)")
            self.handles.append(emb.register_forward_hook(self._anchor_hook, prepend=True))
        # the root's own parameters (embeddings, final norm, head): sequence_logps calls the decoder
        # and the head directly, so the root's pre-forward hook, which would gather them, does not run
        self._gathered_root = _gather_root(self.model)
        for m, rule, own in self.hooked:
            self.handles.append(
                m.register_forward_hook(
                    lambda mod, args, out, _r=rule, _o=own: self._fwd(mod, _r, _o, args, out)
                )
            )

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the hooks and restore requires_grad (idempotent); collected parts are kept."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for p, rg in self.saved_requires_grad:
            p.requires_grad_(rg)
        self.saved_requires_grad = []
        if self._gathered_root:
            self._gathered_root = False
            self.model.reshard()  # type: ignore[operator]
        self.active_captures.leave(self)

    # -- forward -----------------------------------------------------------------------------

    @staticmethod
    def _in_backward() -> bool:
        """True while the autograd engine runs: a forward call then is checkpoint recomputation."""
        return torch._C._current_graph_task_id() != -1

    def _recording(self) -> bool:
        """Whether a forward call now belongs to this capture's pass."""
        if self.rows.busy or self._in_backward() or not torch.is_grad_enabled():
            return False
        # a standalone sequence_gram pass inside a training step is not part of the step
        return self.use_anchor or not self.active_captures.standalone_running()

    def _anchor_hook(self, module: nn.Module, args: Any, out: Tensor) -> Tensor | None:
        if not self._recording():
            return None
        self.anchor = torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
        self.anchors.append(self.anchor)
        return out + self.anchor

    def _fwd(
        self, module: nn.Module, rule: Rule, planned: list[tuple[str, str, nn.Parameter]], args: Any, out: Any
    ) -> Tensor | None:
        if not self._recording():
            return None
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
            raise GramError(f"{type(module).__name__}: expected a tensor positional input and output")
        x = args[0]
        replaced = None
        # the Parameter objects of this call (FSDP2: the gathered ones), aliased to the selected parameters
        own: list[tuple[str, nn.Parameter]] = []
        for name, attr, p in planned:
            cur = module._parameters[attr]
            self.alias[id(cur)] = id(p)
            own.append((name, cur))  # type: ignore[arg-type]
        saved = rule.save(module, x, out)
        if rule.anchored and (self.use_anchor or self.fuse_grads):
            # Every embedding output gets a zero anchor: a branch that does not depend on the input
            # embeddings (position embeddings) must lie on the path the activation-only backward takes
            # (and be differentiable when autograd skips the weight gradients).
            a = torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
            self.anchors.append(a)
            out = replaced = out + a
        if not out.requires_grad:
            raise GramError(
                f"{type(module).__name__} output does not require grad although its parameters are selected: "
                "is reentrant gradient checkpointing on? Use gradient_checkpointing_kwargs="
                "{'use_reentrant': False} or disable it for sequence_gram"
            )
        lead = tuple(x.shape) if rule.token_rows else tuple(x.shape[:-1])
        if rule.token_rows and lead == (1, self.t) and self.n > 1:
            # Position ids shared by all rows (GPT-2's wpe): the [1, T, d] output is broadcast into
            # every sequence, so its gradient would be summed over them. Expanded to [N, T, d] (a view,
            # same values downstream) its gradient keeps the per-sequence rows.
            x = x.expand(self.n, self.t)
            out = replaced = out.expand(self.n, *out.shape[1:])
            lead = (self.n, self.t)
        seg = self.rows.attribute(module, lead, x, per_head=rule.per_head)
        call = Call(module, x.detach(), seg, own, saved)
        for _, _, p in planned:
            self.states[id(p)].pending += 1
            self.uses[id(p)] += 1
        self.calls.append(call)
        out.register_hook(lambda g, _c=call, _r=rule: self._on_grad(_c, _r, g))
        return replaced

    def check_graph(self, root: Tensor) -> None:
        """Walk the autograd graph of `root` and refuse parameters used outside the hooked calls.

        Each use of a parameter adds one edge into its AccumulateGrad node; more edges than hooked
        calls means a functional use (e.g. `F.linear(h, embed.weight)`) that the hooks do not see.
        """
        if root.grad_fn is None:
            raise GramError("the log-probs do not depend on any parameter (no autograd graph)")
        edges: dict[int, int] = defaultdict(int)
        seen: set[int] = set()
        stack = [root.grad_fn]
        while stack:
            node = stack.pop()
            for nxt, _ in node.next_functions:
                if nxt is None:
                    continue
                var = getattr(nxt, "variable", None)
                if var is not None:
                    edges[self.alias.get(id(var), id(var))] += 1
                elif id(nxt) not in seen:
                    seen.add(id(nxt))
                    stack.append(nxt)
        missed = [st.name for pid, st in self.states.items() if edges.get(pid, 0) > self.uses.get(pid, 0)]
        if missed:
            raise GramError(
                "these parameters are used outside the modules sequence_gram hooks (a functional use), "
                "so their per-sequence gradients would be incomplete: " + ", ".join(missed)
            )

    # -- backward ----------------------------------------------------------------------------

    def _on_grad(self, call: Call, rule: Rule, grad: Tensor) -> None:
        if call.done:  # a tensor hook can fire again if the graph is reused (retain_graph)
            return
        call.done = True
        for p, part in rule.parts(call, grad, self.rows):
            st = self.states[self.alias.get(id(p), id(p))]
            if isinstance(part, Outer):
                st.outers.append(part)
            else:
                st.vector = part if st.vector is None else st.vector + part
        for _, p in call.params:
            st = self.states[self.alias.get(id(p), id(p))]
            st.pending -= 1
            if st.pending == 0:
                self._flush(st)
        call.x = call.saved = None  # type: ignore[assignment]

    def _flush(self, st: _ParamState) -> None:
        if st.vector is None and not st.outers:
            return
        grad = (
            torch.zeros(st.param.shape, dtype=self.dtype, device=st.param.device) if self.fuse_grads else None
        )
        self.gram += param_gram(st.name, st.outers, st.vector, self.n, self.strategy, self.dtype, grad)
        st.outers, st.vector = [], None
        if grad is not None:
            p = st.param
            g = grad.to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g

    def finish(self) -> Tensor:
        """Process parameters whose calls did not all receive a gradient (their other uses had none)."""
        for st in self.states.values():
            self._flush(st)
            st.pending = 0
        self.calls.clear()
        return self.gram
