"""Likelihood displacement: the single-token experiment and its traces in training runs.

Source: Razin et al. 2024, "Unintentional Unalignment: Likelihood Displacement in Direct Preference
Optimization" (arXiv 2410.08847).

- Sec. 3 (the simplest setting): DPO on one prompt with single-token responses y+, y- (Persona
  statements, "Yes"/"No"-like tokens). The chosen probability pi(y+|x) often *falls*, and the mass goes
  to tokens z that are similar to y+ (benign) or opposite in meaning (catastrophic). The paper's code
  measures the fall as the largest drop along the trajectory, max over t < t' of pi_t(y+) - pi_t'(y+)
  (`max_decrease`).
- Sec. 4 (Theorem on where the mass goes, single-token case, with the hidden embedding treated as a
  trainable parameter, the "unconstrained features" model): for z not in {y+, y-}, the first-order
  change of ln pi(z) is eta * c * <W_z, W_y+ - W_y-> minus a term shared by all tokens (the change of the
  log-normaliser), c > 0 the DPO weight. Derivation (written out so the test can check it): with
  m = ln pi(y+) - ln pi(y-), dm/dh = W_y+ - W_y- and dm/dW_z = (1[z=y+] - 1[z=y-]) h (the softmax terms
  cancel), so a gradient step moves h by eta c (W_y+ - W_y-) and leaves W_z untouched for z not in
  {y+, y-}; the logit of z then moves by eta c <W_z, W_y+ - W_y->. (Training only W would leave every
  other logit where it is: the geometry acts through the hidden embedding.) `unembedding_prediction`
  returns <W_z, W_y+ - W_y-> for every z; `run_displacement` runs the experiment for one prompt or a
  file of persona statements (`preflens displacement`).

In training runs (`preflens train` writes `pairs.parquet`, ARCHITECTURE.md), `chosen_change_table`
compares each pair's first and last evaluation, and `ches_vs_change` joins that with `preflens ches`
scores: the paper's Sec. 5 claim is that the CHES score orders the chosen log-prob change.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from preflens import models  # models.load_model looked up per call: tests substitute the loader
from preflens.errors import DataError, PreflensError
from preflens.logprobs import split_pairs
from preflens.losses import get_loss
from preflens.tracking import CONFIG_FILE, PAIRS_FILE, read_config

__all__ = [
    "fell_tolerance",
    "run_fell_tolerance",
    "TokenChange",
    "SingleTokenResult",
    "max_decrease",
    "unembedding_prediction",
    "single_token_dpo",
    "chosen_change_table",
    "ches_vs_change",
    "ChesVsChange",
    "run_displacement",
    "single_token_id",
    "prompt_ids",
    "read_persona",
    "DEFAULT_LR",
    "DEFAULT_STEPS",
]

# `preflens displacement`'s defaults (the paper's are lr 1e-7 and 100 steps, meant for a post-SFT model):
# a run on the embedded SmolLM2-135M-Instruct is short and moves visibly.
DEFAULT_LR = 1e-6
DEFAULT_STEPS = 30


def max_decrease(traj: Sequence[float]) -> float:
    """max over t < t' of traj[t] - traj[t'] (0 if it never falls): the paper code's "decrease".

    One pass: track the running maximum and the largest drop below it.
    """
    best, peak = 0.0, -math.inf
    for v in traj:
        peak = max(peak, float(v))
        best = max(best, peak - float(v))
    return best


def unembedding_prediction(unembedding: Tensor, chosen_id: int, rejected_id: int) -> Tensor:
    """<W_z, W_y+ - W_y-> for every token z, [V] float32 (Razin et al. 2024, Sec. 4's single-token
    theorem)."""
    w = unembedding.detach().float()
    return w @ (w[chosen_id] - w[rejected_id])


@dataclass
class TokenChange:
    """One token's probability before/after training and the geometric prediction."""

    token_id: int
    token: str
    p_before: float
    p_after: float
    logp_change: float
    prediction: float
    """<W_z, W_y+ - W_y-> with W the unembedding before training."""


