"""Cost of per-step entanglement statistics gathered inside a training step (`--step-entanglement`).

DESIGN.md target: a training step that also yields the batch's entanglement statistics (the
[2B, 2B] Gram of the log-prob gradients, inner products, norms, cosines, conditions) costs at most
1.3x a plain step. The plain step: one forward over chosen+rejected (`sequence_logps`), the DPO loss,
backward, AdamW step. The measured step: the same inside `preflens.probes.StepEntanglement` (module
hooks on the same forward and backward; `gram.StepGramCapture`), plus the statistics. By default the
hooks also write the weight gradients (the sum of the per-sequence gradients they build anyway) and
autograd skips them, as `preflens train --step-entanglement` does; `--no-fuse` keeps autograd's own
weight gradients as well (both computed).

Under torchrun (WORLD_SIZE > 1, gloo on a CPU) the model is wrapped in DistributedDataParallel as the
trainer wraps it, and three steps are timed: `plain` (DDP's all-reduce overlapped with the backward),
`stats` (the trainer's way: DDP kept out with no_sync, fused weight gradients, one bucketed all-reduce
after the backward: `preflens.train._all_reduce_mean_grads`) and `stats-unfused` (DDP syncing autograd's
gradients while the hooks compute the statistics beside them).

Times are interleaved in one process (plain, stats, plain, stats, ...), medians over --repeats after
a warm-up; on CPU the process CPU time is the ratio's measure (wall time printed beside it).

    python benchmarks/step_stats.py                       # CPU, the small Llama of benchmarks/gram.py
    python benchmarks/step_stats.py --device cuda --config 1b --dtype bfloat16 --pairs 8 \
        --prompt-len 256 --response-len 256
    torchrun --nproc_per_node 2 benchmarks/step_stats.py     # DDP, 2 CPU processes (gloo)
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
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lora", type=int, default=0)
    ap.add_argument(
        "--no-fuse", action="store_true", help="let autograd compute the weight gradients too (as under DDP)"
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import contextlib
    import os

    import torch

    from preflens.logprobs import pair_logps_from_batch, sequence_logps
    from preflens.losses import get_loss
    from preflens.probes import StepEntanglement

    torch.set_num_threads(args.threads)
    model, ids, att, rm = _build(args)
    model.train()
    b = args.pairs
    with torch.no_grad():
        ref_lp = sequence_logps(model, ids, att, rm).logps
    ref = (ref_lp[:b] - 0.1, ref_lp[b:] + 0.1)
    loss_fn = get_loss("dpo")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-7)
    batch = {"input_ids": ids, "attention_mask": att, "response_mask": rm}
    se = StepEntanglement(loss_fn, fuse_grads=not args.no_fuse)
    last: dict[str, Any] = {}

    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    logps_of: Any = lambda: sequence_logps(model, ids, att, rm)  # noqa: E731
    no_sync: Any = contextlib.nullcontext
    if ddp:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        from preflens.train import _all_reduce_mean_grads, _lean_logps_module

        dist.init_process_group("gloo")
        wrapped = DistributedDataParallel(_lean_logps_module(model))  # the trainer's DDP module
        logps_of = lambda: wrapped(ids, att, rm)  # noqa: E731
        no_sync = wrapped.no_sync

    def plain() -> None:
        seq = logps_of()
        loss_fn(pair_logps_from_batch(seq, ref)).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def with_stats(fused: bool = not args.no_fuse) -> None:
        se.fuse_grads = fused
        with no_sync() if ddp and fused else contextlib.nullcontext(), se.capture(model, batch):
            seq = logps_of()
            pair = pair_logps_from_batch(seq, ref)
            se.watch(seq.logps, pair)
            loss_fn(pair).mean().backward()
        if ddp and fused:
            _all_reduce_mean_grads(params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last.update(se.pop_metrics())

    fns = {"plain": plain, "stats": with_stats}
    if ddp:
        fns["stats-unfused"] = lambda: with_stats(fused=False)
    wall, cpu = time_interleaved_wall_cpu(fns, warmup=1, repeats=args.repeats, sync=sync_fn(args.device))
    t = {m: {"wall": statistics.median(wall[m]), "cpu": statistics.median(cpu[m])} for m in fns}
    key = "cpu" if args.device == "cpu" else "wall"
    out = {
        "setting": vars(args),
        "torch": torch.__version__,
        "times_s": t,
        "stats_over_plain": t["stats"][key] / t["plain"][key],
        "stats_over_plain_wall": t["stats"]["wall"] / t["plain"]["wall"],
        "example_stats": last,
    }
    if ddp:
        out["world_size"] = dist.get_world_size()
        out["unfused_over_plain"] = t["stats-unfused"][key] / t["plain"][key]
        out["unfused_over_plain_wall"] = t["stats-unfused"]["wall"] / t["plain"]["wall"]
        if dist.get_rank() != 0:
            return
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(
        f"device={args.device} config={args.config} dtype={args.dtype} lora={args.lora or 'off'} "
        f"pairs={b} tokens/seq<={args.prompt_len + args.response_len} threads={args.threads} "
        f"fused weight grads={not args.no_fuse}"
    )
    print(f"{'step':<34}{'wall s':>10}{'cpu s':>10}")
    print(f"{'plain DPO step':<34}{t['plain']['wall']:>10.4f}{t['plain']['cpu']:>10.4f}")
    print(f"{'DPO step + entanglement stats':<34}{t['stats']['wall']:>10.4f}{t['stats']['cpu']:>10.4f}")
    if ddp:
        print(
            f"{'  ... DDP syncing, not fused':<34}{t['stats-unfused']['wall']:>10.4f}{t['stats-unfused']['cpu']:>10.4f}"
        )
        print(f"DDP over {out['world_size']} processes; unfused / plain = {out['unfused_over_plain']:.2f}")
    print(f"stats step / plain step = {out['stats_over_plain']:.2f} ({key} time; target <= 1.3)")
    print("stats of the last step: " + ", ".join(f"{k}={v:.3g}" for k, v in last.items()))


if __name__ == "__main__":
    main()
