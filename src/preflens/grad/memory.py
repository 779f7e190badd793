"""How much memory a per-sequence gradient pass needs, known from the shapes before it runs, and the budget
it must stay under.

Why: a diagnostic must never take the machine down. The token-level probe of one HH pair turns each of
~250 response tokens into its own forward row; run at once, that grew to 23.6 GB on a 24 GB machine.
Here the peak *extra* memory of a pass (beyond the loaded model) is estimated from the batch's shapes
and the model's configuration, the pass is cut into chunks of rows that fit `--max-memory`, and when even
the smallest chunk cannot fit, the pass is refused up front with one line naming the layer, its shape and
the bytes.

What a pass over N rows holds at its peak (`estimate_gram_memory`, per selected parameter / layer):

- activations autograd keeps for the backward, per decoder layer: `tokens x (ACT_HIDDEN x hidden +
  ACT_INTERMEDIATE x intermediate)` values, plus `heads x T^2` per row when the attention kernel keeps
  its probabilities (eager); coefficients measured on SmolLM2/Llama shapes (BENCHMARKS.md, "Bounded memory");
- the unembedding's chunk: `min(response tokens, DEFAULT_CHUNK_ROWS) x vocab` logits (fp32) and their
  gradient;
- the Gram kernel of one parameter at a time (the capture reduces each parameter as soon as its
  output-gradients arrive, layer by layer), whichever form `kernels.prefers_ghost` would pick:
  ghost: the flat parts `R x (d_in + d_out)` plus three `min(R^2, BLOCK_ELEMS)` blocks (R = the rows'
  tokens, so T^2 x pairs); materialized: the padded parts `N x L x (d_in + d_out)` plus three
  `min(N x d_in x d_out, BLOCK_ELEMS)` slices (d_in x d_out x sequences).

Only the largest kernel counts (they run one after the other); activations and the head chunk are held
together with it. The estimate is an upper bound by construction where the shapes are known exactly
(kernels, head) and a measured coefficient with a margin for the activations.

Per layer, under a budget (`choose_forms`, issue 14 item 3): where the compute-cheaper form does not fit
beside the held terms but the other does, the other is forced (`MemoryEstimate.forced`, run through
`kernels.layer_forms`); where neither fits even for the smallest chunk the pass is refused naming that
layer, or, inside `memory_budget(..., skip_layers=True)` (`preflens probe --skip-oversize-layers`), the
layer is left out of the Gram and the result says it is inexact (`MemoryEstimate.skipped`).

The diagnostics that are not a standalone Gram pass (`--step-entanglement`, attribution, CHES) have their
estimators in `grad.estimates`, on the same `MemoryEstimate`.

For issue 14 (per-rank costs under FSDP2): `estimate_gram_memory(model, lengths, ...)` with the lengths a
rank sees gives that rank's peak extra bytes; `MemoryEstimate.items` breaks it down per layer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from preflens.grad.errors import GramError
from preflens.grad.kernels import BLOCK_ELEMS
from preflens.logprobs import DEFAULT_CHUNK_ROWS
from preflens.sizes import parse_size

__all__ = [
    "ACT_HIDDEN",
    "ACT_INTERMEDIATE",
    "DEFAULT_SHARE",
    "MAX_PASSES",
    "WORKSPACE",
    "MemoryBudgetError",
    "MemoryEstimate",
    "MemoryItem",
    "available_memory",
    "check_fits",
    "choose_forms",
    "human",
    "default_budget",
    "estimate_gram_memory",
    "memory_budget",
    "parse_size",
    "plan_rows",
    "refusal",
    "resolve_budget",
    "run_budget",
    "skip_layers_allowed",
    "skipped_layers",
]

# Values a pass holds per token and decoder layer, in units of hidden_size and intermediate_size: on
# SmolLM2-135M with LoRA on every linear map, autograd's saved tensors are 1.16 MiB per token over 30 layers
# (saved-tensor hooks: ~10 hidden + 2 intermediate values per layer, fp32), but the peak RSS of
# `sequence_gram_and_logps` grows by up to 3.4 MiB per token (the capture's parts, the backward's transient
# gradients, the allocator; 3.4 MiB at 4 x 128 tokens): 30 values per layer; with a margin, 32 + 8
# (BENCHMARKS.md, "Bounded memory").
ACT_HIDDEN = 32
ACT_INTERMEDIATE = 8
DEFAULT_SHARE = 0.5  # of the free memory, when no budget is given
# A pass cut into m blocks runs m (m - 1) / 2 sub-passes ((m - 1)x the compute): beyond this many it would
# run for days on the machine it was sized for, so it is refused with the estimate instead.
MAX_PASSES = 64
# Memory a pass takes whatever its size (thread pools, kernel workspaces, allocator slack): measured
# ~160 MiB on a CPU (BENCHMARKS.md, "Bounded memory").
WORKSPACE = 256 << 20

_BUDGET: list[int | None] = []  # innermost `memory_budget(...)` first
_SKIP: list[bool] = []  # innermost `memory_budget(..., skip_layers=...)` first
# The budget of a `preflens train` run (its --max-memory), set at the run's start and cleared at its end:
# the probes inside the run resolve "auto" to it when no `memory_budget` block is open.
_RUN_BUDGET: list[int | None] = [None]


class MemoryBudgetError(GramError):
    """Even the smallest chunk of a pass does not fit the memory budget (the message is one line)."""


@dataclass(frozen=True)
class MemoryItem:
    """One term of an estimate: what (activations / head / kernel), where (layer or parameter), the shape
    that sets its size, and its bytes."""

    what: str
    layer: str
    shape: tuple[int, ...]
    bytes: int
    # held for the whole pass (True) or one at a time with the other transient terms (False); None: by
    # name (the "kernel ..." terms are the one-at-a-time ones)
    transient: bool | None = None

    @property
    def one_at_a_time(self) -> bool:
        return self.what.startswith("kernel") if self.transient is None else self.transient


@dataclass
class MemoryEstimate:
    """Peak extra bytes of one pass: the held terms plus the largest one-at-a-time kernel."""

    rows: int
    tokens: int
    items: list[MemoryItem] = field(default_factory=list)
    # parameter name -> the form the budget forces where it differs from the compute-cheaper one
    # ("ghost" / "materialize" / "skip"; `choose_forms`): what the pass runs under `kernels.layer_forms`
    forced: dict[str, str] = field(default_factory=dict)

    @property
    def held(self) -> int:
        return sum(i.bytes for i in self.items if not i.one_at_a_time)

    @property
    def largest_kernel(self) -> MemoryItem | None:
        kernels = [i for i in self.items if i.one_at_a_time]
        return max(kernels, key=lambda i: i.bytes) if kernels else None

    @property
    def skipped(self) -> list[str]:
        """Layers (parameters) whose Gram term this pass leaves out (`choose_forms(..., skip=True)`)."""
        return [i.layer for i in self.items if i.what == "kernel (skipped)"]

    @property
    def forms(self) -> dict[str, str]:
        """Per parameter, the Gram form this estimate counts ("ghost" / "materialize" / "skip"):
        the breakdown `--explain-memory` prints (the forced ones are in `forced`)."""
        names = {
            "kernel (ghost)": "ghost",
            "kernel (materialized)": "materialize",
            "kernel (skipped)": "skip",
        }
        return {i.layer: names[i.what] for i in self.items if i.what in names}

    def breakdown(self, limit: int = 12) -> list[str]:
        """The terms, largest first (`limit` of them), and how many layers run in each Gram form
        (`preflens probe --explain-memory`)."""
        rows = sorted(self.items, key=lambda i: -i.bytes)
        out = [f"{human(i.bytes):>10}  {i.what:<22} {i.layer} {list(i.shape)}" for i in rows[:limit]]
        if len(rows) > limit:
            out.append(f"{'':>10}  ... {len(rows) - limit} smaller terms")
        counts: dict[str, int] = {}
        for form in self.forms.values():
            counts[form] = counts.get(form, 0) + 1
        if counts:
            forced = f"; forced by the budget: {len(self.forced)}" if self.forced else ""
            out.append(
                f"total {human(self.total)}; Gram forms per layer: "
                + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                + forced
            )
        return out

    @property
    def total(self) -> int:
        k = self.largest_kernel
        return self.held + (k.bytes if k is not None else 0)

    def largest(self) -> MemoryItem:
        """The single term that weighs most (named in a refusal; the fixed workspace is not a layer)."""
        return max((i for i in self.items if i.what != "workspace"), key=lambda i: i.bytes)

    def describe(self) -> str:
        big = self.largest()
        return (
            f"{self.rows} rows, {self.tokens} tokens: {human(self.total)} "
            f"(largest: {big.what} of {big.layer} {list(big.shape)}, {human(big.bytes)})"
        )


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# ---------------------------------------------------------------------------------------------
# the budget
# ---------------------------------------------------------------------------------------------


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory(device: torch.device | str | None = None) -> int:
    """Free bytes where the pass runs: `torch.cuda.mem_get_info` on a GPU, else the free RAM (psutil when
    installed, else /proc/meminfo's MemAvailable; 8 GiB when neither can be read)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        import psutil
    except ImportError:
        psutil = None  # type: ignore[assignment]
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    got = _meminfo_available()
    return got if got is not None else 8 << 30


def default_budget(device: torch.device | str | None = None, share: float = DEFAULT_SHARE) -> int:
    """`share` of the free memory (`PREFLENS_MAX_MEMORY`, in bytes, overrides it)."""
    env = os.environ.get("PREFLENS_MAX_MEMORY")
    if env:
        return int(float(env))
    return int(available_memory(device) * share)


@contextlib.contextmanager
def memory_budget(max_bytes: int | None, *, skip_layers: bool = False) -> Iterator[None]:
    """Within the block, passes that are not given a budget use `max_bytes` (None: the default budget).

    How a command's `--max-memory` reaches passes run deep inside a diagnostic (the token-level probe).
    `skip_layers`: a layer whose Gram kernel cannot fit even for the smallest chunk is left out of the Gram
    (`choose_forms`) instead of refusing the pass; the result is then inexact and says which layers."""
    _BUDGET.insert(0, max_bytes)
    _SKIP.insert(0, bool(skip_layers))
    try:
        yield
    finally:
        _BUDGET.pop(0)
        _SKIP.pop(0)


def skip_layers_allowed() -> bool:
    """Whether the innermost `memory_budget` block allows leaving out layers that cannot fit."""
    return bool(_SKIP and _SKIP[0])


def run_budget(max_bytes: int | None) -> None:
    """Set (an int) or clear (None) the budget of a training run: what "auto" resolves to when no
    `memory_budget` block is open (the probes of `preflens train --max-memory`)."""
    _RUN_BUDGET[0] = max_bytes


def resolve_budget(max_memory: int | str | None, device: torch.device | str | None = None) -> int:
    """Bytes a pass may use: an int as given; "auto" or None: the innermost `memory_budget`, else
    `default_budget(device)`."""
    if isinstance(max_memory, int) and not isinstance(max_memory, bool):
        if max_memory <= 0:
            raise GramError(f"max_memory must be a positive number of bytes, got {max_memory}")
        return max_memory
    if max_memory not in (None, "auto"):
        raise GramError(f"max_memory must be bytes (int), 'auto' or None, got {max_memory!r}")
    if _BUDGET and _BUDGET[0] is not None:
        return int(_BUDGET[0])
    if _RUN_BUDGET[0] is not None:
        return int(_RUN_BUDGET[0])
    return default_budget(device)


# ---------------------------------------------------------------------------------------------
# the estimate
# ---------------------------------------------------------------------------------------------


def _config_dims(model: nn.Module) -> dict[str, int]:
    cfg = getattr(model, "config", None)
    get = (lambda k, d=0: int(getattr(cfg, k, None) or d)) if cfg is not None else (lambda k, d=0: d)
    hidden = get("hidden_size", get("n_embd", 0))
    dims = {
        "layers": get("num_hidden_layers", get("n_layer", 0)),
        "hidden": hidden,
        "intermediate": get("intermediate_size", get("n_inner", 0) or 4 * hidden),
        "heads": get("num_attention_heads", get("n_head", 0)),
        "vocab": get("vocab_size", 0),
    }
    if not dims["layers"] or not hidden:  # not a transformers config: count the linear maps' widths
        widths = [m.in_features for m in model.modules() if isinstance(m, nn.Linear)]
        dims.update(layers=1, hidden=sum(widths) // max(1, ACT_HIDDEN) or 1, intermediate=0)
    dims["eager"] = int(getattr(cfg, "_attn_implementation", "sdpa") == "eager") if cfg is not None else 0
    return dims


def _selected(
    model: nn.Module, params: Iterable[str | nn.Parameter] | None
) -> list[tuple[str, nn.Parameter]]:
    named = list(model.named_parameters())
    if params is None:
        return [(n, p) for n, p in named if p.requires_grad]
    want = list(params)
    names = {w for w in want if isinstance(w, str)}
    ids = {id(w) for w in want if not isinstance(w, str)}
    return [(n, p) for n, p in named if n in names or id(p) in ids]


def _kernel_forms(
    name: str, p: nn.Parameter, onehot: bool, rows: int, n: int, longest: int, dsize: int
) -> tuple[str, dict[str, MemoryItem]]:
    """The Gram kernel of one parameter over `rows` tokens of `n` sequences (kernels.param_gram): the form
    `kernels.prefers_ghost` picks by compute ("ghost" / "materialize"), and each form's memory."""
    if p.dim() < 2:
        item = MemoryItem("kernel", name, (n, p.numel()), 2 * n * p.numel() * dsize)
        return "materialize", {"materialize": item, "ghost": item}
    d_out, d_in = int(p.shape[0]), int(p.shape[-1])
    if onehot:  # nn.Embedding [vocab, d]: the one-hot side is the vocabulary, only ids are stored
        d_in, d_out = int(p.shape[0]), int(p.shape[1])
    a_cost = 1 if onehot else d_in
    ghost_cost = float(rows) * rows * (a_cost + d_out)
    mat_cost = float(rows) * (d_in * d_out if not onehot else d_out) + float(n) * n * d_in * d_out
    parts = rows * ((0 if onehot else d_in) + d_out)
    blocks = 3 * min(rows * rows, max(BLOCK_ELEMS, rows))
    padded = n * longest * ((0 if onehot else d_in) + d_out)
    slices = 3 * min(n * d_in * d_out, max(BLOCK_ELEMS, n * d_out))
    forms = {
        "ghost": MemoryItem("kernel (ghost)", name, (rows, rows), (parts + blocks) * dsize),
        "materialize": MemoryItem("kernel (materialized)", name, (n, d_in, d_out), (padded + slices) * dsize),
    }
    return ("ghost" if ghost_cost < mat_cost else "materialize"), forms


def _kernel_item(
    name: str,
    p: nn.Parameter,
    onehot: bool,
    rows: int,
    n: int,
    longest: int,
    dsize: int,
    form: str | None = None,
) -> MemoryItem:
    """The kernel term of one parameter: the form asked for (`choose_forms`), else the cheaper one."""
    auto, forms = _kernel_forms(name, p, onehot, rows, n, longest, dsize)
    if form == "skip":
        return MemoryItem("kernel (skipped)", name, forms[auto].shape, 0)
    return forms[form if form in forms else auto]


def _onehot_owners(model: nn.Module) -> dict[int, bool]:
    return {
        id(m.weight): isinstance(m, nn.Embedding)
        for m in model.modules()
        if isinstance(getattr(m, "weight", None), nn.Parameter)
    }


def _sizes(model: nn.Module, compute_dtype: torch.dtype) -> tuple[int, int]:
    act_dtype = next((p.dtype for p in model.parameters()), torch.float32)
    asize = torch.finfo(act_dtype).bits // 8 if act_dtype.is_floating_point else 4
    return asize, torch.finfo(compute_dtype).bits // 8


def estimate_gram_memory(
    model: nn.Module,
    lengths: Sequence[int],
    response_tokens: int | None = None,
    params: Iterable[str | nn.Parameter] | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
    forms: dict[str, str] | None = None,
) -> MemoryEstimate:
    """Peak extra bytes of `sequence_gram` over rows of these `lengths` (tokens up to and including each
    row's last response token), from shapes alone.

    `response_tokens`: response tokens over all rows (default: sum(lengths), an upper bound); `params`: as
    `sequence_gram`'s (default: the trainable ones); `forms`: parameter name -> "ghost" / "materialize" /
    "skip" (`choose_forms`; default: the form the kernels pick by compute). Nothing runs: the model is only
    inspected.
    """
    lengths = [int(x) for x in lengths]
    n, tokens = len(lengths), sum(lengths)
    longest = max(lengths, default=0)
    dims = _config_dims(model)
    asize, dsize = _sizes(model, compute_dtype)
    est = MemoryEstimate(rows=n, tokens=tokens)
    per_token = ACT_HIDDEN * dims["hidden"] + ACT_INTERMEDIATE * dims["intermediate"]
    padded = n * longest  # right padding: the forward runs every row to the longest one
    attn = dims["heads"] * n * longest * longest if dims["eager"] else 0
    est.items.append(
        MemoryItem(
            "activations",
            f"{dims['layers']} layers",
            (n, longest, per_token),
            dims["layers"] * (padded * per_token + 2 * attn) * asize,
        )
    )
    est.items.append(MemoryItem("workspace", "runtime", (), WORKSPACE))
    resp = tokens if response_tokens is None else int(response_tokens)
    head_rows = min(max(resp, 0), DEFAULT_CHUNK_ROWS)
    est.items.append(
        MemoryItem("unembedding", "lm_head", (head_rows, dims["vocab"]), 3 * head_rows * dims["vocab"] * 4)
    )
    owners = _onehot_owners(model)
    forms = forms or {}
    est.forced = dict(forms)
    for name, p in _selected(model, params):
        onehot = owners.get(id(p), False)
        est.items.append(_kernel_item(name, p, onehot, tokens, n, longest, dsize, forms.get(name)))
    return est


def choose_forms(
    model: nn.Module,
    lengths: Sequence[int],
    budget: int,
    params: Iterable[str | nn.Parameter] | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
    skip: bool = False,
    fixed: dict[str, str] | None = None,
) -> dict[str, str]:
    """Per parameter, the Gram form of a pass over rows of these `lengths` under `budget` (issue 14 item 3):
    the compute-cheaper form where it fits beside the held terms (activations, head, workspace) (not
    listed); else the other form where that fits; else, with `skip`, "skip" (the layer is left out of the
    Gram: the result is inexact and says so), without it nothing (the cheaper form stays, and the pass is
    refused by `plan_rows`, naming that layer). Returns only the forced forms; `fixed`: forms decided
    before (kept as they are)."""
    lengths = [int(x) for x in lengths]
    n, rows = len(lengths), sum(lengths)
    longest = max(lengths, default=0)
    _, dsize = _sizes(model, compute_dtype)
    sel = None if params is None else list(params)
    held = estimate_gram_memory(model, lengths, params=[], compute_dtype=compute_dtype).held
    owners = _onehot_owners(model)
    out: dict[str, str] = dict(fixed or {})
    for name, p in _selected(model, sel):
        if name in out:
            continue
        auto, forms = _kernel_forms(name, p, owners.get(id(p), False), rows, n, longest, dsize)
        other = "materialize" if auto == "ghost" else "ghost"
        if held + forms[auto].bytes <= budget:
            continue  # the compute-cheaper form fits: nothing forced
        if held + forms[other].bytes <= budget:
            out[name] = other
        elif skip:
            out[name] = "skip"
    return out


def skipped_layers(forms: dict[str, str] | None) -> list[str]:
    return sorted(k for k, v in (forms or {}).items() if v == "skip")


def refusal(
    what: str, est: MemoryEstimate, budget: int, hint: str, *, rows: int | None = None
) -> MemoryBudgetError:
    """The one-line refusal: what, the estimate, the budget, the largest term's layer, shape and bytes,
    and the largest one-at-a-time kernel's when that is another term (the layer that cannot fit)."""
    big = est.largest()
    count = f"even {rows} row(s) need" if rows is not None else "needs"
    kernel = est.largest_kernel
    also = ""
    if kernel is not None and kernel is not big and kernel.bytes:
        also = (
            f"; largest kernel: {kernel.what} of {kernel.layer} with shape {list(kernel.shape)} = "
            f"{human(kernel.bytes)} ({kernel.bytes} bytes)"
        )
    return MemoryBudgetError(
        f"{what}: {count} {human(est.total)} ({est.total} bytes), over the memory budget "
        f"of {human(budget)} ({budget} bytes); "
        f"largest: {big.what} of {big.layer} with shape {list(big.shape)} = {human(big.bytes)} "
        f"({big.bytes} bytes){also}. {hint}"
    )


def check_fits(
    est: MemoryEstimate, budget: int, what: str, hint: str = "Raise --max-memory"
) -> MemoryEstimate:
    """`est` when it fits `budget`; else the one-line `MemoryBudgetError` (for work that cannot be chunked)."""
    if est.total > budget:
        raise refusal(what, est, budget, hint)
    return est


def plan_rows(
    estimate_of: Any,
    n: int,
    budget: int,
    *,
    min_rows: int,
    what: str,
) -> int:
    """The most rows per run (<= n) whose estimate fits `budget`: `estimate_of(k)` -> MemoryEstimate of a
    run over k rows. Refuses (`MemoryBudgetError`, one line) when `min_rows` do not fit."""
    if n <= 0:
        return 0
    full = estimate_of(n)
    if full.total <= budget:
        return n
    lo, hi = min(min_rows, n), n  # invariant: hi does not fit
    small = estimate_of(lo)
    if small.total > budget:
        raise refusal(
            what, small, budget,
            "Raise --max-memory, or lower --max-length / --batch-size / --token-level", rows=lo,
        )  # fmt: skip
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if estimate_of(mid).total <= budget:
            lo = mid
        else:
            hi = mid
    return lo
