"""What every preflens training loop needs from its process, written once: the Accelerator, the seed,
SIGTERM handled as Ctrl-C, and the step guard that lets an interrupted step be rewound exactly.

Why one module: the preference trainer, reinforcement finetuning (`rft`) and the CHES dataset scan each
built their own Accelerator (one forgot the CPU process-group case, one the singleton reset) and the two
loops each had their own copy of "remember the RNG at the step's start, rewind on Ctrl-C".
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, broadcast_object_list, set_seed

from preflens.errors import PreflensError, RunDirError
from preflens.tracking import prepare_run_dir

__all__ = [
    "TRACKERS",
    "parse_report_to",
    "make_accelerator",
    "init_trackers",
    "prepare_run_dir_on_all",
    "seed_everything",
    "Terminated",
    "sigterm_as_interrupt",
    "RngSnapshot",
    "StepGuard",
]


TRACKERS: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
}
"""accelerate's tracker names preflens supports, and the modules that provide each (any one will do)."""


def parse_report_to(value: str | list[str] | None) -> list[str]:
    """`--report-to`: a comma-separated list of tensorboard, wandb, mlflow, or `none` -> the trackers.

    Refuses, in one line, an unknown name and a tracker whose package is not installed (naming the extra
    that installs it: `pip install 'preflens[wandb]'`).
    """
    parts = value if isinstance(value, list) else str(value or "none").split(",")
    names = list(dict.fromkeys(p.strip().lower() for p in parts if p.strip()))
    if names in ([], ["none"]):
        return []
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise PreflensError(
            f"--report-to: unknown tracker {', '.join(map(repr, bad))}; expected a comma-separated list of "
            f"{', '.join(TRACKERS)}, or none"
        )
    for name in names:
        if not any(importlib.util.find_spec(m) is not None for m in TRACKERS[name]):
            extra = f"pip install 'preflens[{name}]'" if name != "tensorboard" else "pip install tensorboard"
            raise PreflensError(f"--report-to {name}: the {name} package is not installed ({extra})")
    return names


def make_accelerator(
    run_dir: str | Path | None = None,
    *,
    mixed_precision: str = "no",
    report_to: str | list[str] = "none",
    split_batches: bool = False,
) -> Any:
    """An `accelerate.Accelerator` for one run.

    - Several runs in one Python process (tests, `preflens compare`, experiments) must not inherit the
      previous run's settings, which accelerate keeps in a singleton: it is reset, except inside a launched
      process group (where it would forget the group).
    - Under `torchrun`/`accelerate launch` on a machine without CUDA, accelerate only picks the gloo
      (MULTI_CPU) backend when told `cpu=True`; otherwise every process would think it is alone.
    - `report_to` (`parse_report_to`): accelerate's trackers; TensorBoard logs to `<run_dir>/tb`, wandb and
      MLflow as `init_trackers` sets them up. They start at `init_trackers`, not here.
    - `split_batches=True`: the prepared dataloader's batch is the *global* batch, split across processes
      (the preference trainer's `--batch-size` contract).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    log_with = parse_report_to(report_to) or None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    kwargs: dict[str, Any] = {}
    if run_dir is not None:
        kwargs["project_config"] = ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(Path(run_dir) / "tb"), automatic_checkpoint_naming=False
        )
    if split_batches:
        kwargs["dataloader_config"] = DataLoaderConfiguration(split_batches=True)
    return Accelerator(
        cpu=world > 1 and not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        log_with=log_with,
        **kwargs,
    )


def init_trackers(
    accelerator: Any,
    project: str,
    config: dict[str, Any],
    run_dir: str | Path,
    *,
    resume_step: int | None = None,
) -> None:
    """Start the accelerator's trackers for the run in `run_dir` (nothing when it has none).

    - tensorboard: `<run_dir>/tb`; on resume it drops the events logged after the checkpoint (`purge_step`),
      as metrics.jsonl does.
    - wandb: the run's files in `<run_dir>/wandb` (`WANDB_MODE=offline` keeps them local; `wandb sync`
      uploads them later), named after the run directory; a resumed run is a new wandb run.
    - mlflow: a local file store `<run_dir>/mlruns` unless `MLFLOW_TRACKING_URI` names a server or store.
    Only scalar settings go into the trackers' configuration. The values are `RunTracker.log`'s: every
    numeric metrics.jsonl key `k` of split `s` as `s/k` at the row's step.
    """
    if not accelerator.log_with:
        return
    run_dir = Path(run_dir)
    names = [str(t) for t in accelerator.log_with]
    kw: dict[str, dict[str, Any]] = {}
    name = run_dir.resolve().name + (f" (resumed at step {resume_step})" if resume_step else "")
    if "tensorboard" in names and resume_step is not None:
        kw["tensorboard"] = {"purge_step": resume_step + 1}
    if "wandb" in names:
        kw["wandb"] = {"dir": str(run_dir), "name": name}
    if "mlflow" in names:
        if not os.environ.get("MLFLOW_TRACKING_URI") and accelerator.is_main_process:
            import mlflow

            # MLflow 3 keeps its file store in maintenance mode behind this switch; a local, server-less
            # store in the run directory is what a training run without MLFLOW_TRACKING_URI wants
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        kw["mlflow"] = {"run_name": name}
    scalars = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers(project, config=scalars, init_kwargs=kw)


def prepare_run_dir_on_all(accelerator: Any, run_dir: Path, *, overwrite: bool, resume: bool) -> None:
    """`tracking.prepare_run_dir` by the main process; every process stops on its refusal (the others
    would hang at the next collective), and each checks that it sees the directory (shared filesystem)."""
    err: Exception | None = None
    if accelerator.is_main_process:
        try:
            prepare_run_dir(run_dir, overwrite=overwrite, resume=resume)
        except RunDirError as exc:
            err = exc
    msg = [str(err) if err is not None else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(msg)
    if msg[0] is not None:
        raise RunDirError(msg[0])
    if not Path(run_dir).is_dir():
        raise RunDirError(
            f"{run_dir}: not visible from process {accelerator.process_index} (a shared filesystem is needed)"
        )


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and every GPU) generators: accelerate's `set_seed`."""
    set_seed(seed)


