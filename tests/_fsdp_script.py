"""Helper for tests/test_fsdp.py, launched by torchrun (gloo, CPU processes).

    torchrun --nproc_per_node 2 tests/_fsdp_script.py gram OUT_DIR VARIANT   # untied | tied | lora
    torchrun --nproc_per_node 2 tests/_fsdp_script.py train CONFIG.json

`gram`: each rank shards the tiny model with `preflens.training.fsdp.shard_model` (FSDP2), takes its
own micro-batch of pairs (rank r: pairs 2r, 2r+1 of `fsdp_batch()`) and writes `sequence_gram` of it
and the probe's per-pair rows (`ProbeRunner`) to OUT_DIR/rank{r}.json; the test compares them with the
unsharded model in one process. `train`: one `preflens.train` run with the TrainConfig fields in
CONFIG.json (`fsdp: true` shards it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def build(variant: str):
    """The tiny Llama of the test (untied / tied embeddings / LoRA on all linear maps)."""
    from preflens.models import apply_lora, tiny_model

    model, _ = tiny_model(hidden_size=32, num_layers=2, tie_word_embeddings=variant == "tied", seed=0)
    if variant == "lora":
        import torch

        torch.manual_seed(1)
        model = apply_lora(model, rank=4, alpha=8.0, target_modules="all-linear", dropout=0.0)
        for n, p in model.named_parameters():  # B = 0 at init would make the adapter Gram trivial
            if "lora_B" in n:
                p.data.normal_(0, 0.1)
    return model.eval()


def fsdp_batch(n_pairs: int = 4):
    """n_pairs pairs (chosen rows, then rejected rows), right-padded, with different lengths."""
    import torch

    g = torch.Generator().manual_seed(7)
    t = 12
    ids = torch.randint(3, 60, (2 * n_pairs, t), generator=g)
    am = torch.ones_like(ids)
    rm = torch.zeros_like(ids, dtype=torch.bool)
    for i in range(2 * n_pairs):
        end = t - (i % 4)
        am[i, end:] = 0
        ids[i, end:] = 0
        rm[i, 4:end] = True
    return {"input_ids": ids, "attention_mask": am, "response_mask": rm, "pair_index": torch.arange(n_pairs)}


def rank_slice(batch, rank: int, per: int = 2):
    """Pairs per*rank .. per*(rank+1)-1 of a pair batch (their chosen and rejected rows)."""
    import torch

    b = batch["pair_index"].shape[0]
    pairs = torch.arange(per * rank, per * (rank + 1))
    rows = torch.cat([pairs, pairs + b])
    return {k: (v[pairs] if k == "pair_index" else v[rows]) for k, v in batch.items()}


def local_values(model, batch) -> dict:
    """sequence_gram and the probe rows of `batch` (the same code with and without FSDP)."""
    import torch

    from preflens.diagnostics.probe_state import ProbeRunner
    from preflens.grad import sequence_gram
    from preflens.losses import get_loss

    gram = sequence_gram(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    b = batch["pair_index"].shape[0]
    ref = (torch.full((b,), -30.0), torch.full((b,), -30.0))
    rows, agg = ProbeRunner(model, batch, get_loss("dpo"), ref).run(0, 1e-3)
    return {"gram": gram.tolist(), "rows": rows, "agg": agg}


def gram_main(out: Path, variant: str) -> None:
    import torch.distributed as dist

    from preflens.training.fsdp import shard_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = shard_model(build(variant))
    values = local_values(model, rank_slice(fsdp_batch(), rank))
    values["dtensors"] = sum(type(p).__name__ == "DTensor" for p in model.parameters())
    (out / f"rank{rank}.json").write_text(json.dumps(values, default=float))
    dist.destroy_process_group()


def train_main(cfg_path: str) -> None:
    """One run; `interrupt_at` N (not a TrainConfig field): Ctrl-C on every rank in the middle of step
    N + 1 (its forward), which the trainer rewinds, checkpointing step N."""
    from preflens.train import TrainConfig, train
    from preflens.training.callbacks import TrainerCallback

    with open(cfg_path) as f:
        fields = json.load(f)
    stop = fields.pop("interrupt_at", None)

    class Interrupt(TrainerCallback):
        def micro_batch_context(self, trainer, batch):
            if trainer.state.step == stop:
                raise KeyboardInterrupt

    try:
        train(TrainConfig(**fields), callbacks=[Interrupt()] if stop else [])
    except KeyboardInterrupt:
        sys.exit(3)  # the interrupt's checkpoint is written; the test resumes from it


if __name__ == "__main__":
    if sys.argv[1] == "gram":
        gram_main(Path(sys.argv[2]), sys.argv[3])
    else:
        train_main(sys.argv[2])
