"""One harness for every per-sequence gradient rule of `preflens.grad.rules` (as Opacus tests its grad samplers).

For each registered rule, `CASES` builds small modules of that kind in the row layouts the rule meets in
real models (the [N, T] grid, the grid flattened to [N*T, d], flat response-token rows, per-head rows,
shared position ids, a tied lm_head), places each inside a tiny causal "LM", and compares the Gram of the
module's own parameters from `preflens.grad.sequence_gram` with an explicit loop: one autograd backward
per sequence of the batch's summed response log-prob, in float64. A test checks that every registered
kind has cases, so a new rule cannot land without one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from preflens.grad import (
    GramError,
    StepGramCapture,
    registered_rules,
    rule_for,
    sequence_gram,
)
from preflens.grad.rules import Conv1DRule, EmbeddingRule, LinearRule, NormRule
from preflens.logprobs import sequence_logps

pytestmark = pytest.mark.usefixtures("one_thread")

V, D, H = 13, 8, 2  # vocabulary, width, heads (per-head norms)
DT = torch.float64


# ---------------------------------------------------------------------------------------------
# a tiny causal LM around the module under test


class _Body(nn.Module):
    """Applies the module under test to the [N, T, D] hidden states in one of the layouts real models use,
    then a causal running mean (so positions interact causally, as in attention)."""

    def __init__(self, module: nn.Module, layout: str) -> None:
        super().__init__()
        self.module = module
        self.layout = layout

    def forward(self, h: Tensor) -> Tensor:
        n, t, d = h.shape
        if self.layout == "flat":  # OPT's [N*T, d] layers
            y = self.module(h.reshape(n * t, d)).reshape(n, t, -1)
        elif self.layout == "heads":  # Qwen3's per-head q/k norms on [N, T, H, d/H]
            y = self.module(h.reshape(n, t, H, d // H)).reshape(n, t, d)
        else:
            y = self.module(h)
        y = torch.tanh(y)
        return y.cumsum(1) / torch.arange(1, t + 1, dtype=y.dtype)[None, :, None]


class _Decoder(nn.Module):
    def __init__(self, embed: nn.Embedding, body: nn.Module, positions: nn.Embedding | None) -> None:
        super().__init__()
        self.embed = embed
        self.body = body
        self.positions = positions

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, use_cache: bool = False):
        h = self.embed(input_ids)
        if self.positions is not None:  # GPT-2's wpe: [1, T] ids shared by every row
            h = h + self.positions(torch.arange(input_ids.shape[1])[None, :])
        return SimpleNamespace(last_hidden_state=self.body(h))


class Head(nn.Linear):
    """The lm_head. A subclass, so `sequence_logps` never takes its fused head kernel (plain nn.Linear
    without hooks only): the loop then differentiates the very float ops the hooked pass runs, and
    float64 agreement is to round-off (the fused kernel agrees to ~1e-8 only)."""


class TinyLM(nn.Module):
    """Shaped like a Hugging Face causal LM for `sequence_logps` (decoder + lm_head on response rows)."""

    base_model_prefix = "decoder"

    def __init__(
        self,
        body: nn.Module,
        *,
        embed: nn.Embedding | None = None,
        positions: nn.Embedding | None = None,
        head: nn.Module | None = None,
        tied: bool = False,
    ) -> None:
        super().__init__()
        self.config = SimpleNamespace()
        self.decoder = _Decoder(embed if embed is not None else nn.Embedding(V, D), body, positions)
        self.lm_head = head if head is not None else Head(D, V, bias=False)
        if tied:
            self.lm_head.weight = self.decoder.embed.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.decoder.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


# ---------------------------------------------------------------------------------------------
# the modules of each kind


class ScaledEmbedding(nn.Embedding):
    """Gemma's scaled word embedding: E[ids] * sqrt(d) from the embedding module itself."""

    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(ids) * D**0.5


