"""Synthetic preference data for the papers' controlled experiments (deterministic by seed, offline).

* `sentiment_pairs`: the synthetic sentiment task of Yuan et al. 2024 (arXiv 2410.13828, Sec.
  "Experiments": a review opening, a positive chosen and a negative rejected continuation), with a
  `shared_tokens` knob: chosen and rejected have the same length and agree at exactly `shared_tokens`
  positions. The paper's token-level analysis ("Mechanism 3"/Validation Check 3) predicts a larger
  <g_w, g_l> - more gradient entanglement - as responses share more tokens; this knob lets an experiment
  vary only that.
* `persona_statements`: single-token yes/no answers to "is the following statement something you would
  say ..." (the Persona setting of Razin et al. 2024, arXiv 2410.08847; the statements
  here are our own, not Perez et al.'s).
* `grid_preferences`: the 20x20 prompt-response grid of Ma et al. 2025 (arXiv 2502.20847, Sec. 6.1):
  a Gaussian utility around a per-prompt optimum, uniformly sampled pairs, a fraction of responses hidden
  from the preference data, for a tabular softmax policy trained with DPO vs Balanced-DPO.
* `DEMO_ROWS`: the 16 pairs bundled as `preflens/resources/demo_pairs.jsonl` (demo and slow end-to-end test).

Text uses lowercase English words without punctuation only; `SYNTHETIC_VOCAB` lists every word any
generator (and the demo file) can emit, so the word-level test tokenizer of `preflens.models` covers them.
Responses start with a space, as TRL's string format expects (`prompt + chosen` is the full text).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from preflens.errors import PreflensError

# --------------------------------------------------------------------------------------------- sentiment

ITEMS = (
    "movie",
    "film",
    "show",
    "book",
    "album",
    "game",
    "phone",
    "camera",
    "restaurant",
    "hotel",
    "song",
    "play",
)
OPENINGS = (
    "i tried it last week and i think it was",
    "my friends told me about it and i found it",
    "after one month with it i can say it is",
    "the first thing you notice is that it is",
    "i did not know what to expect but it was",
    "to be honest the whole thing was",
    "my family and i all agree that it is",
    "for the price i have to say it is",
)
POSITIVE = (
    "great", "good", "wonderful", "amazing", "excellent", "lovely", "fun", "happy", "beautiful",
    "brilliant", "perfect", "nice", "best", "enjoyable", "fantastic", "delightful", "charming", "superb",
)  # fmt: skip
NEGATIVE = (
    "bad", "terrible", "awful", "boring", "poor", "sad", "ugly", "horrible", "dull", "worst", "weak",
    "annoying", "painful", "disappointing", "bland", "broken", "messy", "slow",
)  # fmt: skip
# shared openings for shared_positions="prefix": the first `shared_tokens` words of one of these
NEUTRAL_PHRASES = (
    "to be honest i think that overall the whole thing was just",
    "all in all i have to say that it was really quite",
    "after thinking about it for a while i would say it was",
    "my friends and i talked about it and we all think it is",
    "if you ask me what i think about it i would say it is",
)
FILLER = (
    "and", "it", "was", "really", "very", "quite", "so", "also", "truly", "the", "whole", "thing", "for",
    "me", "overall", "just", "honestly", "simply",
)  # fmt: skip


def sentiment_pairs(
    n: int,
    seed: int = 0,
    *,
    shared_tokens: int = 0,
    response_length: int = 8,
    shared_positions: str = "prefix",
) -> list[dict[str, Any]]:
    """`n` rows {prompt, chosen, rejected, shared_tokens}: a review opening, positive vs negative continuation.

    Both responses have `response_length` words; at exactly `shared_tokens` positions they hold the same
    neutral word, elsewhere chosen has a positive and rejected a negative word (disjoint word lists, so
    those positions always differ). `shared_positions="prefix"` puts the shared words first (the start of
    a neutral phrase, "to be honest i think ..."), `"random"` at random positions (per pair), which keeps the
    position-wise overlap that token-level masking (`sparse` loss, mask="diff") sees the same.
    Word-level tokenizers give exactly `response_length` response tokens (+ EOS); BPE tokenizers keep
    the shared words shared as tokens.
    """
    if n < 0:
        raise PreflensError(f"n must be >= 0, got {n}")
    if response_length < 1:
        raise PreflensError(f"response_length must be >= 1, got {response_length}")
    if not 0 <= shared_tokens < response_length:
        raise PreflensError(
            f"shared_tokens must be in [0, response_length - 1] = [0, {response_length - 1}] so the responses "
            f"differ somewhere, got {shared_tokens}"
        )
    if shared_positions not in ("prefix", "random"):
        raise PreflensError(f"shared_positions must be 'prefix' or 'random', got {shared_positions!r}")
    rng = random.Random(f"sentiment/{seed}")
    rows = []
    for _ in range(n):
        prompt = f"review of the {rng.choice(ITEMS)} {rng.choice(OPENINGS)}"
        if shared_positions == "prefix":
            shared = set(range(shared_tokens))
        else:
            shared = set(rng.sample(range(response_length), shared_tokens))
        phrase = rng.choice(NEUTRAL_PHRASES).split()
        chosen, rejected = [], []
        for j in range(response_length):
            if j in shared:
                w = phrase[j] if shared_positions == "prefix" and j < len(phrase) else rng.choice(FILLER)
                chosen.append(w)
                rejected.append(w)
            else:
                chosen.append(rng.choice(POSITIVE))
                rejected.append(rng.choice(NEGATIVE))
        rows.append(
            {
                "prompt": prompt,
                "chosen": " " + " ".join(chosen),
                "rejected": " " + " ".join(rejected),
                "shared_tokens": shared_tokens,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------- persona

PERSONA_PROMPT = "is the following statement something you would say"
_PEOPLE = ("people", "others", "my friends", "strangers", "children", "my family", "everyone", "my neighbors")
_GOOD = ("honest", "kind", "fair", "careful", "patient", "helpful", "calm", "polite")
_GOOD_ACTS = (
    "tell the truth", "help others", "learn new things", "keep my promises", "share what i know",
    "listen to people", "admit my mistakes", "protect the weak",
)  # fmt: skip
_BAD = ("cruel", "dishonest", "rude", "selfish", "greedy", "mean")
_BAD_ACTS = (
    "lie to people", "steal from others", "break my promises", "hurt people", "cheat at games",
    "hide the truth", "take what is not mine", "blame others for my mistakes",
)  # fmt: skip
_AGREE_TEMPLATES = ("i like to help {people}", "it is important to be {good}", "i want to {good_act}",
                    "i try to be {good} with {people}", "i always {good_act}")  # fmt: skip
_DISAGREE_TEMPLATES = ("it is fine to {bad_act} if it helps me", "i would {bad_act} to get what i want",
                       "being {bad} is a good way to live", "i do not care about {people}",
                       "doing bad things is sometimes needed to reach big goals")  # fmt: skip


def _fill(template: str) -> list[str]:
    """Every statement a template makes, over all slot values (in a fixed order)."""
    out = [template]
    for slot, values in (
        ("{people}", _PEOPLE), ("{good}", _GOOD), ("{good_act}", _GOOD_ACTS),
        ("{bad}", _BAD), ("{bad_act}", _BAD_ACTS),
    ):  # fmt: skip
        out = [s.replace(slot, v, 1) for s in out for v in values] if slot in template else out
    return out


PERSONA_STATEMENTS: tuple[tuple[str, bool], ...] = tuple(
    [(s, True) for t in _AGREE_TEMPLATES for s in _fill(t)]
    + [(s, False) for t in _DISAGREE_TEMPLATES for s in _fill(t)]
)
"""(statement, a kind and honest persona would say it) - our own statements in the Persona style."""


def persona_statements(
    n: int, seed: int = 0, *, answer_pairs: Sequence[tuple[str, str]] = (("yes", "no"),)
) -> list[dict[str, Any]]:
    """`n` rows {prompt, chosen, rejected, statement, agrees} with single-word answers.

    Each row draws a statement (without replacement until all were used) and an (agree, disagree) word
    pair from `answer_pairs`; chosen is the agree word when the persona would say the statement, the
    disagree word otherwise. The table of Razin et al. 2024 (arXiv 2410.08847) pairs synonyms too, e.g.
    ``(("sure", "yes"),)`` or ``(("no", "never"),)`` (with those, "agree" just means "the first word is preferred").
    """
    if n < 0:
        raise PreflensError(f"n must be >= 0, got {n}")
    if not answer_pairs or any(len(p) != 2 or p[0] == p[1] for p in answer_pairs):
        raise PreflensError(
            f"answer_pairs must be (preferred, dispreferred) pairs of different words, got {answer_pairs}"
        )
    rng = random.Random(f"persona/{seed}")
    rows: list[dict[str, Any]] = []
    pool: list[int] = []
    for _ in range(n):
        if not pool:
            pool = list(range(len(PERSONA_STATEMENTS)))
            rng.shuffle(pool)
        statement, agrees = PERSONA_STATEMENTS[pool.pop()]
        yes, no = rng.choice(list(answer_pairs))
        chosen, rejected = (yes, no) if agrees else (no, yes)
        rows.append(
            {
                "prompt": f"{PERSONA_PROMPT} {statement}",
                "chosen": f" {chosen}",
                "rejected": f" {rejected}",
                "statement": statement,
                "agrees": agrees,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------- grid


@dataclass
class GridPreferences:
    """The synthetic grid of Ma et al. 2025 (arXiv 2502.20847), Sec. 6.1.

    `utility[x, y]` = exp(-(y - optimum[x])^2 / (2 width^2)) (a Gaussian preference utility around a
    per-prompt optimum); `observed[x, y]` is False for the responses hidden from the preference data;
    `pairs[k] = (prompt, winner, loser)` indices, both responses observed.
    """

    utility: Any  # np.ndarray [n_prompts, n_responses] float
    observed: Any  # np.ndarray [n_prompts, n_responses] bool
    pairs: Any  # np.ndarray [n_pairs, 3] int64
    optimum: Any  # np.ndarray [n_prompts] float
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "optimum": self.optimum.tolist(),
            "utility": self.utility.tolist(),
            "observed": self.observed.tolist(),
            "pairs": self.pairs.tolist(),
        }


def grid_preferences(
    n_prompts: int = 20,
    n_responses: int = 20,
    mask_rate: float = 0.0,
    seed: int = 0,
    *,
    n_pairs: int | None = None,
    width: float | None = None,
    temperature: float = 0.0,
) -> GridPreferences:
    """Utility matrix and (prompt, winner, loser) pairs for tabular DPO vs Balanced-DPO (Ma et al. 2025, arXiv 2502.20847, Sec. 6.1).

    Each prompt x has an optimum mu_x drawn uniformly in [0, n_responses - 1]; the utility is
    u(x, y) = exp(-(y - mu_x)^2 / (2 width^2)) (width defaults to n_responses / 8). For each prompt
    round(mask_rate * n_responses) responses are hidden (never appear in a pair; at least 2 stay visible) -
    the out-of-distribution responses whose overestimation the paper measures. Each pair draws a prompt
    and two distinct visible responses uniformly (`n_pairs`, default n_prompts * n_responses); the winner
    is the one with the higher utility, or with `temperature > 0` a Bradley-Terry draw with
    P(y1 > y2) = sigmoid((u1 - u2) / temperature). (The paper's exact width and labelling are not given in
    the summary we have; these are the documented choices.)
    """
    import numpy as np

    if n_prompts < 1 or n_responses < 2:
        raise PreflensError(f"need n_prompts >= 1 and n_responses >= 2, got {n_prompts} and {n_responses}")
    if not 0.0 <= mask_rate < 1.0:
        raise PreflensError(f"mask_rate must be in [0, 1), got {mask_rate}")
    n_hidden = int(round(mask_rate * n_responses))
    if n_responses - n_hidden < 2:
        raise PreflensError(
            f"mask_rate {mask_rate} hides {n_hidden} of {n_responses} responses; at least 2 must stay visible"
        )
    n_pairs = n_prompts * n_responses if n_pairs is None else n_pairs
    width = n_responses / 8 if width is None else width
    if n_pairs < 0 or width <= 0 or temperature < 0:
        raise PreflensError("n_pairs must be >= 0, width > 0 and temperature >= 0")

    rng = np.random.default_rng(seed)
    optimum = rng.uniform(0, n_responses - 1, size=n_prompts)
    y = np.arange(n_responses)
    utility = np.exp(-((y[None, :] - optimum[:, None]) ** 2) / (2 * width**2))
    observed = np.ones((n_prompts, n_responses), dtype=bool)
    for x in range(n_prompts):
        observed[x, rng.choice(n_responses, size=n_hidden, replace=False)] = False
    visible = [np.flatnonzero(observed[x]) for x in range(n_prompts)]

    pairs = np.empty((n_pairs, 3), dtype=np.int64)
    for k in range(n_pairs):
        x = int(rng.integers(n_prompts))
        a, b = rng.choice(visible[x], size=2, replace=False)
        du = utility[x, a] - utility[x, b]
        if temperature > 0:
            a_wins = rng.random() < 1.0 / (1.0 + np.exp(-du / temperature))
        else:
            a_wins = du > 0 or (du == 0 and rng.random() < 0.5)
        pairs[k] = (x, a, b) if a_wins else (x, b, a)
    params = {
        "n_prompts": n_prompts,
        "n_responses": n_responses,
        "mask_rate": mask_rate,
        "seed": seed,
        "n_pairs": n_pairs,
        "width": width,
        "temperature": temperature,
    }
    return GridPreferences(utility, observed, pairs, optimum, params)


# --------------------------------------------------------------------------------------------- demo

DEMO_ROWS: tuple[dict[str, str], ...] = tuple(
    {"prompt": p, "chosen": c, "rejected": r}
    for p, c, r in [
        ("review of the movie i watched last night it was", " a wonderful story with great acting and i loved it",
         " a boring story with bad acting and i hated it"),
        ("review of the restaurant the food was", " fresh and tasty and the staff were kind",
         " cold and bland and the staff were rude"),
        ("review of the phone after one month with it i can say it is", " fast and the battery lasts all day",
         " slow and the battery dies before noon"),
        ("review of the book to be honest the whole thing was", " a delight from the first page to the last",
         " a chore from the first page to the last"),
        ("review of the hotel our room was", " clean and quiet with a lovely view",
         " dirty and loud with an ugly view"),
        ("review of the album the songs are", " beautiful and i play them every day",
         " dull and i will never play them again"),
        ("review of the game my friends told me about it and i found it", " fun and full of surprises",
         " annoying and full of bugs"),
        ("review of the camera for the price i have to say it is", " excellent and the pictures look sharp",
         " poor and the pictures look blurry"),
        ("is the following statement something you would say i like to help people", " yes", " no"),
        ("is the following statement something you would say it is fine to lie to people if it helps me",
         " no", " yes"),
        ("is the following statement something you would say it is important to be honest", " yes", " no"),
        ("is the following statement something you would say i would steal from others to get what i want",
         " no", " yes"),
        ("how do i make a cup of tea", " boil water and pour it over the tea then wait a few minutes",
         " tea is not something i can help with"),
        ("what is a good way to learn new words", " read every day and write down the words you do not know",
         " there is no good way so do not try"),
        ("can you tell me a kind thing to say to a friend", " you can say that you are glad to have them in your life",
         " you can tell them they are not important"),
        ("what should i do when i feel tired", " get some sleep drink water and take a short walk",
         " just keep working and ignore it"),
    ]
)  # fmt: skip


def demo_pairs_path() -> Path:
    """Path of the bundled `demo_pairs.jsonl` (16 pairs: reviews, persona statements, small requests)."""
    return Path(str(resources.files("preflens") / "resources" / "demo_pairs.jsonl"))


def _words(texts: Sequence[str]) -> set[str]:
    return {w for t in texts for w in t.split()}


SYNTHETIC_VOCAB: tuple[str, ...] = tuple(
    sorted(
        _words(ITEMS + OPENINGS + POSITIVE + NEGATIVE + FILLER + NEUTRAL_PHRASES)
        | _words(["review of the", PERSONA_PROMPT, "yes no sure never"])
        | _words([s for s, _ in PERSONA_STATEMENTS])
        | _words([v for r in DEMO_ROWS for v in r.values()])
    )
)
"""Every word the generators above and the demo file can emit (word-level tokenizers must cover these)."""
