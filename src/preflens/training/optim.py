"""The optimizer of a preference run: AdamW over the trainable parameters (and the learned mask head).

Fused when the parameters allow it: one kernel over all tensors (HF/TRL's default optimizer since torch
2.8) is several times faster than the per-tensor loop torch picks on a CPU (BENCHMARKS.md). Under
DeepSpeed/FSDP the parameters are sharded or offloaded, so the plain implementation is used.
"""

from __future__ import annotations

from typing import Any

import torch

from preflens.training.config import TrainConfig

__all__ = ["make_optimizer"]


def make_optimizer(model: Any, mask_head: Any, config: TrainConfig, accelerator: Any) -> torch.optim.AdamW:
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if mask_head is not None:
        groups.append({"params": list(mask_head.parameters())})
    fused = accelerator.distributed_type.value in ("NO", "MULTI_CPU", "MULTI_GPU") and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"]
    )
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
        fused=fused,
    )
