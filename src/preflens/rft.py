"""Old import path of reinforcement finetuning: the loop is `preflens.training.rft`, its hyper-parameters
`preflens.training.rft_config`, the step math `preflens.training.rft_steps`. Re-exported here so that
`from preflens.rft import RFTConfig, train_rft` keeps working."""

from preflens.training.rft import (  # noqa: F401
    REFERENCE_FILE,
    RFTConfig,
    RFTRun,
    latest_checkpoint,
    prepare_run_dir,
    rft_from_files,
    train_rft,
)

__all__ = ["RFTConfig", "train_rft", "prepare_run_dir", "latest_checkpoint"]
