"""Training: the preference trainer, its configuration, callbacks and probes, and reinforcement finetuning.

Modules (each one job; see ARCHITECTURE.md):
- `runtime`: the one Accelerator factory, seeding, SIGTERM-as-Ctrl-C and the step guard that rewinds a
  half-done step, shared by the preference trainer and `rft`.
"""
