"""The policy the trainer optimizes: loaded (or handed in), attention kernel set, LoRA applied, made trainable.

Why it matters for the numbers: with *fresh* adapters (B = 0) the reference model is the base model, so the
reference pass runs with the adapters switched off; a model that arrives with adapters (a saved run's
`final/`) is its own reference, as is. `ModelParts.fresh_lora` carries that decision to the reference pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from preflens.errors import PreflensError
from preflens.models import apply_lora, enable_activation_checkpointing, load_model, set_attention
from preflens.training.config import TrainConfig

__all__ = ["ModelParts", "build_model", "is_peft"]


@dataclass
class ModelParts:
    model: Any
    tokenizer: Any
    mask_head: Any
    """The learned token-mask head of `sparse` mask="learned" (SparsePO-style), else None."""
    fresh_lora: bool
    """Adapters were added by this run (the reference is the base model with them switched off)."""


def is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _apply_lora(model: Any, config: TrainConfig) -> Any:
    rank = config.lora_rank
    alpha = config.lora_alpha if config.lora_alpha is not None else 2.0 * rank
    targets = config.lora_target_modules or "all-linear"
    return apply_lora(model, rank=rank, alpha=alpha, target_modules=targets, dropout=config.lora_dropout)


def build_model(
    config: TrainConfig, loss_kwargs: dict[str, Any], model: Any = None, tokenizer: Any = None
) -> ModelParts:
    """`model`/`tokenizer` when given (tests, notebooks), else `preflens.models.load_model(config.model)`."""
    cfg = config
    if model is not None:
        tok = tokenizer
        if tok is None:
            raise PreflensError("Trainer(model=...) needs tokenizer=... too")
    else:
        model, tok = load_model(cfg.model, dtype=cfg.dtype, device="cpu")
    set_attention(model, cfg.attn_implementation)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # as TRL does; padded positions are masked anyway
    torch.manual_seed(cfg.seed)  # LoRA init and the learned mask head
    fresh_lora = False
    if cfg.lora_rank > 0 and not is_peft(model):
        model = _apply_lora(model, cfg)
        fresh_lora = True
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if is_peft(model) and not any(p.requires_grad for p in model.parameters()):
        # a saved adapter (e.g. a run's final/) loads frozen: training it further is what was asked
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise PreflensError("the model has no trainable parameters")
    mask_head = None
    if cfg.loss == "sparse" and loss_kwargs.get("mask") == "learned":
        hidden = model.get_input_embeddings().weight.shape[1]
        dtype = next(model.parameters()).dtype
        # SparsePO-style token mask (Christopoulou et al. 2024): a linear score on the last hidden state.
        mask_head = torch.nn.Linear(hidden, 1).to(dtype)
    return ModelParts(model=model, tokenizer=tok, mask_head=mask_head, fresh_lora=fresh_lora)
