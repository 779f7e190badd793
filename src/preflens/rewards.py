"""Reward functions for reinforcement finetuning and the reward-std diagnostic.

Why this module exists: the vanishing-gradients diagnostic (Razin et al. 2024, arXiv 2310.20703,
ICLR 2024) and the RFT loop need a reward r(x, y) for each sampled completion y of a prompt x. Rewards
come from very different places (string matching, a local reward model, a user's own Python function), so
they share one small interface:

    reward(prompts, completions, *, references=None) -> list[float]

one float per (prompt, completion) pair. Built-ins need no download. A spec string picks one:

| spec | reward |
|---|---|
| `exact` / `exact:C,W` | C (default 1) if the completion equals the reference after stripping whitespace, else W (default 0) |
| `normalized` / `normalized:C,W` | the same after SQuAD-style normalization (lower case, no punctuation/articles, single spaces) |
| `regex:PATTERN` | 1 if `re.search(PATTERN, completion)` matches, else 0 |
| `keyword:W1,W2,...` | the fraction of the keywords found in the completion (case-insensitive, whole words) |
| `length:N` | -abs(n_words - N) / N, n_words = whitespace-separated words (0 at the target, linear below) |
| `rougeL` | ROUGE-L F1 between completion and reference (whitespace tokens, lower case; Lin 2004) |
| `model:/path` | a local `AutoModelForSequenceClassification` scoring prompt + completion |
| `module:function` | a user's callable `fn(prompts, completions[, references=...]) -> list[float]` |

`score(...)` calls a reward and validates its output (count, finiteness) so that a broken reward
raises a `RewardError` naming the prompt instead of silently training on garbage.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from preflens.errors import PreflensError

__all__ = [
    "Reward",
    "RewardError",
    "ExactMatch",
    "RegexMatch",
    "KeywordReward",
    "LengthTarget",
    "RougeL",
    "ModelReward",
    "CallableReward",
    "get_reward",
    "rouge_l",
    "lcs_length",
    "normalize_answer",
    "score",
    "BUILTIN_REWARDS",
]


class RewardError(PreflensError):
    """A reward function failed, returned a non-finite value or the wrong number of values."""


class Reward:
    """Base class: `__call__(prompts, completions, *, references=None) -> list[float]`.

    `needs_reference` says whether the reward reads the prompt's `reference` field (so loaders can
    reject rows without one up front). `value_range` is (low, high) when the reward is bounded; the
    diagnostic uses its midpoint as the default "low reward" threshold.
    """

    name: str = "reward"
    needs_reference: bool = False
    value_range: tuple[float, float] | None = None

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        *,
        references: Sequence[str | None] | None = None,
    ) -> list[float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def _refs(self, references: Sequence[str | None] | None, n: int) -> list[str]:
        if references is None or len(references) != n:
            raise RewardError(
                f"reward {self.name!r} compares against a reference: every prompt needs a `reference` field"
            )
        out = []
        for i, r in enumerate(references):
            if r is None:
                raise RewardError(
                    f"reward {self.name!r}: completion {i} has no reference (field `reference`)"
                )
            out.append(str(r))
        return out


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style answer normalization: lower case, drop punctuation and articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


@dataclass(repr=False)
class ExactMatch(Reward):
    """`correct` if completion == reference (stripped, or SQuAD-normalized), else `wrong`.

    The apple/ml-rlgrad controlled setting uses correct=+1, wrong=-1 (DESIGN.md reference settings).
    """

    normalize: bool = False
    correct: float = 1.0
    wrong: float = 0.0

    def __post_init__(self) -> None:
        self.name = "normalized" if self.normalize else "exact"
        self.needs_reference = True
        self.value_range = (min(self.correct, self.wrong), max(self.correct, self.wrong))

    def __call__(self, prompts, completions, *, references=None) -> list[float]:
        refs = self._refs(references, len(completions))
        f = normalize_answer if self.normalize else str.strip
        return [self.correct if f(c) == f(r) else self.wrong for c, r in zip(completions, refs)]


class RegexMatch(Reward):
    """1 if the pattern is found anywhere in the completion (`re.search`), else 0."""

    value_range = (0.0, 1.0)

    def __init__(self, pattern: str) -> None:
        try:
            self.pattern = re.compile(pattern)
        except re.error as exc:
            raise PreflensError(f"reward regex:{pattern}: not a valid regular expression ({exc})") from None
        self.name = f"regex:{pattern}"

    def __call__(self, prompts, completions, *, references=None) -> list[float]:
        return [1.0 if self.pattern.search(c) else 0.0 for c in completions]


class KeywordReward(Reward):
    """Fraction of the keywords that occur in the completion as whole words (case-insensitive)."""

    value_range = (0.0, 1.0)

    def __init__(self, keywords: Sequence[str]) -> None:
        words = [k.strip() for k in keywords if k.strip()]
        if not words:
            raise PreflensError("reward keyword:...: give at least one keyword, e.g. keyword:yes,sure")
        self.keywords = words
        self._res = [re.compile(rf"(?<!\w){re.escape(k)}(?!\w)", re.IGNORECASE) for k in words]
        self.name = "keyword:" + ",".join(words)

    def __call__(self, prompts, completions, *, references=None) -> list[float]:
        return [sum(1.0 for r in self._res if r.search(c)) / len(self._res) for c in completions]


class LengthTarget(Reward):
    """-|n_words - target| / target: 0 at the target length, falling linearly on both sides.

    Deliberately not clipped: a clipped (flat) reward would itself create zero-std prompts.
    """

    def __init__(self, target: int) -> None:
        if target <= 0:
            raise PreflensError(f"reward length:{target}: the target length must be a positive integer")
        self.target = target
        self.name = f"length:{target}"

    def __call__(self, prompts, completions, *, references=None) -> list[float]:
        return [-abs(len(c.split()) - self.target) / self.target for c in completions]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _rouge_words(text: str) -> list[str]:
    """Lower-cased runs of letters/digits: punctuation is dropped, as by rouge-score's tokenizer
    (which keeps [a-z0-9] only; `\\w` also keeps non-ASCII letters, so other languages still score).
    Splitting on whitespace alone made "good." differ from "good" and scored real answers 0."""
    return re.findall(r"[^\W_]+", text.lower())


def rouge_l(candidate: str, reference: str, beta: float = 1.0) -> float:
    """ROUGE-L F-measure (Lin 2004, "ROUGE", Sec. 3.1): R = LCS/|ref|, P = LCS/|cand|,
    F = (1 + beta^2) R P / (R + beta^2 P). Tokens: `_rouge_words` (lower-cased, punctuation dropped)."""
    c, r = _rouge_words(candidate), _rouge_words(reference)
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    rec, prec = lcs / len(r), lcs / len(c)
    return (1 + beta**2) * rec * prec / (rec + beta**2 * prec)


class RougeL(Reward):
    """ROUGE-L F1 of the completion against the prompt's reference."""

    name = "rougeL"
    needs_reference = True
    value_range = (0.0, 1.0)

    def __call__(self, prompts, completions, *, references=None) -> list[float]:
        refs = self._refs(references, len(completions))
        return [rouge_l(c, r) for c, r in zip(completions, refs)]


