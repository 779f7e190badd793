"""CLI sub-commands, one module each; see `preflens.cli.COMMAND_MODULES`."""
