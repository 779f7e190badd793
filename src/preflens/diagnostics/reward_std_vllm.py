"""`--sampler vllm`: K completions per prompt from vLLM, with the policy's current weights.

Why: at real scale, sampling dominates a reward-std measurement or an RL step, and GRPO users already run
vLLM (TRL's `use_vllm`, "colocate" mode). The engine lives in this process beside the torch model; before
each `generate` the model's current weights (LoRA adapters merged) are loaded into it, so the samples come
from the same policy the gradient norms are taken at (as TRL's colocate mode does after each update).
Only the token ids come back: the log-probs, rewards and gradients are computed by the torch model as with
the `hf` sampler, so the two samplers differ in sampling speed and random stream, not in what is measured.

Needs `pip install vllm` and a GPU; tests run only where vLLM imports.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from preflens.errors import PreflensError

__all__ = ["VLLMSampler", "named_weights"]


def named_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the model's weights as its base architecture names them, LoRA merged.

    A peft model is merged for the read and unmerged after (its adapters keep training)."""
    merge = getattr(model, "merge_adapter", None)
    if merge is None:
        yield from ((n, p.detach()) for n, p in model.state_dict().items())
        return
    merge()
    try:
        for name, tensor in model.state_dict().items():
            if "lora_" in name or "modules_to_save" in name:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            yield name, tensor.detach()
    finally:
        model.unmerge_adapter()


class VLLMSampler:
    """A vLLM engine for `sample_completions(..., sampler=...)`."""

    name = "vllm"

    def __init__(
        self, model: nn.Module, tokenizer: Any, *, seed: int = 0, gpu_memory_utilization: float = 0.3
    ) -> None:
        try:
            import vllm
        except ImportError:
            raise PreflensError(
                "--sampler vllm: the vllm package is not installed (pip install vllm; it needs a GPU)"
            ) from None
        self.vllm, self.model = vllm, model
        self._dir = tempfile.TemporaryDirectory(prefix="preflens-vllm-")
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.config.save_pretrained(self._dir.name)  # the architecture; the weights come from `sync`
        tokenizer.save_pretrained(self._dir.name)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.llm = vllm.LLM(
            model=self._dir.name,
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            load_format="dummy",  # random weights at start: `sync` loads the policy's before sampling
            enable_prefix_caching=True,
        )

    def sync(self) -> None:
        """Load the model's current weights into the engine (TRL's colocate path)."""
        engine = self.llm.llm_engine
        runner = getattr(engine, "model_executor", None)
        try:
            target = runner.driver_worker.worker.model_runner.model
        except AttributeError:  # vLLM >= 0.10 (V1 engine): through the workers' RPC
            weights = [(n, t.cpu()) for n, t in named_weights(self.model)]
            self.llm.collective_rpc(lambda worker: worker.model_runner.model.load_weights(weights))
            return
        target.load_weights(named_weights(self.model))

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        k: int,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        eos: list[int],
    ) -> list[list[int]]:
        """K sampled token rows per prompt (prompt-major), each ending with EOS when it stopped there."""
        self.sync()
        params = self.vllm.SamplingParams(
            n=k,
            temperature=temperature,
            top_p=top_p,
            top_k=-1,
            max_tokens=max_new_tokens,
            seed=int(torch.randint(0, 2**31 - 1, ())),  # from torch's RNG: seeded and resumed with the run
            stop_token_ids=eos or None,
        )
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
        rows = []
        for out in outs:
            for c in out.outputs:
                toks = list(c.token_ids)
                if c.finish_reason == "stop" and eos and (not toks or toks[-1] not in eos):
                    toks.append(eos[0])
                rows.append(toks)
        return rows
