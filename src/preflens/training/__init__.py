"""Training: the preference trainer, its configuration, callbacks and probes, and reinforcement finetuning.

Each module has one job (ARCHITECTURE.md says which owns which quantity):
- `config` (TrainConfig, torch-free: the CLI builds its flags from it), `config_file` (--config YAML merge);
- `callbacks`: TrainerState, TrainerCallback and TrainerView, the part of the trainer callbacks may read;
- `trainer`: the loop; `data_setup`, `model_setup`, `sampler`, `optim`, `distributed`: what it sets up;
- `scoring` (no-grad per-pair log-probs), `reference` (the cached reference pass), `metrics` (the logged
  rows), `checkpoint` (exact resume beyond the atomic save), `probes` (gradient probes as a callback);
- `runtime`: the one Accelerator factory, seeding, SIGTERM-as-Ctrl-C and the step guard, shared with
- `rft`, `rft_config`, `rft_steps`: reinforcement finetuning (RLOO) with reward-std tracking.

Nothing here is imported by `preflens.diagnostics` or `preflens.grad`: the arrows run one way.
"""