@dataclass
class SingleTokenResult:
    """Outcome of DPO on one prompt with single-token responses."""

    chosen_id: int
    rejected_id: int
    p_chosen: list[float]
    """pi_t(y+|x) at t = 0..steps (before each update, then after the last)."""
    p_rejected: list[float]
    top_increase: list[TokenChange]
    """Tokens whose probability rose the most (largest p_after - p_before), y+ and y- included."""
    decrease: float
    """max over t < t' of pi_t(y+) - pi_t'(y+)."""
    sign_agreement: float
    """Share of tokens z not in {y+, y-} whose centred log-prob change has the sign of the centred
    prediction (centring removes the change of the normaliser shared by all tokens)."""
    rank_correlation: float
    """Spearman correlation over z not in {y+, y-} between prediction and observed log-prob change."""
    losses: list[float] = field(default_factory=list)

    @property
    def chosen_fell(self) -> bool:
        return self.p_chosen[-1] < self.p_chosen[0]


def _spearman(a: Tensor, b: Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / den) if den > 0 else 0.0


class _FreeFeatures(nn.Module):
    """The unconstrained-features model of Sec. 4: the hidden embedding h is a parameter."""

    def __init__(self, h: Tensor, unembedding: Tensor) -> None:
        super().__init__()
        # float64: the first-order changes the theorem speaks of are far below float32's resolution
        # of a log-prob for a small step, and this model is tiny (one vector and one matrix)
        self.h = nn.Parameter(h.detach().double().clone())
        self.w = nn.Parameter(unembedding.detach().double().clone())

    def forward(self) -> Tensor:
        return self.w @ self.h


def _next_token_logits_fn(model: nn.Module, prompt_ids: Tensor):
    """A closure returning the logits [V] of the token after the prompt, grad-enabled."""
    att = torch.ones_like(prompt_ids)

    def fn() -> Tensor:
        out = model(input_ids=prompt_ids, attention_mask=att, use_cache=False, logits_to_keep=1)
        return out.logits[0, -1].float()

    return fn


def _last_hidden(model: nn.Module, prompt_ids: Tensor) -> Tensor:
    with torch.no_grad():
        out = model(input_ids=prompt_ids, output_hidden_states=True, use_cache=False, logits_to_keep=1)
    return out.hidden_states[-1][0, -1]


def _prediction_agreement(
    pred: Tensor, change: Tensor, chosen_id: int, rejected_id: int
) -> tuple[float, float]:
    """(sign agreement, Spearman) of the geometric prediction with the observed log-prob change over the
    tokens z not in {y+, y-}; both centred first, which removes the normaliser's change shared by all."""
    others = torch.ones(pred.shape[0], dtype=torch.bool)
    others[[chosen_id, rejected_id]] = False
    c_obs = change[others] - change[others].mean()
    c_pred = pred[others] - pred[others].mean()
    agree = float(((c_obs > 0) == (c_pred > 0)).float().mean())
    return agree, _spearman(pred[others], change[others])


def _top_increase(
    logp0: Tensor, logp1: Tensor, pred: Tensor, top_k: int, tokenizer: Any
) -> list[TokenChange]:
    """The `top_k` tokens whose probability rose the most, with the prediction beside each."""
    p0, p1 = logp0.exp(), logp1.exp()
    change = (logp1 - logp0).double()
    top = torch.topk(p1 - p0, min(top_k, p0.shape[0])).indices.tolist()
    return [
        TokenChange(
            token_id=t,
            token=tokenizer.convert_ids_to_tokens(t) if tokenizer is not None else str(t),
            p_before=float(p0[t]),
            p_after=float(p1[t]),
            logp_change=float(change[t]),
            prediction=float(pred[t]),
        )
        for t in top
    ]