class ModelReward(Reward):
    """A local sequence-classification reward model scoring `prompt + completion`.

    One output (`num_labels == 1`, the TRL RewardTrainer layout): the reward is that logit. Several
    outputs (e.g. a sentiment classifier, the GRUE IMDB setting): the probability of the last class.
    """

    def __init__(
        self, path: str, *, batch_size: int = 16, max_length: int = 1024, device: str | None = None
    ) -> None:
        if not Path(path).exists():
            raise PreflensError(f"reward model:{path}: no such local directory (only local paths are loaded)")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer  # only model: rewards

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        except (OSError, ValueError) as exc:
            raise PreflensError(
                f"reward model:{path}: cannot load a sequence-classification model ({exc})"
            ) from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.max_length, self.device = batch_size, max_length, device
        self.name = f"model:{path}"

    def __call__(self, prompts, completions, *, references=None) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions)]
        out: list[float] = []
        with torch.no_grad():
            for s in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[s : s + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                ).to(self.device)
                logits = self.model(**enc).logits.float()
                vals = logits[:, 0] if logits.shape[-1] == 1 else logits.softmax(-1)[:, -1]
                out.extend(vals.tolist())
        return out


class CallableReward(Reward):
    """Wraps a user's function; passes `references=` only if the function accepts it."""

    def __init__(self, fn: Callable[..., Any], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable")
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        self._pass_refs = "references" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
        )
        self.needs_reference = bool(getattr(fn, "needs_reference", False))
        self.value_range = getattr(fn, "value_range", None)

    def __call__(self, prompts, completions, *, references=None) -> list[float]:
        if self._pass_refs:
            return self.fn(list(prompts), list(completions), references=references)
        return self.fn(list(prompts), list(completions))


def _two_floats(spec: str, arg: str) -> tuple[float, float]:
    try:
        c, w = (float(v) for v in arg.split(","))
    except ValueError:
        raise PreflensError(f"reward {spec}: expected CORRECT,WRONG values, e.g. exact:1,-1") from None
    return c, w


def _exact(arg: str | None, normalize: bool, spec: str) -> Reward:
    c, w = _two_floats(spec, arg) if arg else (1.0, 0.0)
    return ExactMatch(normalize=normalize, correct=c, wrong=w)


