"""Helper for tests/test_fsdp.py, launched by torchrun (gloo, CPU processes).

    torchrun --nproc_per_node 2 tests/_fsdp_script.py gram OUT_DIR VARIANT   # untied | tied | lora
    torchrun --nproc_per_node 2 tests/_fsdp_script.py chunks OUT_DIR
    torchrun --nproc_per_node 2 tests/_fsdp_script.py callback OUT_DIR   # also: python ... callback OUT_DIR
    torchrun --nproc_per_node 2 tests/_fsdp_script.py train CONFIG.json

`gram`: each rank shards the tiny model with `preflens.training.fsdp.shard_model` (FSDP2), takes its
own micro-batch of pairs (rank r: pairs 2r, 2r+1 of `fsdp_batch()`) and writes `sequence_gram` of it
and the probe's per-pair rows (`ProbeRunner`) to OUT_DIR/rank{r}.json; the test compares them with the
unsharded model in one process. `train`: one `preflens.train` run with the TrainConfig fields in
CONFIG.json (`fsdp: true` shards it). `chunks`: memory-chunked Gram passes with a different budget per
rank (`chunks_main`). `callback`: the TRL callback on sharded models (`callback_main`).
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


def update_values(model, batch) -> dict:
    """update_prediction (the probe's update_pred_* / update_obs_* columns) under a fixed update: each
    trainable parameter moves by a seeded random tensor of its full shape (under FSDP2 each rank applies
    its shard of that same tensor); every rank scores the same rows, as the trainer's probe does."""
    import torch
    from torch.distributed.tensor import DTensor, distribute_tensor

    from preflens.diagnostics.update_prediction import trainable_params, update_prediction
    from preflens.training.fsdp import ThroughRoot, is_sharded

    params = trainable_params(model)
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        for k, p in enumerate(params):
            full = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + k)) * 1e-2
            if isinstance(p, DTensor):
                full = distribute_tensor(full, p.device_mesh, p.placements)
            p.add_(full)
    fwd = ThroughRoot(model) if is_sharded(model) else None
    res = update_prediction(model, batch, before, forward=fwd)
    return {"pred": res.pred.tolist(), "obs": res.obs.tolist(), "start": res.start.tolist()}


def gram_main(out: Path, variant: str) -> None:
    import torch.distributed as dist

    from preflens.training.fsdp import shard_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = shard_model(build(variant))
    values = local_values(model, rank_slice(fsdp_batch(), rank))
    values["dtensors"] = sum(type(p).__name__ == "DTensor" for p in model.parameters())
    values["update"] = update_values(model, fsdp_batch())
    (out / f"rank{rank}.json").write_text(json.dumps(values, default=float))
    dist.destroy_process_group()


def _partial_budget(model, lengths: list[int]) -> int:
    """A budget (bytes) under which one Gram pass takes at least 2 but not all of these rows: bisected on
    the planner's own answer (`gram_rows_per_run`), whatever per-layer forms it picks under a budget."""
    from preflens.grad.api import gram_rows_per_run
    from preflens.grad.memory import MemoryBudgetError, estimate_gram_memory

    def rows(b: int) -> int:
        try:
            return gram_rows_per_run(model, lengths, max_memory=b)[0]
        except MemoryBudgetError:
            return 0

    lo, hi = 1, estimate_gram_memory(model, lengths).total  # rows(lo) == 0, rows(hi) == n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        r = rows(mid)
        if 2 <= r < len(lengths):
            return mid
        lo, hi = (mid, hi) if r < 2 else (lo, mid)
    raise AssertionError(f"no budget gives a partial pass over {lengths}")


