"""`preflens train`: preference optimization (DPO and relatives) with per-step diagnostics.

Every field of `preflens.training.config.TrainConfig` is a flag (`lora_rank` -> `--lora-rank`) whose help is
the field's documentation, so `preflens train --help` lists every option and cannot drift from the
trainer. `--config file.yaml` sets the same names; flags given on the command line override it.
`training.config` is torch-free and the trainer (`preflens.train`) is imported only when the command
runs, so building this command (and `preflens --help`) stays fast.
"""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any

import typer

from preflens.training.config import TrainConfig
from preflens.training.config_file import TRL_SYNONYMS

# Extra spellings of a flag (the issue tracker and TRL users say `--probe-size`).
_ALIASES: dict[str, tuple[str, ...]] = {"probe_pairs": ("--probe-size",)}
# ... and TRL's flag names of options that mean the same (`--learning-rate`, `--max-steps`, ...)
for _trl, _name in TRL_SYNONYMS.items():
    _ALIASES[_name] = (*_ALIASES.get(_name, ()), "--" + _trl.replace("_", "-"))

# How a flag's value is shown in --help, by the option's type.
_METAVAR = {"int": "INT", "float": "FLOAT", "str": "TEXT", "list": "A,B,...", "dict": "K=V,..."}


def _kind(annotation: str) -> str:
    kinds = [k.strip() for k in annotation.split("|") if k.strip() != "None"]
    return kinds[0] if kinds else "str"