def _length(arg: str | None, spec: str) -> Reward:
    try:
        return LengthTarget(int(arg or ""))
    except ValueError:
        raise PreflensError(f"reward {spec}: expected length:N with N a positive integer") from None


BUILTIN_REWARDS: dict[str, Callable[[str | None, str], Reward]] = {
    "exact": lambda arg, spec: _exact(arg, False, spec),
    "normalized": lambda arg, spec: _exact(arg, True, spec),
    "regex": lambda arg, spec: RegexMatch(arg or ""),
    "keyword": lambda arg, spec: KeywordReward((arg or "").split(",")),
    "length": _length,
    "rougeL": lambda arg, spec: RougeL(),
    "model": lambda arg, spec: ModelReward(arg or ""),
}
"""Spec prefix -> factory(argument, full spec). Prefixes are reserved: `regex:x` is never a module."""


def _import_callable(spec: str) -> Reward:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise PreflensError(
            f"reward {spec!r}: not a built-in ({', '.join(BUILTIN_REWARDS)}) and not module:function"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PreflensError(f"reward {spec!r}: cannot import module {module_name!r} ({exc})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PreflensError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, Reward):
        return obj
    if not callable(obj):
        raise PreflensError(f"reward {spec!r}: {attr!r} is not callable")
    return CallableReward(obj, name=spec)


def get_reward(spec: str | Reward | Callable[..., Any]) -> Reward:
    """A `Reward` from a spec string (see the module table), a `Reward`, or any callable."""
    if isinstance(spec, Reward):
        return spec
    if callable(spec):
        return CallableReward(spec)
    head, sep, arg = spec.partition(":")
    if head in BUILTIN_REWARDS:
        if head in ("regex", "keyword", "model") and not arg:
            raise PreflensError(f"reward {spec!r}: {head} needs an argument, e.g. {head}:...")
        return BUILTIN_REWARDS[head](arg if sep else None, spec)
    return _import_callable(spec)


def score(
    reward: Reward,
    prompts: Sequence[str],
    completions: Sequence[str],
    references: Sequence[str | None] | None = None,
    *,
    group: Sequence[int] | None = None,
    prompt_ids: Sequence[Any] | None = None,
) -> list[float]:
    """Call `reward` on all pairs at once and validate what it returns.

    `prompts`/`completions`/`references` are aligned per completion; `group[i]` is the index (into
    `prompt_ids`) of completion i's prompt, used to name the prompt in errors. If the batched call
    raises or returns the wrong count, the reward is called again one prompt at a time to find the
    prompt that breaks it, so the error names it (a reward that only fails in batches is reported
    for the whole batch).
    """
    n = len(completions)
    group = list(range(n)) if group is None else list(group)
    first: dict[int, int] = {}
    for i, g in enumerate(group):
        first.setdefault(g, i)

    def label(g: int) -> str:
        pid = prompt_ids[g] if prompt_ids is not None else g
        text = prompts[first[g]]
        return f"prompt {pid} ({text if len(text) <= 60 else text[:57] + '...'!r})"

    def call(idx: list[int]) -> list[float]:
        refs = None if references is None else [references[i] for i in idx]
        out = reward([prompts[i] for i in idx], [completions[i] for i in idx], references=refs)
        if isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
            raise RewardError(f"returned {type(out).__name__}, expected a list of {len(idx)} floats")
        out = list(out)
        if len(out) != len(idx):
            raise RewardError(f"returned {len(out)} values for {len(idx)} completions")
        return out

    def locate(exc: Exception) -> RewardError:
        order = list(dict.fromkeys(group))
        for g in order:
            idx = [i for i in range(n) if group[i] == g]
            try:
                call(idx)
            except Exception as inner:  # noqa: BLE001 - any failure of user code is reported
                return RewardError(f"reward {reward.name!r} failed on {label(g)}: {_describe(inner)}")
        return RewardError(
            f"reward {reward.name!r} failed on a batch of {len(order)} prompts (first: {label(order[0])}) "
            f"but not on any prompt alone: {_describe(exc)}"
        )

    if n == 0:
        return []
    try:
        values = call(list(range(n)))
    except Exception as exc:  # noqa: BLE001
        raise locate(exc) from exc
    result = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RewardError(
                f"reward {reward.name!r} returned {v!r} (not a number) for completion {i - first[group[i]]} of {label(group[i])}"
            ) from None
        if not math.isfinite(f):
            raise RewardError(
                f"reward {reward.name!r} returned {f} for completion {i - first[group[i]]} of {label(group[i])} "
                f"(completion {completions[i][:60]!r}); rewards must be finite"
            )
        result.append(f)
    return result


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, RewardError) else str(exc)