def single_token_dpo(
    model: nn.Module,
    prompt_ids: Tensor,
    chosen_id: int,
    rejected_id: int,
    *,
    steps: int = 100,
    lr: float = 1e-7,
    beta: float = 0.1,
    optimizer: str = "rmsprop",
    mode: str = "model",
    top_k: int = 10,
    tokenizer=None,
) -> SingleTokenResult:
    """Train DPO on one prompt with single-token y+ and y-; report the displacement (Razin et al. 2024,
    arXiv 2410.08847, Sec. 3).

    `mode="model"` trains the model's trainable parameters in place (the paper's setting; defaults are
    its reference values: RMSprop, lr 1e-7, 100 full-batch steps, beta 0.1, meant for a post-SFT model).
    `mode="features"` trains only the last hidden state h and the unembedding W of a copy (the
    theorem's unconstrained-features model, Sec. 4), leaving the model untouched.
    The reference log-probs are the model's before training (DPO's pi_ref = the initial policy).
    """
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids.unsqueeze(0)
    head = model.get_output_embeddings()
    if head is None:
        raise PreflensError(
            "the model has no output embedding (lm_head); the single-token analysis needs one"
        )
    w0 = head.weight.detach().float().clone()
    vocab = w0.shape[0]
    for name, tid in (("chosen", chosen_id), ("rejected", rejected_id)):
        if not 0 <= tid < vocab:
            raise PreflensError(f"{name} token id {tid} is outside the vocabulary (size {vocab})")
    if chosen_id == rejected_id:
        raise PreflensError("chosen and rejected are the same token; DPO has nothing to prefer")
    if not lr > 0:
        raise PreflensError(f"--lr must be > 0, got {lr}")
    if not beta > 0:
        raise PreflensError(f"--beta must be > 0 (DPO's inverse temperature), got {beta}")

    if mode == "features":
        free = _FreeFeatures(_last_hidden(model, prompt_ids), head.weight)
        logits_fn, params = free, list(free.parameters())
    elif mode == "model":
        logits_fn = _next_token_logits_fn(model, prompt_ids)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        raise PreflensError(f"mode must be 'model' or 'features', got {mode!r}")
    if not params:
        raise PreflensError("the model has no trainable parameters")
    opt_cls = {"rmsprop": torch.optim.RMSprop, "sgd": torch.optim.SGD, "adam": torch.optim.Adam}.get(
        optimizer
    )
    if opt_cls is None:
        raise PreflensError(f"optimizer must be one of rmsprop, sgd, adam; got {optimizer!r}")
    opt = opt_cls(params, lr=lr)
    loss_fn = get_loss("dpo", beta=beta)

    was_training = model.training
    model.eval()  # no dropout: the trajectory is the optimiser's, not noise
    with torch.no_grad():
        logp0 = torch.log_softmax(logits_fn(), -1)
    ref_c, ref_r = logp0[chosen_id].view(1), logp0[rejected_id].view(1)
    p_c, p_r, losses = [], [], []
    for _ in range(steps):
        logp = torch.log_softmax(logits_fn(), -1)
        p_c.append(float(logp[chosen_id].detach().exp()))
        p_r.append(float(logp[rejected_id].detach().exp()))
        # one pair of one-token responses: row 0 chosen, row 1 rejected
        pair = split_pairs(
            logp[[chosen_id, rejected_id]], torch.ones(2, device=logp.device), ref=(ref_c, ref_r)
        )
        loss = loss_fn(pair).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        logp1 = torch.log_softmax(logits_fn(), -1)
    p_c.append(float(logp1[chosen_id].exp()))
    p_r.append(float(logp1[rejected_id].exp()))
    model.train(was_training)

    pred = unembedding_prediction(w0, chosen_id, rejected_id).double()
    agree, rho = _prediction_agreement(pred, (logp1 - logp0).double(), chosen_id, rejected_id)
    top_changes = _top_increase(logp0, logp1, pred, top_k, tokenizer)
    return SingleTokenResult(
        chosen_id=chosen_id,
        rejected_id=rejected_id,
        p_chosen=p_c,
        p_rejected=p_r,
        top_increase=top_changes,
        decrease=max_decrease(p_c),
        sign_agreement=agree,
        rank_correlation=rho,
        losses=losses,
    )


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A copy of the model's state, to reset between single-token runs (persona mode)."""
    return copy.deepcopy(model.state_dict())