class OffsetRMSNorm(nn.Module):
    """Gemma-style RMSNorm scaling by (1 + w): found by name, f(x; w=0) != 0 (the "affine" form)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def _identity_body() -> nn.Module:
    return _Body(nn.Identity(), "grid")


@dataclass
class Case:
    """A model and the parameters whose Gram is checked (those of the module under test)."""

    model: nn.Module
    params: list[nn.Parameter]
    rtol: float = 1e-9


def _body_case(module: nn.Module, layout: str = "grid") -> Case:
    return Case(TinyLM(_Body(module, layout)), list(module.parameters()))


def _head_case() -> Case:  # an lm_head with bias: a Linear on flat response-token rows
    head = Head(D, V, bias=True)
    return Case(TinyLM(_identity_body(), head=head), list(head.parameters()))


def _embedding_case(embed: nn.Embedding, tied: bool = False, rtol: float = 1e-9) -> Case:
    return Case(TinyLM(_Body(nn.Linear(D, D), "grid"), embed=embed, tied=tied), [embed.weight], rtol)


def _positions_case() -> Case:
    pos = nn.Embedding(16, D)
    return Case(TinyLM(_Body(nn.Linear(D, D), "grid"), positions=pos), [pos.weight])


def _whole_model_case() -> Case:  # every kind at once, tied: all parameters of the model
    body = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D), Conv1D(D, D))
    model = TinyLM(_Body(body, "grid"), embed=nn.Embedding(V, D, padding_idx=0), tied=True)
    return Case(model, list(model.parameters()))


CASES: dict[str, dict[str, Callable[[], Case]]] = {
    "linear": {
        "grid": lambda: _body_case(nn.Linear(D, D)),
        "grid-no-bias": lambda: _body_case(nn.Linear(D, D, bias=False)),
        "flattened-grid": lambda: _body_case(nn.Linear(D, D), "flat"),
        "response-rows": _head_case,
        "whole-model-tied": _whole_model_case,
    },
    "conv1d": {
        "grid": lambda: _body_case(Conv1D(D, D)),
        "flattened-grid": lambda: _body_case(Conv1D(D, D), "flat"),
    },
    "embedding": {
        "input": lambda: _embedding_case(nn.Embedding(V, D)),
        "padding-idx": lambda: _embedding_case(nn.Embedding(V, D, padding_idx=0)),
        # the rule estimates the scale c from the output in float32 (embedding_scale): 1e-7 relative
        "scaled-subclass": lambda: _embedding_case(ScaledEmbedding(V, D), rtol=1e-6),
        "tied-lm-head": lambda: _embedding_case(nn.Embedding(V, D), tied=True),
        "shared-position-ids": _positions_case,
    },
    "norm": {
        "layernorm": lambda: _body_case(nn.LayerNorm(D)),
        "rmsnorm": lambda: _body_case(nn.RMSNorm(D)),
        "named-offset-rmsnorm": lambda: _body_case(OffsetRMSNorm(D)),
        "per-head": lambda: _body_case(nn.RMSNorm(D // H), "heads"),
    },
}


def _build(factory: Callable[[], Case]) -> Case:
    torch.manual_seed(0)
    case = factory()
    case.model.to(DT).eval()
    with torch.no_grad():  # non-trivial weights everywhere (norm weights start at 1 or 0, biases at 0)
        for p in case.model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return case


def _batch(n: int = 4, t: int = 7) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded rows of different lengths and prompt lengths; pad id 0."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (n, t), generator=g)
    att = torch.zeros(n, t, dtype=torch.long)
    rm = torch.zeros(n, t, dtype=torch.bool)
    for s in range(n):
        length = t - (s % 3)
        att[s, :length] = 1
        rm[s, 1 + s % 2 : length] = True
        ids[s, length:] = 0
    ids[0, 2] = 0  # a padding-id token inside a response (padding_idx rows get no gradient)
    return ids, att, rm


def loop_gram(model: nn.Module, params: list[nn.Parameter], ids: Tensor, att: Tensor, rm: Tensor) -> Tensor:
    """The definition: G[s, t] = <d logp_s/d theta, d logp_t/d theta>, one backward per sequence."""
    logps = sequence_logps(model, ids, att, rm).logps
    rows = []
    for s in range(ids.shape[0]):
        grads = torch.autograd.grad(logps[s], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
            )
        )
    g = torch.stack(rows).double()
    return g @ g.T


ALL_CASES = [(kind, name) for kind, cases in CASES.items() for name in cases]


@pytest.mark.parametrize(("kind", "name"), ALL_CASES, ids=[f"{k}-{n}" for k, n in ALL_CASES])
def test_rule_matches_per_sequence_autograd_loop(kind: str, name: str) -> None:
    case = _build(CASES[kind][name])
    ids, att, rm = _batch()
    ref = loop_gram(case.model, case.params, ids, att, rm)
    assert ref.diagonal().min() > 0, "a degenerate case: some sequence has no gradient"
    for strategy in ("auto", "ghost", "materialize"):
        g = sequence_gram(case.model, ids, att, rm, case.params, strategy=strategy, compute_dtype=DT)
        assert g.dtype == DT and g.shape == ref.shape
        err = float((g - ref).norm() / ref.norm())
        assert err < case.rtol, (strategy, err)
    assert all(p.grad is None for p in case.model.parameters())  # the backward is activation-only


def test_every_registered_rule_has_cases_and_is_found_by_module_type() -> None:
    rules = registered_rules()
    assert set(rules) == set(CASES) == {"linear", "conv1d", "embedding", "norm"}
    assert isinstance(rule_for(nn.Linear(2, 2)), LinearRule)
    assert rule_for(nn.Bilinear(2, 2, 2)) is None
    assert isinstance(rule_for(Conv1D(2, 2)), Conv1DRule)
    assert isinstance(rule_for(ScaledEmbedding(3, 2)), EmbeddingRule)  # a subclass: found through the MRO
    assert isinstance(rule_for(OffsetRMSNorm(2)), NormRule)  # no common base: found by its name
    assert rule_for(nn.LayerNorm(2, elementwise_affine=False)) is None  # no weight: nothing to cover
    assert all(r.supports for r in rules.values())


class Gain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain


def test_unsupported_parameters_raise_gram_error_naming_them() -> None:
    ids, att, rm = _batch()
    model = _build(lambda: _body_case(nn.Sequential(nn.Linear(D, D), Gain()))).model
    with pytest.raises(GramError, match=r"decoder\.body\.module\.1\.gain \(Gain\)"):
        sequence_gram(model, ids, att, rm)
    # the others are fine once it is excluded
    names = [n for n, _ in model.named_parameters() if not n.endswith("gain")]
    assert sequence_gram(model, ids, att, rm, names).shape == (4, 4)

    embed = nn.Embedding(V, D, max_norm=1.0)
    model = _build(lambda: _embedding_case(embed)).model
    with pytest.raises(GramError, match=r"decoder\.embed\.weight \(Embedding with max_norm"):
        sequence_gram(model, ids, att, rm, [embed.weight])


class ExpRMSNorm(OffsetRMSNorm):
    """Named like a norm but not affine in its weight: refused when its gradient is computed."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight.exp()


