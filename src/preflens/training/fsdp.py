"""FSDP2 for the preference trainer: the policy sharded with `torch.distributed.fsdp.fully_shard`.

One code path for both launchers: `--fsdp` under torchrun on CPU processes (gloo; what the tests run)
and `accelerate launch --config_file examples/accelerate/fsdp.yaml` on GPUs (accelerate's FSDP
plugin then only tells us to shard and how: preflens shards the model itself, as accelerate's FSDP2
would, one unit per decoder layer plus the root).

Why not the root's own forward: the trainer's forward is `preflens.logprobs.sequence_logps`, which calls
the decoder and then the head only at response-predicting positions. `ThroughRoot` hands
`sequence_logps` a decoder that runs *through the root module's call*, so FSDP's root hooks gather the
root's own parameters (embeddings, final norm, head; tied or not) and set up the backward, while the
head stays response-only. The gradient diagnostics (`preflens.grad`) gather the root themselves.

Checkpoints follow accelerate's FSDP2 convention for a sharded state dict: `pytorch_model_fsdp_0/` and
`optimizer_0/` are torch.distributed.checkpoint (DCP) directories written by every rank (LoRA: the
adapter tensors only), the rest of `accelerator.save_state` (RNG per process, trainer state, the
schedule) as usual. `final/` is gathered to a full state dict on rank 0 and saved with `save_pretrained`.

Cross-rank reductions the trainer does under FSDP2: FSDP's gradient reduce-scatter (the mean over
ranks), the gradient norm for clipping (a sum of squares over the shards: `clip_grad_norm`), and the
gathers of per-pair statistics it does under DDP too. The Gram diagnostics need none
(`preflens.grad.capture`); the probe's update_pred_* columns (<g_i, delta theta>) all-reduce one number
per probed row: the sum over ranks of the dot products of the local shards
(`diagnostics.update_prediction`); a memory-chunked Gram pass all-reduces its row count once, so every
rank runs the same number of forwards (`grad.api.agree_rows`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from preflens.errors import PreflensError

__all__ = [
    "MODEL_DIR",
    "OPTIMIZER_DIR",
    "ThroughRoot",
    "clip_grad_norm",
    "decoder_layers",
    "is_sharded",
    "load_sharded",
    "prepare_sharded",
    "reshard_all",
    "save_full",
    "save_sharded",
    "shard_model",
    "shard_policy",
    "wants_fsdp",
]

MODEL_DIR = "pytorch_model_fsdp_0"  # accelerate's names for FSDP's sharded model / optimizer state
OPTIMIZER_DIR = "optimizer_0"


def wants_fsdp(config: Any, accelerator: Any) -> bool:
    """`--fsdp`, or accelerate launched with an FSDP config (examples/accelerate/fsdp.yaml)."""
    kind = str(getattr(accelerator, "distributed_type", "")).split(".")[-1]
    return bool(getattr(config, "fsdp", False)) or kind == "FSDP"


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: modules whose class is in the model's `_no_split_modules` (transformers
    names its decoder layer there, e.g. LlamaDecoderLayer), the units FSDP gathers one at a time."""
    names = set(getattr(_base(model), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise PreflensError(
            f"--fsdp: cannot find the decoder layers of {type(_base(model)).__name__} (no _no_split_modules)"
        )
    return layers


def _plugin_options(accelerator: Any) -> tuple[bool, MixedPrecisionPolicy]:
    """reshard_after_forward and the mixed-precision policy from accelerate's FSDP plugin, if any."""
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    reshard = bool(getattr(plugin, "reshard_after_forward", True)) if plugin is not None else True
    mp = getattr(accelerator, "mixed_precision", "no")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(mp))
    return reshard, MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)


def shard_policy(model: nn.Module, mask_head: Any, accelerator: Any, config: Any = None) -> nn.Module:
    """The trainer's policy sharded (`shard_model`); refuses what does not run sharded yet: the learned
    token-mask head. (`--probe-every` runs sharded: its Gram through `preflens.grad.capture`, its
    update_pred_* columns through `diagnostics.update_prediction`'s sharded path with `ThroughRoot`.)"""
    if mask_head is not None:
        raise PreflensError("--fsdp with sparse mask='learned' is not supported (use mask='diff')")
    return shard_model(model, accelerator)


