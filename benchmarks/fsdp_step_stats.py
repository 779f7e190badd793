"""Cost of per-step entanglement statistics (`--step-entanglement`) inside an FSDP2 training step.

The model is sharded as `preflens train --fsdp` shards it (`preflens.training.fsdp.shard_model`: torch's
`fully_shard` per decoder layer plus the root), each rank runs its own micro-batch, and two steps are
timed, interleaved: `plain` (forward through the root `fsdp.ThroughRoot`, DPO loss, backward with FSDP's
reduce-scatter, AdamW on the shards) and `stats` (the same step inside `StepEntanglement`: hooks on the
gathered layers build the [2B, 2B] Gram from each layer's inputs and output-gradients, then the
statistics, gathered over the ranks). Under FSDP2 the hooks never write the weight gradients themselves
(FSDP reduce-scatters autograd's), so this is the unfused form: the Gram's work comes on top.

Medians over --repeats after a warm-up, rank 0's process CPU time on CPU (wall time beside it).

    torchrun --nproc_per_node 2 benchmarks/fsdp_step_stats.py            # 2 CPU processes, gloo
    accelerate launch --config_file examples/accelerate/fsdp.yaml benchmarks/fsdp_step_stats.py \
        --device cuda --config 1b --dtype bfloat16 --pairs 8 --prompt-len 256 --response-len 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import sync_fn, time_interleaved_wall_cpu  # noqa: E402
from gram import CONFIGS, _build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--pairs", type=int, default=4, help="pairs per rank (its micro-batch)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lora", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    from preflens.logprobs import pair_logps_from_batch, sequence_logps
    from preflens.losses import get_loss
    from preflens.training.fsdp import ThroughRoot, shard_model
    from preflens.training.probes import StepEntanglement

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo" if args.device == "cpu" else "nccl")
    rank = dist.get_rank()
    if args.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        args.device = f"cuda:{torch.cuda.current_device()}"
    model, ids, att, rm = _build(args)
    # each rank its own micro-batch: the same shapes, other tokens
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.where(
        att.bool(), torch.randint_like(ids.cpu(), 1, int(ids.max()) + 1, generator=g).to(ids), ids
    )
    b = args.pairs
    with torch.no_grad():
        ref_lp = sequence_logps(model, ids, att, rm).logps
    ref = (ref_lp[:b] - 0.1, ref_lp[b:] + 0.1)
    shard_model(model)
    model.train()
    runner = ThroughRoot(model)
    loss_fn = get_loss("dpo")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-7)
    batch = {"input_ids": ids, "attention_mask": att, "response_mask": rm}
    se = StepEntanglement(loss_fn, fuse_grads=True)  # fusion is switched off under FSDP2 by the capture
    last: dict[str, Any] = {}

    def plain() -> None:
        seq = sequence_logps(runner, ids, att, rm)
        loss_fn(pair_logps_from_batch(seq, ref)).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def with_stats() -> None:
        with se.capture(model, batch):
            seq = sequence_logps(runner, ids, att, rm)
            pair = pair_logps_from_batch(seq, ref)
            se.watch(seq.logps, pair)
            loss_fn(pair).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        gather = lambda t: torch.cat([x for x in _all_gather(t)])  # noqa: E731
        last.update(se.pop_metrics(gather))

    def _all_gather(t: Any) -> list[Any]:
        out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t.contiguous())
        return out

    fns = {"plain": plain, "stats": with_stats}
    wall, cpu = time_interleaved_wall_cpu(fns, warmup=1, repeats=args.repeats, sync=sync_fn(args.device))
    t = {m: {"wall": statistics.median(wall[m]), "cpu": statistics.median(cpu[m])} for m in fns}
    key = "cpu" if args.device == "cpu" else "wall"
    out = {
        "setting": vars(args),
        "torch": torch.__version__,
        "world_size": dist.get_world_size(),
        "times_s": t,
        "stats_over_plain": t["stats"][key] / t["plain"][key],
        "stats_over_plain_wall": t["stats"]["wall"] / t["plain"]["wall"],
        "example_stats": last,
    }
    dist.destroy_process_group()
    if rank != 0:
        return
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(
        f"FSDP2 over {out['world_size']} processes, device={args.device} config={args.config} dtype={args.dtype} "
        f"lora={args.lora or 'off'} pairs/rank={b} tokens/seq<={args.prompt_len + args.response_len}"
    )
    print(f"{'step':<34}{'wall s':>10}{'cpu s':>10}")
    print(f"{'plain FSDP2 DPO step':<34}{t['plain']['wall']:>10.4f}{t['plain']['cpu']:>10.4f}")
    print(f"{'FSDP2 step + entanglement stats':<34}{t['stats']['wall']:>10.4f}{t['stats']['cpu']:>10.4f}")
    print(f"stats step / plain step = {out['stats_over_plain']:.2f} ({key} time)")
    print("stats of the last step: " + ", ".join(f"{k}={v:.3g}" for k, v in last.items()))


if __name__ == "__main__":
    main()