class FunctionalHead(nn.Module):
    """Reads the embedding weight functionally (not through a hooked module): an unseen use."""

    def __init__(self, embed: nn.Embedding) -> None:
        super().__init__()
        self.embed = embed

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(h, self.embed.weight)


def test_rules_refuse_what_they_cannot_do_exactly() -> None:
    ids, att, rm = _batch()
    model = _build(lambda: _body_case(ExpRMSNorm(D))).model
    with pytest.raises(GramError, match="not elementwise-affine"):
        sequence_gram(model, ids, att, rm, list(model.decoder.body.parameters()))
    embed = nn.Embedding(V, D)
    model = _build(lambda: Case(TinyLM(_identity_body(), embed=embed, head=FunctionalHead(embed)), [])).model
    with pytest.raises(GramError, match=r"functional use.*decoder\.embed\.weight"):
        sequence_gram(model, ids, att, rm)


@pytest.mark.parametrize("fuse", [False, True])
def test_a_standalone_pass_inside_a_step_capture_is_not_part_of_the_step(fuse: bool) -> None:
    """The `normalized` loss asks for gradient norms inside a step whose capture hooks the same modules:
    the step's Gram and (fused) gradients are those of the step alone, and the nested pass sees the
    parameters a fused capture switched off as trainable."""
    case = _build(_whole_model_case)
    model, params = case.model, case.params
    ids, att, rm = _batch()
    ref = loop_gram(model, params, ids, att, rm)
    c = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=DT)
    twin_grads = torch.autograd.grad((c * sequence_logps(model, ids, att, rm).logps).sum(), params)
    cap = StepGramCapture(model, att, rm, fuse_grads=fuse)
    with cap:
        nested = sequence_gram(model, ids, att, rm, compute_dtype=DT)
        lp = sequence_logps(model, ids, att, rm).logps
        cap.watch(lp)
        (c * lp).sum().backward()
    torch.testing.assert_close(nested, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))
    torch.testing.assert_close(cap.result().double(), ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    assert all(p.requires_grad for p in params)
    for p, q in zip(params, twin_grads):
        torch.testing.assert_close(p.grad, q, rtol=1e-4, atol=1e-6)  # fused: float32 sums


def test_the_old_module_path_reexports_the_package() -> None:
    """`preflens.diagnostics.gram` (DESIGN.md fixes `preflens.diagnostics.gram.sequence_gram`) is a shim."""
    import preflens.grad as grad
    from preflens.diagnostics import gram

    for name in gram.__all__:
        assert getattr(gram, name) is getattr(grad, name), name
    assert {"sequence_gram", "sequence_gram_and_logps", "sequence_grad_norms", "token_gram"} <= set(
        gram.__all__
    )
    assert {"GramCapture", "StepGramCapture", "GramError"} <= set(gram.__all__)