def shard_model(model: nn.Module, accelerator: Any = None) -> nn.Module:
    """fully_shard each decoder layer, then the root; returns the model (sharded in place).

    The root is lazily initialised here, before any forward: the first forward of a standalone
    diagnostic pass runs the layers without the root's forward, and FSDP takes the first module to
    run forward for the root.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise PreflensError("--fsdp needs a process group: launch with torchrun or accelerate launch")
    if accelerator is not None and getattr(accelerator, "device", None) is not None:
        device = accelerator.device
    else:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    device_type = device.type if device is not None else "cpu"
    if device is not None:
        model.to(device)
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    reshard, mp = _plugin_options(accelerator)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model._get_fsdp_state()._lazy_init()  # type: ignore[operator]  # the model is the root
    return model


def reshard_all(model: nn.Module) -> None:
    """Drop every gathered copy of the parameters (each FSDP unit's `reshard`). A forward without a
    backward leaves the root (and any unit with reshard_after_forward off) gathered, and FSDP2 reuses a
    gathered copy rather than gathering again: after the shards are written (an optimizer step, a loaded
    checkpoint), the next forward would see the old values."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class _DecoderThroughRoot:
    """The decoder, called inside the root module's call (FSDP's root hooks run around it)."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        base = _base(root)
        self.decoder = getattr(base, base.base_model_prefix)

    def __call__(self, **kwargs: Any) -> Any:
        root, decoder = self.root, self.decoder
        root.forward = lambda **kw: decoder(**kw)  # an instance attribute shadows the class's forward
        try:
            return root(**kwargs)
        finally:
            del root.forward


class ThroughRoot(nn.Module):
    """What `sequence_logps` runs on an FSDP2 root: its decoder through the root's call, its head as is.

    Not a wrapper in the state-dict sense (the model is no submodule): it only answers the attributes
    `preflens.logprobs.split_backbone_and_head` reads.
    """

    base_model_prefix = "decoder_through_root"

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "root", root)
        object.__setattr__(self, "config", _base(root).config)
        object.__setattr__(self, "decoder_through_root", _DecoderThroughRoot(root))

    def get_output_embeddings(self) -> nn.Module:
        return _base(self.root).get_output_embeddings()

    def get_input_embeddings(self) -> nn.Module:
        return _base(self.root).get_input_embeddings()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """torch's clip_grad_norm_ on sharded gradients: the norm's sum of squares is reduced over the ranks."""
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    return float(total)


def _trainable_keys(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def save_sharded(model: nn.Module, optimizer: Any, output_dir: str | os.PathLike, adapter_only: bool) -> None:
    """Every rank writes its shards (DCP): model (LoRA: adapter only) and optimizer state."""
    msd, osd = get_state_dict(model, getattr(optimizer, "optimizer", optimizer))
    if adapter_only:
        keep = _trainable_keys(model)
        msd = {k: v for k, v in msd.items() if k in keep}
    out = Path(output_dir)
    dcp.save({"model": msd}, checkpoint_id=str(out / MODEL_DIR))
    dcp.save({"optimizer": osd}, checkpoint_id=str(out / OPTIMIZER_DIR))


def load_sharded(model: nn.Module, optimizer: Any, input_dir: str | os.PathLike, adapter_only: bool) -> None:
    """The inverse of `save_sharded` (every rank reads its shards), into the sharded model and optimizer."""
    opt = getattr(optimizer, "optimizer", optimizer)
    msd, osd = get_state_dict(model, opt)
    if adapter_only:
        keep = _trainable_keys(model)
        msd = {k: v for k, v in msd.items() if k in keep}
    src = Path(input_dir)
    for name in (MODEL_DIR, OPTIMIZER_DIR):
        if not (src / name).is_dir():
            raise PreflensError(f"{src}: no {name}/ (not a checkpoint of an --fsdp run?)")
    model_state, optim_state = {"model": msd}, {"optimizer": osd}
    dcp.load(model_state, checkpoint_id=str(src / MODEL_DIR))
    dcp.load(optim_state, checkpoint_id=str(src / OPTIMIZER_DIR))
    set_state_dict(
        model,
        opt,
        model_state_dict=model_state["model"],
        optim_state_dict=optim_state["optimizer"],
        options=StateDictOptions(strict=not adapter_only),
    )


def save_full(accelerator: Any, model: nn.Module, tokenizer: Any, mask_head: Any, run_dir: Path) -> Path:
    """`run_dir/final`: the full state dict gathered to rank 0 (CPU), saved with `save_pretrained`
    (`checkpoint.save_final`'s signature; there is no mask head under FSDP2)."""
    final = Path(run_dir) / "final"
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if accelerator.is_main_process:
        model.save_pretrained(final, state_dict=sd, safe_serialization=True)  # type: ignore[operator]
        tokenizer.save_pretrained(final)
    dist.barrier()
    return final


def prepare_sharded(
    accelerator: Any, model: nn.Module, optimizer: Any, scheduler: Any, loader: Any, adapter_only: bool
) -> Any:
    """What `accelerator.prepare` does for a sharded run: the loader only (the model is sharded already,
    the optimizer and schedule are torch's own). Checkpoints: the schedule as a checkpointed object, the
    model and optimizer shards by DCP from the save/load hooks, which every rank runs."""
    prepared = accelerator.prepare(loader)
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_save_state_pre_hook(
        lambda models, weights, out: save_sharded(model, optimizer, out, adapter_only)
    )
    accelerator.register_load_state_pre_hook(
        lambda models, src: load_sharded(model, optimizer, src, adapter_only)
    )
    return prepared
