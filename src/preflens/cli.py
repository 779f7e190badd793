"""The `preflens` console script.

One Typer app; each sub-command lives in its own module under `preflens.commands` and exposes
`register(app)`. Keeping the commands apart keeps this file a table of contents, and lets each
command import torch/transformers lazily so that `preflens --help` stays fast.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="preflens",
    help="Train language models on preference data and see why a run goes wrong.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each entry is a module in preflens.commands with a `register(app)` function.
COMMAND_MODULES: list[str] = [
    "reward_std",
    "rft",
    "report",
    "compare",
    "demo",
    "make_data",
    "ches",
    "displacement",
    "train",
    "probe",
    "attribute",
]


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"preflens.commands.{name}").register(app)


_register_all()


def main() -> None:
    """Entry point of the console script.

    A `PreflensError` is the user's to fix: print its message (which names the file/row/field)
    and exit 2, without a traceback. Any other exception is a bug and keeps its traceback.
    """
    from preflens.errors import PreflensError

    try:
        rv = app(standalone_mode=False)
    except PreflensError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
    except Exception as exc:
        # click's usage errors (unknown option, missing argument): typer bundles its own copy of
        # click, so match the interface rather than a class from the `click` package
        if type(exc).__name__ == "Abort":
            typer.secho("aborted", err=True)
            raise SystemExit(130) from None
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            raise SystemExit(exc.exit_code) from None
        raise
    if isinstance(rv, int) and rv != 0:  # typer.Exit(code) in non-standalone mode
        if rv == 130:  # Ctrl-C: typer turns the KeyboardInterrupt into a silent 130 here
            typer.secho("aborted", err=True)
        raise SystemExit(rv)


if __name__ == "__main__":
    main()
