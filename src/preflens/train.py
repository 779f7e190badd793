"""`preflens.train`: the preference trainer's public names, where README.md and users import them from.

The trainer itself lives in `preflens.training` (one job per module: `config`, `callbacks`, `trainer`,
`reference`, `metrics`, `checkpoint`, `probes`, `runtime`, ...; ARCHITECTURE.md says which owns what).
"""

from preflens.diagnostics.displacement import fell_tolerance
from preflens.training.callbacks import TrainerCallback, TrainerState, TrainerView
from preflens.training.config import LOSS_HPARAM_FIELDS, TrainConfig, resolve_loss_kwargs
from preflens.training.distributed import all_reduce_mean_grads as _all_reduce_mean_grads
from preflens.training.distributed import lean_logps_module as _lean_logps_module
from preflens.training.reference import REFERENCE_FILE
from preflens.training.runtime import Terminated, sigterm_as_interrupt
from preflens.training.sampler import PairBatchSampler
from preflens.training.trainer import Trainer, train

__all__ = [
    "TrainConfig",
    "TrainerState",
    "TrainerCallback",
    "TrainerView",
    "Trainer",
    "train",
    "LOSS_HPARAM_FIELDS",
    "resolve_loss_kwargs",
    "fell_tolerance",
    "Terminated",
    "sigterm_as_interrupt",
    "REFERENCE_FILE",
    "PairBatchSampler",
    "_all_reduce_mean_grads",
    "_lean_logps_module",
]
