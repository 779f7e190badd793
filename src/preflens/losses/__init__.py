"""The preference-optimization losses: a registry of functions of per-sequence statistics only.

Every loss is `f(p: PairLogps, **hparams) -> Tensor[B]`: it sees the summed policy log-probs of the chosen
and rejected responses, the reference model's, and the response lengths (DESIGN.md). That is the design
choice the package rests on: because the loss sees only these numbers, the *margin weights*
d_w = -dl/d chosen and d_l = dl/d rejected of any loss come from autograd on a [B]-sized tensor
(`margin_weights`), and the gradient-entanglement analysis of Yuan et al. 2024 (arXiv 2410.13828,
Sec. 3) and the gradient-imbalance ratio of Ma et al. 2025 (arXiv 2502.20847, Eq. 2) apply to every loss
in the registry without a special case.

Layout (who owns what):
- `registry`:      `LOSSES`, `register_loss`, `get_loss`, `loss_hparams`, `LossFn`, the loss traits.
- `weights`:       `margin_weights` (d_w, d_l by autograd).
- `terms`:         the inputs families share (implicit rewards, response lengths, with their checks).
- `margin`:        dpo, ipo, simpo, cpo, slic, rrhf, dpop, rdpo, sppo, rpo (Yuan et al. 2024, Table 1).
- `balanced`:      bdpo, nbdpo and Balanced-DPO's weight `balanced_dpo_lambda` (Ma et al. 2025, Sec. 5).
- `normalized_po`: the `normalized` loss (Yuan et al. 2024, Sec. 5.1).
- `sparse_po`:     the `sparse` loss (token-masked PO) and its `diff_token_mask` (Yuan et al. 2024,
  Sec. 5.2).
- `trl_pair`:      every `loss_type` of TRL's `DPOTrainer` under TRL's name (`sigmoid` is `dpo`, `sppo_hard`
  is `sppo`, `ipo` is `ipo`) and TRL's objective options (`ld_alpha`, `f_divergence_type`, `use_weighting`).
- `odds_ratio`:    ORPO and the paired KTO (`kto_pair`).
- `calibrated`:    the follow-ups aimed at likelihood displacement: Cal-DPO, SimPER, DPO-Shift, chi-PO.
A comma-separated name is a weighted sum, as TRL's `loss_type` list: `get_loss("sigmoid,bco_pair,sft",
loss_weights=[0.8, 0.2, 1.0])` (`registry._combined`).

Adding a loss family (e.g. more of TRL's `loss_type`s):
1. Write `preflens/losses/<family>.py`, named unlike any loss (`preflens.losses.<loss>` is the loss
   function: that is why the `normalized` and `sparse` losses live in `normalized_po` and `sparse_po`).
   Each loss is a function decorated with `@register_loss("<name>")` (from `preflens.losses.registry`);
   its keyword arguments with defaults are its hyper-parameters (`get_loss` rejects unknown ones,
   `loss_hparams` and the CLI read them from the signature). Pass `reference_free=True` if it never reads
   `ref_*`, `token_level=True` if it reads the per-token fields. Read shared inputs through
   `preflens.losses.terms`, which checks that they are there. Import nothing from `preflens.losses`
   itself (the package imports the families: that would be a cycle).
2. Its docstring gives the formula and cites the paper by authors, year, arXiv id and equation; where
   TRL or the authors' code writes a variant differently, make the variant an option and say so.
3. Import it in the block below, *after* the existing families: `LOSSES` keeps registration order, which
   users see (`preflens compare`, CLI help), so existing names keep their place.
4. Add its formula, written out independently, to `tests/test_losses.py` (values and margin weights).
No `if loss_type == ...` dispatch anywhere: the registry is the only lookup.
"""

from __future__ import annotations

from preflens.logprobs import PairLogps
from preflens.losses.registry import (
    LOSSES,
    LossFn,
    get_loss,
    loss_hparams,
    loss_names,
    loss_needs_log_sum_sq,
    loss_needs_tokens,
    loss_options,
    loss_token_weighted,
    losses_with,
    register_loss,
)
from preflens.losses.weights import margin_weights

# The family modules register their losses when imported: the order of this block is `LOSSES`'s order.
# isort: off
from preflens.losses.margin import dpo, ipo, simpo, cpo, slic, rrhf, dpop, rdpo, sppo, rpo
from preflens.losses.balanced import balanced_dpo_lambda, bdpo, nbdpo
from preflens.losses.normalized_po import normalized
from preflens.losses.sparse_po import diff_token_mask, sparse
from preflens.losses.trl_pair import TRL_LOSS_TYPES, hinge, exo_pair, nca_pair, robust, bco_pair, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm  # noqa: E501  # fmt: skip
from preflens.losses.odds_ratio import orpo, kto_pair
from preflens.losses.calibrated import cal_dpo, simper, dpo_shift, chipo

# isort: on
sigmoid, sppo_hard = dpo, sppo  # TRL's names of the same functions (LOSSES["sigmoid"] is LOSSES["dpo"])

__all__ = [
    "PairLogps",
    "LOSSES",
    "get_loss",
    "register_loss",
    "loss_hparams",
    "loss_names",
    "loss_options",
    "loss_needs_tokens",
    "loss_needs_log_sum_sq",
    "loss_token_weighted",
    "TRL_LOSS_TYPES",
    "margin_weights",
    "LossFn",
    "TOKEN_LEVEL_LOSSES",
    "REFERENCE_FREE_LOSSES",
    "balanced_dpo_lambda",
    "diff_token_mask",
    # the loss functions, importable by name as before the split
    "dpo", "ipo", "simpo", "cpo", "slic", "rrhf", "dpop", "rdpo", "sppo", "rpo",
    "bdpo", "nbdpo", "normalized", "sparse",
    "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "aot", "aot_unpaired", "apo_zero", "apo_down",
    "discopop", "sft", "sigmoid_norm", "sigmoid", "sppo_hard", "orpo", "kto_pair", "cal_dpo", "simper",
    "dpo_shift", "chipo",
]  # fmt: skip

TOKEN_LEVEL_LOSSES = losses_with("token_level")
"""Losses that need per-token log-probs of policy and reference."""

REFERENCE_FREE_LOSSES = losses_with("reference_free")
"""Losses that never read the reference log-probs (no reference pass is needed)."""