# ---------------------------------------------------------------------------------------------
# Training runs: pairs.parquet (ARCHITECTURE.md's run directory)
# ---------------------------------------------------------------------------------------------

_PAIRS_COLUMNS = ("step", "split", "pair_id", "chosen", "rejected")


def _read_pairs(run_dir: str | Path) -> pd.DataFrame:
    path = Path(run_dir) / PAIRS_FILE
    if not path.exists():
        raise PreflensError(
            f"{path}: not found; `preflens train` writes per-pair log-probs there at each evaluation"
        )
    df = pd.read_parquet(path)
    missing = [c for c in _PAIRS_COLUMNS if c not in df.columns]
    if missing:
        raise PreflensError(f"{path}: missing column(s) {missing}; expected {list(_PAIRS_COLUMNS)}")
    return df


def fell_tolerance(dtype: str | None, mixed_precision: str | None) -> float:
    """Nats a chosen log-prob must drop below its start to count as fallen (`frac_chosen_fell`).

    Re-scoring the same pair after an update moves it by numerical noise alone: ~1e-6 in float32, ~1e-3
    in bf16. That is not likelihood displacement; the trainer's metrics, the probes, the TRL callback and
    the report all use this one threshold.
    """
    low = (dtype or "float32") != "float32" or (mixed_precision or "no") != "no"
    return 1e-2 if low else 1e-4


def run_fell_tolerance(run_dir: str | Path) -> float:
    """`fell_tolerance` for a finished run, from the precision its config.yaml records (float32 if none)."""
    run_dir = Path(run_dir)
    cfg: dict = read_config(run_dir) if (run_dir / CONFIG_FILE).is_file() else {}
    return fell_tolerance(cfg.get("dtype"), cfg.get("mixed_precision"))


def chosen_change_table(run_dir: str | Path, split: str | None = None, fell_tol: float | None = None):
    """Per pair: chosen/rejected log-probs at its first and last evaluation, the change, and whether
    the chosen log-prob fell (likelihood displacement, Razin et al. 2024, arXiv 2410.08847, Sec. 1).

    "Fell" means by more than `fell_tol` nats: re-scoring noise is not displacement. None takes the
    trainer's threshold for the run's precision (`fell_tolerance`, read from its
    config.yaml; 1e-4 in float32, 1e-2 in bf16), so this table, the metrics and the report agree.

    Returns a DataFrame with columns split, pair_id, first_step, last_step, chosen_first,
    chosen_last, chosen_change, rejected_first, rejected_last, rejected_change, chosen_fell.
    `split` keeps one split ("train"/"eval"); None keeps all.
    """
    df = _read_pairs(run_dir)
    if split is not None:
        df = df[df["split"] == split]
        if df.empty:
            raise PreflensError(f"{Path(run_dir) / PAIRS_FILE}: no rows with split == {split!r}")
    df = df.sort_values(["split", "pair_id", "step"], kind="stable")
    g = df.groupby(["split", "pair_id"], sort=True)
    first, last = g.first(), g.last()
    out = first[["step", "chosen", "rejected"]].rename(
        columns={"step": "first_step", "chosen": "chosen_first", "rejected": "rejected_first"}
    )
    out["last_step"] = last["step"]
    out["chosen_last"] = last["chosen"]
    out["rejected_last"] = last["rejected"]
    out["chosen_change"] = out["chosen_last"] - out["chosen_first"]
    out["rejected_change"] = out["rejected_last"] - out["rejected_first"]
    if fell_tol is None:
        fell_tol = run_fell_tolerance(Path(run_dir))
    out["chosen_fell"] = out["chosen_change"] < -fell_tol
    cols = [
        "first_step",
        "last_step",
        "chosen_first",
        "chosen_last",
        "chosen_change",
        "rejected_first",
        "rejected_last",
        "rejected_change",
        "chosen_fell",
    ]
    return out[cols].reset_index()


