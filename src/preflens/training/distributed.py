"""How the policy forward and its gradients cross processes (DDP), and which module the forward runs.

Why these exist: under DDP the module DDP wraps decides what the forward computes. Wrapping the bare model
would run its full-vocabulary head; wrapping `lean_logps_module(model)` keeps `sequence_logps`'s
response-only unembedding and still arms DDP's all-reduce. Under FSDP/DeepSpeed the wrapper's own forward
must run (it gathers the sharded parameters): `through_forward`. When a callback writes the parameter
gradients itself (fused step statistics), DDP's hooks never fire and `all_reduce_mean_grads` does their job.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType

from preflens.logprobs import sequence_logps

__all__ = [
    "all_reduce_mean_grads",
    "grad_sync",
    "lean_logps_module",
    "through_forward",
    "is_distributed",
    "is_ddp_like",
]


def is_distributed(accelerator: Any) -> bool:
    """accelerate runs several processes (DDP, FSDP or DeepSpeed)."""
    return accelerator.distributed_type != DistributedType.NO


def is_ddp_like(accelerator: Any) -> bool:
    """accelerate wraps the model in DistributedDataParallel (multi-GPU/CPU/XPU/..., not FSDP/DeepSpeed)."""
    name = str(accelerator.distributed_type).split(".")[-1]
    return name.startswith("MULTI_")


def all_reduce_mean_grads(params: Sequence[Any], bucket_elems: int = 1 << 25) -> None:
    """Average `p.grad` over all processes, as DDP would have (a parameter without a gradient counts as 0).

    Flattened into buckets of one dtype (at most `bucket_elems` elements, 128 MiB in fp32) so a step costs a
    few collectives, not one per tensor. Every process passes the same parameters in the same order.
    """
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[Any, list[Any]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        start = 0
        while start < len(grads):
            bucket, n = [], 0
            while start < len(grads) and (not bucket or n + grads[start].numel() <= bucket_elems):
                bucket.append(grads[start])
                n += grads[start].numel()
                start += 1
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()


def lean_logps_module(model: Any) -> Any:
    """A module whose forward is `sequence_logps(model, ...)` (the response-only unembedding).

    Prepared for DDP *instead of* the model, DDP's forward (which arms the gradient all-reduce) runs
    the lean path. Its state dict is the model's own (no extra prefix), so its checkpoints are those
    of DDP over the model itself.
    """

    class LeanLogps(torch.nn.Module):
        def __init__(self, lm: Any) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: Any, attention_mask: Any, response_mask: Any, **kw: Any) -> Any:
            return sequence_logps(self.lm, input_ids, attention_mask, response_mask, **kw)

        def state_dict(self, *args: Any, **kwargs: Any) -> Any:
            return self.lm.state_dict(*args, **kwargs)

        def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
            return self.lm.load_state_dict(state_dict, strict=strict, assign=assign)

    return LeanLogps(model)


def through_forward(model: Any) -> Any:
    """`model` behind a module without `config`, so `sequence_logps` calls the model's own forward.

    Under DDP, FSDP or DeepSpeed the wrapper's forward does work that calling the decoder and the
    lm_head directly would skip (DDP: preparing the gradient all-reduce; FSDP/ZeRO-3: gathering
    sharded parameters). The price is the model's full-vocabulary logits instead of the response-only
    unembedding of the single-process path.
    """

    class ThroughForward(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            object.__setattr__(self, "inner", inner)  # not a submodule: no second registration

        def forward(self, **kwargs: Any) -> Any:
            return self.inner(**kwargs)

    return ThroughForward(model)


def grad_sync(accelerator: Any, wrapped: Any, sync: bool, sharded: bool) -> Any:
    """The context of one micro-batch's backward: gradients cross processes only when `sync` (the last
    micro-batch of a step). DDP: `no_sync` otherwise; FSDP2: its reduce-scatter switched off instead."""
    if accelerator.num_processes == 1 or (sync and not sharded):
        return contextlib.nullcontext()
    if sharded:
        wrapped.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return accelerator.no_sync(wrapped)
