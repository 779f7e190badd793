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
    "human",
    "default_budget",
    "estimate_gram_memory",
    "memory_budget",
    "plan_rows",
    "resolve_budget",
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


@dataclass
class MemoryEstimate:
    """Peak extra bytes of one pass: the held terms plus the largest one-at-a-time kernel."""

    rows: int
    tokens: int
    items: list[MemoryItem] = field(default_factory=list)

    @property
    def held(self) -> int:
        return sum(i.bytes for i in self.items if not i.what.startswith("kernel"))

    @property
    def largest_kernel(self) -> MemoryItem | None:
        kernels = [i for i in self.items if i.what.startswith("kernel")]
        return max(kernels, key=lambda i: i.bytes) if kernels else None

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
def memory_budget(max_bytes: int | None) -> Iterator[None]:
    """Within the block, passes that are not given a budget use `max_bytes` (None: the default budget).

    How a command's `--max-memory` reaches passes run deep inside a diagnostic (the token-level probe)."""
    _BUDGET.insert(0, max_bytes)
    try:
        yield
    finally:
        _BUDGET.pop(0)


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


def _kernel_item(
    name: str, p: nn.Parameter, onehot: bool, rows: int, n: int, longest: int, dsize: int
) -> MemoryItem:
    """The Gram kernel of one parameter over `rows` tokens of `n` sequences (kernels.param_gram)."""
    if p.dim() < 2:
        return MemoryItem("kernel", name, (n, p.numel()), 2 * n * p.numel() * dsize)
    d_out, d_in = int(p.shape[0]), int(p.shape[-1])
    if onehot:  # nn.Embedding [vocab, d]: the one-hot side is the vocabulary, only ids are stored
        d_in, d_out = int(p.shape[0]), int(p.shape[1])
    a_cost = 1 if onehot else d_in
    ghost_cost = float(rows) * rows * (a_cost + d_out)
    mat_cost = float(rows) * (d_in * d_out if not onehot else d_out) + float(n) * n * d_in * d_out
    if ghost_cost < mat_cost:
        parts = rows * ((0 if onehot else d_in) + d_out)
        blocks = 3 * min(rows * rows, max(BLOCK_ELEMS, rows))
        return MemoryItem("kernel (ghost)", name, (rows, rows), (parts + blocks) * dsize)
    padded = n * longest * ((0 if onehot else d_in) + d_out)
    slices = 3 * min(n * d_in * d_out, max(BLOCK_ELEMS, n * d_out))
    return MemoryItem("kernel (materialized)", name, (n, d_in, d_out), (padded + slices) * dsize)


def estimate_gram_memory(
    model: nn.Module,
    lengths: Sequence[int],
    response_tokens: int | None = None,
    params: Iterable[str | nn.Parameter] | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> MemoryEstimate:
    """Peak extra bytes of `sequence_gram` over rows of these `lengths` (tokens up to and including each
    row's last response token), from shapes alone.

    `response_tokens`: response tokens over all rows (default: sum(lengths), an upper bound); `params`: as
    `sequence_gram`'s (default: the trainable ones). Nothing runs: the model is only inspected.
    """
    lengths = [int(x) for x in lengths]
    n, tokens = len(lengths), sum(lengths)
    longest = max(lengths, default=0)
    dims = _config_dims(model)
    act_dtype = next((p.dtype for p in model.parameters()), torch.float32)
    asize = torch.finfo(act_dtype).bits // 8 if act_dtype.is_floating_point else 4
    dsize = torch.finfo(compute_dtype).bits // 8
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
    owners = {
        id(m.weight): isinstance(m, nn.Embedding)
        for m in model.modules()
        if isinstance(getattr(m, "weight", None), nn.Parameter)
    }
    for name, p in _selected(model, params):
        est.items.append(_kernel_item(name, p, owners.get(id(p), False), tokens, n, longest, dsize))
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
        big = small.largest()
        raise MemoryBudgetError(
            f"{what}: even {lo} row(s) need {human(small.total)} ({small.total} bytes), over the memory budget "
            f"of {human(budget)} ({budget} bytes); "
            f"largest: {big.what} of {big.layer} with shape {list(big.shape)} = {human(big.bytes)} "
            f"({big.bytes} bytes). Raise --max-memory, or lower --max-length / --batch-size / --token-level"
        )
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if estimate_of(mid).total <= budget:
            lo = mid
        else:
            hi = mid
    return lo
