"""Old path of `preflens.training.config_file` (the `--config file.yaml` reader); kept for importers."""

from preflens.training.config_file import TRL_HINTS, TRL_SYNONYMS, build_config, coerce, load_config_file

__all__ = ["load_config_file", "build_config", "coerce", "TRL_SYNONYMS", "TRL_HINTS"]