def _parse_kv(text: str) -> dict[str, Any]:
    """`beta=0.2,mask=diff` -> {"beta": 0.2, "mask": "diff"} (values read as YAML scalars)."""
    import yaml

    from preflens.errors import PreflensError

    out: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" not in part:
            raise PreflensError(f"--loss-kwargs: expected key=value pairs separated by commas, got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = yaml.safe_load(v.strip())
    return out


def run_train(config_file: str | None, flags: dict[str, Any]) -> Any:
    """The command's work, callable from Python: merge `--config` (or a resumed run's config.yaml) with flags."""
    from pathlib import Path

    from preflens.training.config_file import build_config, load_config_file

    given = {k: v for k, v in flags.items() if v is not None}
    if isinstance(given.get("loss_kwargs"), str):
        given["loss_kwargs"] = _parse_kv(given["loss_kwargs"])
    file_values: dict[str, Any] = {}
    source = "--config"
    if config_file:
        file_values = load_config_file(config_file)
        source = f"--config {config_file}"
    elif given.get("resume") and given.get("output_dir"):
        saved = Path(given["output_dir"]) / "config.yaml"
        if saved.is_file():
            file_values = load_config_file(saved)
            source = str(saved)
        elif not given.get("data"):  # else the complaint would be a missing --data, not the wrong directory
            from preflens.errors import RunDirError

            raise RunDirError(
                f"{given['output_dir']}: nothing to resume (no config.yaml: not the --output-dir of a "
                "preflens train run)"
            )
    for k in ("overwrite", "resume"):  # never inherited from a file: they are decisions about this invocation
        file_values.pop(k, None)
    config = build_config(TrainConfig, file_values, given, source=source)
    check_train_data_early(config)
    from preflens.train import train  # torch, transformers, peft: only once the data is known to be good

    return train(config)


def check_train_data_early(config: TrainConfig) -> None:
    """The torch-free checks of `TrainConfig.validate` that come before the data, then every row of --data
    and of the eval source read and validated (`training.data_setup.read_pairs`, torch-free): a broken file
    is reported in about a second, not after torch, transformers and the model have loaded. The trainer
    reads the same pairs again from `load_pairs`' read cache."""
    from pathlib import Path

    from preflens.data.formats import looks_like_path
    from preflens.errors import PreflensError, RunDirError
    from preflens.training.data_setup import read_pairs

    if not config.data:
        raise PreflensError("--data is required (a file, directory or hub id of preference pairs)")
    if not config.output_dir:
        raise PreflensError("--output-dir is required (where the run's results go)")
    if config.overwrite and config.resume:
        raise RunDirError("--overwrite and --resume exclude each other: pick one")
    if config.on_invalid not in ("error", "drop"):
        raise PreflensError(f"--on-invalid must be error or drop, got {config.on_invalid!r}")
    if isinstance(config.max_memory, str):  # a config file's int is taken as bytes by the trainer
        from preflens.commands.options import parse_bytes

        if config.max_memory.strip().lower() != "auto":
            parse_bytes(config.max_memory, "--max-memory")
    sources = [str(config.data)] + ([str(config.eval_data)] if config.eval_data else [])
    if any(not Path(s).expanduser().exists() and not looks_like_path(s) for s in sources):
        return  # a hub id: `datasets` reads it inside the trainer (it imports what it needs)
    read_pairs(config, Path(str(config.output_dir)), lambda _msg: None)


def register(app: typer.Typer) -> None:
    params = [
        inspect.Parameter(
            "config_file",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                None,
                "--config",
                metavar="FILE",
                help="YAML file of options (the names below, with _); flags override it.",
            ),
            annotation=str | None,
        )
    ]
    annotations: dict[str, Any] = {"config_file": str | None}
    for f in fields(TrainConfig):
        kind = _kind(str(f.type))
        flag = "--" + f.name.replace("_", "-")
        help_text = TrainConfig.help(f.name)
        default = f.default if isinstance(f.default, (int, float, str)) else None
        if default is not None and default != "":
            help_text += f" (default: {default})"
        if kind == "bool":
            opt = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=help_text, show_default=False)
            ann: Any = bool | None
        else:
            names = [flag, *_ALIASES.get(f.name, ())]
            opt = typer.Option(
                None, *names, help=help_text, metavar=_METAVAR.get(kind, "TEXT"), show_default=False
            )
            ann = str | None
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann))
        annotations[f.name] = ann

    def train_command(**kwargs: Any) -> None:
        """Train on preference pairs with a loss of the DPO family; logs per-step diagnostics to --output-dir.

        Example: preflens train --data pairs.jsonl --loss dpo --beta 0.1 --lora-rank 16 --output-dir runs/dpo
        """
        import sys

        config_file = kwargs.pop("config_file", None)
        try:
            run_dir = run_train(config_file, kwargs)
        except BaseException as exc:
            # SIGTERM: checkpointed like Ctrl-C; exit as a terminated process does. training.runtime (torch)
            # is looked up, not imported: a bad option or data file fails before torch is imported
            runtime = sys.modules.get("preflens.training.runtime")
            if runtime is not None and isinstance(exc, runtime.Terminated):
                raise typer.Exit(143) from None
            raise
        typer.echo(f"run directory: {run_dir}  (next: preflens report {run_dir})")

    train_command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    train_command.__annotations__ = {**annotations, "return": None}
    app.command("train", epilog=loss_table_help())(train_command)


def loss_table_help() -> str:
    """The losses `--loss` accepts, one line each (src/preflens/losses/TABLE.md, also in README.md), for
    `preflens train --help`. Read as text so building the command imports no torch."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "losses" / "TABLE.md"
    if not path.is_file():
        return ""
    lines = path.read_text().splitlines()
    rows = [
        [c.strip().replace("\\|", "|") for c in ln.strip("|").split(" | ")]
        for ln in lines
        if ln.startswith("| ")
    ]
    rows = [r for r in rows if not set(r[0]) <= {"-"}]
    notes = " ".join(ln for ln in lines if ln and not ln.startswith("|"))
    out = [
        "\b",
        "Losses (--loss NAME, or NAME,NAME,... with --loss-weights; hyper-parameters as flags or --loss-kwargs):",
    ]
    out += [f"  {r[0]:<13} {r[1]}  (hyper-parameters: {r[3]}; {r[2]}; {r[4]})" for r in rows[1:]]
    return "\n".join(out) + "\n\n" + notes
