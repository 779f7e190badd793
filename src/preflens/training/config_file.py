"""`--config file.yaml` for `preflens train`: read, check names and types, merge with CLI flags.

Precedence: TrainConfig defaults < the YAML file < flags given on the command line. With `--resume`
and no `--config`, the run's own `config.yaml` is the file, so `preflens train --resume --output-dir
RUN` continues the run as it was configured (flags such as `--steps` still override).
A misspelled key is an error naming the file and the key (a silently ignored `lerning_rate: 1e-5`
would be a wrong experiment).
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from preflens.errors import PreflensError

__all__ = ["load_config_file", "build_config", "coerce"]

# TRL/transformers `TrainingArguments` names of options that mean exactly the same here: accepted in
# --config files (and as CLI flags, commands/train.py) so a TRL user's YAML carries over
TRL_SYNONYMS = {
    "learning_rate": "lr",
    "max_steps": "steps",
    "num_train_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "scheduler",
    "model_name_or_path": "model",
    "dataset_name": "data",
    "lora_r": "lora_rank",
    "loss_type": "loss",  # a TRL list [sigmoid, bco_pair, sft] becomes "sigmoid,bco_pair,sft"
}
# TRL DPOConfig names of loss hyper-parameters that are not TrainConfig fields: in a --config file they
# go into loss_kwargs (get_loss takes them under these names), so a TRL user's YAML carries over
TRL_LOSS_KEYS = (
    "label_smoothing",
    "f_divergence_type",
    "f_alpha_divergence_coef",
    "ld_alpha",
    "use_weighting",
    "discopop_tau",
)
# TRL names whose meaning differs: an unknown-option error says what to write instead
TRL_HINTS = {
    "per_device_train_batch_size": "batch_size is global here (per-device size x number of processes)",
    "per_device_eval_batch_size": "eval_batch_size is global here (per-device size x number of processes)",
    "bf16": "mixed_precision: bf16 (autocast) or dtype: bfloat16 (bf16 weights)",
    "use_peft": "lora_rank: R (> 0 trains LoRA adapters)",
    "eval_steps": "eval_every",
    "save_steps": "save_every",
    "logging_steps": "log_every",
}

# keys config.yaml of a run carries besides the options (written by the trainer, ignored on read)
_RESOLVED_KEYS = {"loss_kwargs_resolved", "num_processes", "steps_resolved", "warmup_steps_resolved"}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file (an error names the file when it is not one)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise PreflensError(f"--config {p}: no such file")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise PreflensError(f"--config {p}: not valid YAML ({exc})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise PreflensError(f"--config {p}: expected a mapping of option: value, got {type(loaded).__name__}")
    return loaded


def coerce(name: str, value: Any, annotation: str, where: str) -> Any:
    """Bring a YAML/CLI value to the option's type (YAML reads `1e-5` as a string, for instance)."""
    if isinstance(value, str) and value.strip().lower() in ("none", "null") and "None" in annotation:
        return None
    if value is None:
        if "None" in annotation:
            return None
        raise PreflensError(f"{where}: {name} cannot be null")
    kinds = [k.strip() for k in annotation.split("|")]
    if "bool" in kinds:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise PreflensError(f"{where}: {name} must be true or false, got {value!r}")
    if "int" in kinds:
        if isinstance(value, bool):
            raise PreflensError(f"{where}: {name} must be an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise PreflensError(f"{where}: {name} must be an integer, got {value!r}") from None
        if f != int(f):
            raise PreflensError(f"{where}: {name} must be an integer, got {value!r}")
        return int(f)
    if "float" in kinds:
        if isinstance(value, bool):
            raise PreflensError(f"{where}: {name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise PreflensError(f"{where}: {name} must be a number, got {value!r}") from None
    if "dict" in kinds:
        if not isinstance(value, dict):
            raise PreflensError(f"{where}: {name} must be a mapping, got {value!r}")
        return dict(value)
    if "list" in kinds:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise PreflensError(f"{where}: {name} must be a list, got {value!r}")
        return list(value)
    if "str" in kinds:
        if isinstance(value, (dict, list)):
            raise PreflensError(f"{where}: {name} must be a string, got {value!r}")
        return str(value)
    return value


def build_config(
    cls: type, file_values: dict[str, Any] | None, overrides: dict[str, Any], *, source: str = "--config"
) -> Any:
    """`cls(**defaults | file | overrides)` with unknown keys and wrong types reported by name."""
    specs = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    file_values = _trl_loss_keys(dict(file_values or {}), specs, source)
    for key, value in file_values.items():
        if key in _RESOLVED_KEYS:
            continue
        name = TRL_SYNONYMS.get(key, key) if TRL_SYNONYMS.get(key) in specs else key
        if name != key and (name in (file_values or {}) or name in values):
            raise PreflensError(f"{source}: {key!r} and {name!r} are the same option; keep one")
        if name not in specs:
            if key in TRL_HINTS:
                hint = f" (TRL's name; here: {TRL_HINTS[key]})"
            else:
                near = difflib.get_close_matches(key, list(specs), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise PreflensError(f"{source}: unknown option {key!r}{hint}")
        if name == "loss" and isinstance(value, (list, tuple)):  # TRL's loss_type list
            value = ",".join(str(v).strip() for v in value)
        values[name] = coerce(name, value, str(specs[name].type), source)
    for key, value in overrides.items():
        if key not in specs:
            raise PreflensError(f"unknown option {key!r}")
        values[key] = coerce(key, value, str(specs[key].type), f"--{key.replace('_', '-')}")
    for name, f in specs.items():
        if name not in values and f.default is MISSING and f.default_factory is MISSING:  # type: ignore[misc]
            raise PreflensError(f"--{name.replace('_', '-')} is required")
    return cls(**values)


def _trl_loss_keys(file_values: dict[str, Any], specs: dict[str, Any], source: str) -> dict[str, Any]:
    """Move TRL's loss hyper-parameter keys (`label_smoothing: 0.1`, `ld_alpha: 0.5`, ...) of a config file
    into its `loss_kwargs` (where `get_loss` takes them under the same names)."""
    moved = {k: file_values.pop(k) for k in TRL_LOSS_KEYS if k in file_values and k not in specs}
    if not moved:
        return file_values
    kwargs = dict(file_values.get("loss_kwargs") or {})
    for k, v in moved.items():
        if k in kwargs and kwargs[k] != v:
            raise PreflensError(
                f"{source}: {k}={v!r} and loss_kwargs {k}={kwargs[k]!r} disagree: give it once"
            )
        kwargs[k] = v
    file_values["loss_kwargs"] = kwargs
    return file_values