@dataclass
class ChesVsChange:
    """CHES scores joined with the observed chosen log-prob change of a training run."""

    table: object
    """DataFrame: pair_id, score, percentile, edit_similarity (if scored), chosen_change, chosen_fell, ..."""
    spearman_ches: float
    """Spearman correlation of CHES score with the chosen change (the paper expects it negative)."""
    spearman_edit: float | None
    """The same for edit-distance similarity (the baseline the paper finds uninformative)."""
    by_quartile: object
    """DataFrame: CHES quartile -> pairs, mean chosen change, share of pairs whose chosen fell."""


def ches_vs_change(
    scores_parquet: str | Path, run_dir: str | Path, split: str | None = "train"
) -> ChesVsChange:
    """Join `preflens ches` scores with a run's per-pair chosen change (Razin et al. 2024, arXiv
    2410.08847, Sec. 5's figure on UltraFeedback: the chosen log-prob change is ordered by CHES
    percentile, not by edit distance).

    Pairs are matched on the dataset row id (`pair_index` in the scores, `pair_id` in pairs.parquet).
    """
    if not Path(scores_parquet).is_file():
        raise PreflensError(
            f"{scores_parquet}: no such file; score the training data first: "
            f"preflens ches --data DATA -o {scores_parquet}"
        )
    scores = pd.read_parquet(scores_parquet)
    if "pair_index" not in scores.columns or "score" not in scores.columns:
        raise PreflensError(
            f"{scores_parquet}: expected columns pair_index and score (written by `preflens ches`)"
        )
    change = chosen_change_table(run_dir)
    if split is not None and (change["split"] == split).any():
        change = change[change["split"] == split]
    table = scores.merge(change, left_on="pair_index", right_on="pair_id", how="inner")
    if table.empty:
        raise PreflensError(
            f"no pair of {scores_parquet} matches a pair_id of {Path(run_dir) / PAIRS_FILE}; "
            "score the dataset the run trained on"
        )

    def rho(col: str) -> float:
        a = torch.tensor(table[col].to_numpy(dtype="float64"))
        b = torch.tensor(table["chosen_change"].to_numpy(dtype="float64"))
        return _spearman(a, b) if len(table) > 1 else float("nan")

    q = pd.qcut(table["score"].rank(method="first"), q=min(4, len(table)), labels=False)
    by_q = (
        table.assign(quartile=q + 1)
        .groupby("quartile")
        .agg(
            pairs=("pair_id", "size"),
            mean_chosen_change=("chosen_change", "mean"),
            frac_fell=("chosen_fell", "mean"),
        )
        .reset_index()
    )
    return ChesVsChange(
        table=table,
        spearman_ches=rho("score"),
        spearman_edit=rho("edit_similarity") if "edit_similarity" in table.columns else None,
        by_quartile=by_q,
    )


# ---------------------------------------------------------------------------------------------
# The single-token experiment on one prompt or a file of statements (`preflens displacement`)
# ---------------------------------------------------------------------------------------------