def chunks_main(out: Path) -> None:
    """Ranks with different memory budgets: rank 0's fits only part of its micro-batch per pass, rank 1's
    all of it. Writes what each rank would have planned alone (`gram_rows_per_run`), the Gram it got, and
    the error of a pass that rank 0 cannot fit at all (every rank must raise, none may wait)."""
    import torch.distributed as dist

    from preflens.grad import sequence_gram
    from preflens.grad.api import gram_rows_per_run, row_lengths
    from preflens.grad.memory import memory_budget
    from preflens.training.fsdp import shard_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = shard_model(build("untied"))
    b = rank_slice(fsdp_batch(), rank)
    ids, am, rm = b["input_ids"], b["attention_mask"], b["response_mask"]
    worst = sorted(row_lengths(am, rm), reverse=True)
    budget = _partial_budget(model, worst) if rank == 0 else 1 << 40
    values: dict = {"n": len(worst), "alone": gram_rows_per_run(model, worst, max_memory=budget)[0]}
    with memory_budget(budget):
        values["gram"] = sequence_gram(model, ids, am, rm).tolist()
    with memory_budget(1 if rank == 0 else 1 << 40):
        try:
            sequence_gram(model, ids, am, rm)
            values["refused"] = None
        except Exception as e:  # noqa: BLE001  (the test checks the type and the message)
            values["refused"] = f"{type(e).__name__}: {e}"
    (out / f"rank{rank}.json").write_text(json.dumps(values))
    dist.barrier()  # both ranks past the refused pass before either tears the group down
    dist.destroy_process_group()


def callback_main(out: Path) -> None:
    """The TRL callback (`PreflensCallback`) on FSDP2-sharded policy and reference models, its events driven
    as TRL's Trainer drives them (on_train_begin, on_step_end after each optimizer step, on_train_end).
    TRL's DPOTrainer cannot shard on CPU processes (accelerate's FSDP plugin needs a GPU), so the two
    DPO steps are written here: rank r takes pairs 2r, 2r+1 of `fsdp_batch()`, FSDP averages the gradients
    over the ranks, which is the 1-process step over all 4 pairs. Under torchrun the models are sharded
    (`shard_model`, what accelerate's FSDP2 does: one unit per decoder layer plus the root); run as a
    plain script, the same on one unsharded process. Rank 0 / the single process writes OUT/."""
    import os
    from types import SimpleNamespace

    import torch
    import torch.nn.functional as F
    from datasets import Dataset

    from preflens.integrations.trl import PreflensCallback
    from preflens.logprobs import sequence_logps
    from preflens.training.fsdp import ThroughRoot, shard_model

    sharded = "WORLD_SIZE" in os.environ
    rank = 0
    policy, ref = build("untied"), build("untied")
    if sharded:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        shard_model(policy)
        shard_model(ref)
    g = torch.Generator().manual_seed(11)
    rows = [
        {
            "prompt_ids": torch.randint(3, 60, (3 + i % 2,), generator=g).tolist(),
            "chosen_ids": torch.randint(3, 60, (4 + i % 3,), generator=g).tolist(),
            "rejected_ids": torch.randint(3, 60, (5 - i % 2,), generator=g).tolist(),
        }
        for i in range(6)
    ]
    data = Dataset.from_list(rows)
    args = SimpleNamespace(
        output_dir=str(out), logging_steps=1, beta=0.1, loss_type="sigmoid", learning_rate=1e-2, bf16=False
    )
    trainer = SimpleNamespace(
        args=args,
        train_dataset=data,
        eval_dataset=data,
        processing_class=SimpleNamespace(pad_token_id=0, eos_token_id=1),
        ref_model=ref,
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
    )
    cb = PreflensCallback(trainer, probe_pairs=4, probe_every=1)
    state = SimpleNamespace(global_step=0, is_world_process_zero=rank == 0)
    cb.on_train_begin(args, state, None, model=policy)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    batch = rank_slice(fsdp_batch(), rank) if sharded else fsdp_batch()
    fwd = ThroughRoot(policy) if sharded else policy
    for step in (1, 2):
        lp = sequence_logps(fwd, batch["input_ids"], batch["attention_mask"], batch["response_mask"]).logps
        b = lp.shape[0] // 2
        F.logsigmoid(0.1 * (lp[:b] - lp[b:])).neg().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.global_step = step
        cb.on_step_end(args, state, None, model=policy)
    cb.on_train_end(args, state, None, model=policy)
    if sharded:
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
    elif sys.argv[1] == "chunks":
        chunks_main(Path(sys.argv[2]))
    elif sys.argv[1] == "callback":
        callback_main(Path(sys.argv[2]))
    else:
        train_main(sys.argv[2])
