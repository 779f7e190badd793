"""What a callback of the preference trainer sees: the loop state, the hooks, and the trainer's public surface.

A leaf module (it imports nothing of preflens): the probes, the tests and a user's own callbacks depend on
these types, never on `trainer.py`'s internals. `TrainerView` is the documented part of the trainer a
callback may read (and the one flag it may set); anything else on the trainer object is private.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = ["TrainerState", "TrainerCallback", "TrainerView"]


class TrainerView(Protocol):
    """The trainer as its callbacks see it (`preflens.training.trainer.Trainer` implements it).

    Read-only except `manual_grad_sync`.
    """

    config: Any
    """The run's `TrainConfig`."""
    state: TrainerState
    accelerator: Any
    """The run's `accelerate.Accelerator` (device, process index, gather, unwrap_model)."""
    model: Any
    """The policy as prepared by accelerate (`accelerator.unwrap_model(model)` is the bare model)."""
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    loss_fn: Any
    """The configured loss, `fn(PairLogps) -> Tensor[B]`."""
    mask_head: Any
    """The learned token-mask head of `sparse` with mask="learned", else None."""
    train_items: list[Any]
    """Tokenized train pairs (`preflens.data.collate.TokenizedPair`)."""
    eval_items: list[Any]
    reference: Any
    """`preflens.training.reference.ReferenceLogps`: the cached reference log-probs per split and pair."""
    tracker: Any
    """`preflens.tracking.RunTracker`: metrics rows and the per-pair tables of the run directory."""
    fell_tol: float
    """Nats a chosen log-prob must fall to count as displaced (`diagnostics.displacement.fell_tolerance`)."""
    manual_grad_sync: bool
    """Set by a callback whose hooks write the parameter gradients themselves (autograd skips them, so DDP
    never all-reduces them): the trainer then averages the gradients across processes after the backward."""

    @property
    def needs_tokens(self) -> bool:
        """The loss reads per-token log-probs (token-level losses)."""
        ...


@dataclass
class TrainerState:
    """Where the loop is; saved in every checkpoint (accelerate `register_for_checkpointing`)."""

    step: int = 0
    """Optimizer steps completed."""
    epoch: int = 0
    """Current pass over the train split."""
    batch_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed (the data position)."""
    tokens: int = 0
    """Non-padding tokens processed (all processes)."""
    max_steps: int = 0
    should_stop: bool = False
    """Set by a callback to end the run after this step (a checkpoint is saved)."""

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("step", "epoch", "batch_in_epoch", "tokens")}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for k, v in sd.items():
            setattr(self, k, int(v))


class TrainerCallback:
    """Hooks into the loop; override what you need. All processes call them (collectives allowed).

    - `on_train_begin(trainer)`: after set-up and the reference pass, before step 1.
    - `micro_batch_context(trainer, batch)`: a context manager wrapping one micro-batch's forward and
      backward (e.g. `StepGramCapture` hooks), or None.
    - `on_logps(trainer, batch, seq, pair, per_pair_loss)`: after the forward, before the backward.
    - `on_step_end(trainer, state, batch_stats)`: after the optimizer step; `batch_stats` holds the
      step's per-pair tensors (gathered over processes) and `metrics` (the train row). A returned
      dict is merged into the train metrics row.
    - `on_eval(trainer, state, metrics, pair_rows)`: after an evaluation (metrics of the eval split,
      per-pair rows written to pairs.parquet).
    - `on_save(trainer, state, path)`, `on_train_end(trainer, state)`.
    Set `state.should_stop = True` to end the run early (a checkpoint is saved).
    """

    def on_train_begin(self, trainer: TrainerView) -> None:
        pass

    def micro_batch_context(self, trainer: TrainerView, batch: dict[str, Any]) -> Any:
        return None

    def on_logps(
        self, trainer: TrainerView, batch: dict[str, Any], seq: Any, pair: Any, per_pair_loss: Any
    ) -> None:
        pass

    def on_step_end(
        self, trainer: TrainerView, state: TrainerState, batch_stats: dict[str, Any]
    ) -> dict | None:
        return None

    def on_eval(
        self, trainer: TrainerView, state: TrainerState, metrics: dict[str, Any], pair_rows: list[dict]
    ) -> None:
        pass

    def on_save(self, trainer: TrainerView, state: TrainerState, path: Path) -> None:
        pass

    def on_train_end(self, trainer: TrainerView, state: TrainerState) -> None:
        pass