class Terminated(KeyboardInterrupt):
    """SIGTERM during training, handled as Ctrl-C (the last finished step is checkpointed)."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into `Terminated` while the loop runs.

    Why: cluster schedulers preempt (SLURM, Kubernetes), `timeout` and `kill` stop a run with SIGTERM,
    whose default action ends the process at once, losing every step since the last --save-every
    checkpoint. Raised in the loop, it takes Ctrl-C's path instead. Later SIGTERMs are ignored so they
    cannot cut that checkpoint short. Only the main thread can install handlers; elsewhere, nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class RngSnapshot:
    """torch's CPU and CUDA generator states at one moment (what a rewound step must draw again)."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def take(cls) -> RngSnapshot:
        return cls(
            torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        )

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class StepGuard:
    """Where the current step started, and whether its parameter update has begun.

    A loop calls `begin(position)` at the start of each step (position: the loop's data position, e.g.
    its state dict) and `end()` once the step's update is done. An interrupt (Ctrl-C, SIGTERM, a failing
    reward) *before* the update can be undone: `rewind()` zeroes the gradients, restores the RNG and
    returns the position the step started from, so a checkpoint of the previous step resumes exactly.
    During the update (`updating`), the parameters are half-written and the last checkpoint stays the
    resume point. The update is detected by a pre-hook on each optimizer's `step`, so it cannot be missed.
    """

    def __init__(self, optimizers: Iterable[Any]) -> None:
        self.optimizers = list(optimizers)
        self.phase = "between"
        """"forward" (the step can be rewound), "update" (it cannot) or "between" (no step running)."""
        self._start: tuple[Any, RngSnapshot] | None = None
        for opt in self.optimizers:
            inner = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps the real one
            inner.register_step_pre_hook(self._on_update)

    def _on_update(self, *_: Any) -> None:
        if self.phase == "forward":
            self.phase = "update"

    @property
    def updating(self) -> bool:
        return self.phase == "update"

    def begin(self, position: Any) -> None:
        self._start = (position, RngSnapshot.take())
        self.phase = "forward"

    def end(self) -> None:
        self.phase = "between"

    def rewind(self) -> Any:
        """Undo the half-done step; returns the position `begin` was given."""
        if self._start is None:
            raise RuntimeError("StepGuard.rewind() before begin()")
        position, rng = self._start
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        rng.restore()
        self.phase = "between"
        return position
