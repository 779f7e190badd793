"""The peak extra memory of `preflens train`'s diagnostics, estimated from the shapes in set-up, before
step 1, against `--max-memory` (default: half the free RAM / GPU memory; `grad.memory`).

Why: a diagnostic must never take the machine down, and a run that cannot afford one should say so in a
second, not after the model load, the reference pass and some steps. Per diagnostic:

- `--probe-every`: the probe set's Gram pass (`grad.sequence_gram_and_logps`) is chunkable: it runs as
  passes over pairs of row blocks under the budget (the run's budget is what its "auto" resolves to), and
  is refused when even two rows cannot fit;
- `--step-entanglement`: the capture rides on the step's own backward (`grad.StepGramCapture`), so it
  cannot be chunked: its extra bytes (`grad.estimates.estimate_capture_memory`: parameters used twice held
  across the backward, then one parameter's parts, kernel and fused gradient at a time) for the largest
  micro-batch must fit, else refused;
- `--attribute-every`: the probe set's parts of every parameter are held across the step
  (`grad.estimates.estimate_cross_memory`), not chunkable inside a step: refused when they do not fit.

Each refusal is one line naming the layer, its shape and the bytes (`grad.memory.refusal`).
"""

from __future__ import annotations

from typing import Any

from preflens.grad.api import gram_rows_per_run
from preflens.grad.estimates import estimate_capture_memory, estimate_cross_memory
from preflens.grad.memory import check_fits, human, parse_size, resolve_budget, run_budget
from preflens.training.callbacks import TrainerCallback, TrainerView

__all__ = ["MemoryPlanCallback", "probe_set_lengths"]


def probe_set_lengths(trainer: TrainerView, pairs: int) -> list[int]:
    """Row lengths (prompt + response) of the probe set `--probe-pairs` / `--attribute-pairs` choose: the
    first P eval pairs by id, filled up with the first train pairs."""
    chosen = sorted(trainer.eval_items, key=lambda it: it.pair_id)[:pairs]
    chosen += sorted(trainer.train_items, key=lambda it: it.pair_id)[: pairs - len(chosen)]
    return [len(it.prompt_ids) + len(r) for it in chosen for r in (it.chosen_ids, it.rejected_ids)]


def _micro_batch_lengths(trainer: TrainerView) -> list[int]:
    """The worst micro-batch a process sees: its share of --batch-size pairs, every row as long as the
    longest training pair (an upper bound: batches pad to their longest row)."""
    cfg = trainer.config
    procs = max(1, int(getattr(trainer.accelerator, "num_processes", 1)))
    pairs = max(1, int(cfg.batch_size) // procs)
    longest = max((it.length for it in trainer.train_items), default=1)
    return [longest] * (2 * pairs)


class MemoryPlanCallback(TrainerCallback):
    """Registered before the diagnostics' callbacks, so its checks run first in `on_train_begin`."""

    def __init__(self) -> None:
        self.plan: dict[str, Any] = {}

    def on_train_begin(self, trainer: TrainerView) -> None:
        cfg = trainer.config
        model = trainer.accelerator.unwrap_model(trainer.model)
        dev = trainer.accelerator.device
        budget = resolve_budget(parse_size(cfg.max_memory, "--max-memory"), dev)
        batch = _micro_batch_lengths(trainer)
        plan: dict[str, Any] = {"budget_bytes": budget}
        hint = "Raise --max-memory, or lower --batch-size / --max-length"
        if cfg.step_entanglement:
            est = estimate_capture_memory(model, batch, fused=True)
            what = f"--step-entanglement: a micro-batch of {len(batch)} rows of up to {batch[0]} tokens"
            check_fits(est, budget, what, hint + " (the capture rides on the step's backward: not chunkable)")
            plan["step_entanglement_bytes"] = est.total
        if cfg.probe_every:
            lens = probe_set_lengths(trainer, int(cfg.probe_pairs))
            rows, est = gram_rows_per_run(
                model, lens, max_memory=budget, device=dev, what="--probe-every probe set"
            )
            plan.update(probe_rows=len(lens), probe_rows_per_pass=rows, probe_bytes=est.total)
        if cfg.attribute_every:
            lens = probe_set_lengths(trainer, int(cfg.attribute_pairs))
            est = estimate_cross_memory(model, batch, lens, keep=cfg.attribute_optimizer == "adam")
            what = f"--attribute-every: {len(lens)} probe rows against a micro-batch of {len(batch)} rows"
            check_fits(est, budget, what, hint + " / --attribute-pairs")
            plan["attribution_bytes"] = est.total
        self.plan = plan
        run_budget(budget)  # the probes' "auto" budget for the rest of the run
        say = getattr(trainer, "say", None)
        if say is not None:
            parts = []
            if "step_entanglement_bytes" in plan:
                parts.append(f"--step-entanglement {human(plan['step_entanglement_bytes'])}")
            if "probe_rows" in plan:
                parts.append(
                    f"--probe-every {human(plan['probe_bytes'])} (probe set: {plan['probe_rows']} rows, "
                    f"{plan['probe_rows_per_pass']} per pass)"
                )
            if "attribution_bytes" in plan:
                parts.append(f"--attribute-every {human(plan['attribution_bytes'])}")
            say(
                f"diagnostics memory, estimated peak extra under the budget of {human(budget)}: "
                + "; ".join(parts)
            )

    def on_train_end(self, trainer: TrainerView, state: Any) -> None:
        run_budget(None)