def single_token_id(tokenizer: Any, text: str, what: str) -> tuple[int, str | None]:
    """The token id of `text` as a response (no special tokens) and a warning if it is not one token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PreflensError(f"{what} {text!r} encodes to no tokens")
    warning = None
    if len(ids) > 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        warning = (
            f"{what} {text!r} is {len(ids)} tokens {pieces}; the single-token analysis uses the first, "
            f"{pieces[0]!r} (pick a string that is one token, e.g. without a leading space)"
        )
    return int(ids[0]), warning


def prompt_ids(tokenizer: Any, prompt: str, chat_template: bool | None) -> Tensor:
    """Prompt token ids [1, T]: the chat template with the assistant turn opened, if it has one."""
    use_template = (
        getattr(tokenizer, "chat_template", None) is not None if chat_template is None else chat_template
    )
    if use_template:
        if getattr(tokenizer, "chat_template", None) is None:
            raise PreflensError("--chat-template was given but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def _result_dict(res: Any, prompt: str, chosen: str, rejected: str, warnings: list[str]) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "p_chosen_before": res.p_chosen[0],
        "p_chosen_after": res.p_chosen[-1],
        "p_rejected_before": res.p_rejected[0],
        "p_rejected_after": res.p_rejected[-1],
        "decrease": res.decrease,
        "chosen_fell": res.chosen_fell,
        "sign_agreement": res.sign_agreement,
        "rank_correlation": res.rank_correlation,
        "p_chosen_trajectory": res.p_chosen,
        "p_rejected_trajectory": res.p_rejected,
        "top_increase": [vars(t) for t in res.top_increase],
        "warnings": warnings,
    }


def run_displacement(
    *,
    model: str | None,
    prompt: str | None = None,
    chosen: str | None = None,
    rejected: str | None = None,
    persona: Path | None = None,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    beta: float = 0.1,
    optimizer: str = "rmsprop",
    mode: str = "model",
    top_k: int = 10,
    chat_template: bool | None = None,
    limit: int | None = None,
    device: str = "auto",
    _model_obj: Any = None,
) -> dict[str, Any]:
    """`preflens displacement`'s work, callable from Python: DPO on each prompt with single-token y+, y-
    (`single_token_dpo`), the model restored between rows. Returns {"runs": [...], summary fields}.
    `_model_obj` = (model, tokenizer) already loaded instead of `model`."""
    if persona is None:
        if prompt is None or chosen is None or rejected is None:
            raise PreflensError("give --prompt, --chosen and --rejected, or --persona FILE")
        rows = [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]
    else:
        rows = read_persona(Path(persona))
        if limit is not None:
            rows = rows[:limit]
    if steps < 1:
        raise PreflensError(f"--steps must be at least 1, got {steps}")

    if _model_obj is not None:
        lm, tok = _model_obj
    else:
        # float32: the displacement is a difference of small probabilities; a GPU if there is one
        lm, tok = models.load_model(model, dtype="float32", device=str(device))
    for p in lm.parameters():
        p.requires_grad_(True)
    start = snapshot(lm) if len(rows) > 1 and mode == "model" else None
    runs = []
    torch.manual_seed(0)
    for i, row in enumerate(rows):
        if start is not None and i > 0:
            lm.load_state_dict(start)
        warnings = []
        yp, w1 = single_token_id(tok, row["chosen"], "chosen")
        ym, w2 = single_token_id(tok, row["rejected"], "rejected")
        warnings += [w for w in (w1, w2) if w]
        ids = prompt_ids(tok, row["prompt"], chat_template).to(next(lm.parameters()).device)
        res = single_token_dpo(
            lm,
            ids,
            yp,
            ym,
            steps=steps,
            lr=lr,
            beta=beta,
            optimizer=optimizer,
            mode=mode,
            top_k=top_k,
            tokenizer=tok,
        )
        runs.append(_result_dict(res, row["prompt"], row["chosen"], row["rejected"], warnings))
    if start is not None:
        lm.load_state_dict(start)
    n = len(runs)
    return {
        "runs": runs,
        "settings": {"steps": steps, "lr": lr, "beta": beta, "optimizer": optimizer, "mode": mode},
        "frac_chosen_fell": sum(r["chosen_fell"] for r in runs) / n,
        "mean_decrease": sum(r["decrease"] for r in runs) / n,
        "mean_sign_agreement": sum(r["sign_agreement"] for r in runs) / n,
    }


def read_persona(path: Path) -> list[dict[str, str]]:
    """The rows of a persona-statements jsonl (prompt, chosen, rejected: non-empty strings each)."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    rows = []
    for ln, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{ln}: not a JSON object ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{ln}: expected a JSON object with prompt/chosen/rejected")
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise DataError(f"{path}:{ln}: field {key!r} must be a non-empty string")
        rows.append({k: row[k] for k in ("prompt", "chosen", "rejected")})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows
