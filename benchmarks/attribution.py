"""Cost of in-run attribution (`preflens train --attribute-every K --attribute-pairs P`).

The plain step: one forward over chosen+rejected (`sequence_logps`), the DPO loss, backward, AdamW step
(as `benchmarks/step_stats.py`). The attributed step: the same plus what `training.attribution` does at an
attributed step: one forward + activation-only backward over the probe set's 2P rows
(`grad.cross.probe_parts`), the step's forward and backward inside `grad.cross.CrossCapture` (the
cross-example products per parameter, ghost or materialized), and the per-pair effects. Same CPU
configuration as the other step-statistics benchmarks (the small Llama of `benchmarks/gram.py`, B = 4
pairs of 64 + 64 tokens, one thread); the probe pairs have the same shape as the training pairs.

Times are interleaved in one process, medians over --repeats after a warm-up, process CPU time as the
ratio's measure on a CPU (wall time beside it). Memory: the peak above the baseline of one call of each
(`common.peak_memory`), plus the bytes the probe pass keeps (its parts) until the step's backward.
The per-step overhead amortized over K steps is (attributed - plain) / K.

    python benchmarks/attribution.py                      # P = 16, CPU
    python benchmarks/attribution.py --probe-pairs 4 --lora 16
    python benchmarks/attribution.py --device cuda --config 1b --dtype bfloat16 --pairs 8   # pending (GPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_memory, sync_fn, time_interleaved_wall_cpu  # noqa: E402
from gram import CONFIGS, _build  # noqa: E402


def _parts_bytes(probe: Any) -> int:
    """Bytes of the distinct tensors the probe pass keeps (activations and output-gradients)."""
    seen: dict[int, int] = {}
    for outers, vec in probe.parts.values():
        tensors = [vec] if vec is not None else []
        for o in outers:
            tensors += (
                list(o.grid) if o.grid is not None else [t for t in (o.a, o.b, o.ids, o.seg) if t is not None]
            )
        for t in tensors:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--probe-pairs", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lora", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from preflens.diagnostics.attribution import pair_effects
    from preflens.grad.cross import CrossCapture, probe_parts
    from preflens.logprobs import pair_logps_from_batch, sequence_logps
    from preflens.losses import get_loss

    torch.set_num_threads(args.threads)
    model, ids, att, rm = _build(args)
    pargs = argparse.Namespace(**{**vars(args), "pairs": args.probe_pairs})
    _, pids, patt, prm = _build(pargs)  # same model seed; its rows are the probe set
    pids = (pids + 7) % CONFIGS[args.config]["vocab_size"]  # other tokens than the training rows
    pids[~patt.bool()] = 0
    model.train()
    b = args.pairs
    with torch.no_grad():
        ref_lp = sequence_logps(model, ids, att, rm).logps
    ref = (ref_lp[:b] - 0.1, ref_lp[b:] + 0.1)
    loss_fn = get_loss("dpo")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-7)
    last: dict[str, Any] = {}

    def plain() -> None:
        seq = sequence_logps(model, ids, att, rm)
        loss_fn(pair_logps_from_batch(seq, ref)).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def attributed() -> None:
        model.eval()
        probe = probe_parts(model, pids, patt, prm)
        model.train()
        cap = CrossCapture(model, att, rm, probe, check_graph=False)
        with cap:
            seq = sequence_logps(model, ids, att, rm)
            cap.watch(seq.logps)
            loss_fn(pair_logps_from_batch(seq, ref)).mean().backward()
        eff = pair_effects(cap.result(), -1e-7)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last["frac_probe_chosen_down"] = float((eff[..., 0].sum(0) < 0).float().mean())
        last["probe_parts_mib"] = _parts_bytes(probe) / 2**20

    fns = {"plain": plain, "attributed": attributed}
    wall, cpu = time_interleaved_wall_cpu(fns, warmup=1, repeats=args.repeats, sync=sync_fn(args.device))
    t = {m: {"wall": statistics.median(wall[m]), "cpu": statistics.median(cpu[m])} for m in fns}
    mem = {m: peak_memory(fns[m], args.device)[0] for m in fns}
    key = "cpu" if args.device == "cpu" else "wall"
    ratio = t["attributed"][key] / t["plain"][key]
    out = {
        "setting": vars(args),
        "torch": torch.__version__,
        "times_s": t,
        "attributed_over_plain": ratio,
        "attributed_over_plain_wall": t["attributed"]["wall"] / t["plain"]["wall"],
        "amortized_over_plain": {k: 1 + (ratio - 1) / k for k in (1, 5, 10, 50)},
        "peak_mib": {m: mem[m].delta_bytes / 2**20 for m in fns},
        "memory_method": mem["plain"].method,
        **last,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(
        f"device={args.device} config={args.config} dtype={args.dtype} lora={args.lora or 'off'} pairs={b} "
        f"probe pairs={args.probe_pairs} tokens/seq<={args.prompt_len + args.response_len} threads={args.threads}"
    )
    print(f"{'step':<36}{'wall s':>10}{'cpu s':>10}{'peak MiB':>10}")
    print(
        f"{'plain DPO step':<36}{t['plain']['wall']:>10.4f}{t['plain']['cpu']:>10.4f}{out['peak_mib']['plain']:>10.1f}"
    )
    print(
        f"{'DPO step + attribution':<36}{t['attributed']['wall']:>10.4f}{t['attributed']['cpu']:>10.4f}"
        f"{out['peak_mib']['attributed']:>10.1f}"
    )
    print(f"probe parts kept until the backward: {last['probe_parts_mib']:.1f} MiB")
    print(f"attributed step / plain step = {ratio:.2f} ({key} time); every K steps: "
          + ", ".join(f"K={k}: {v:.2f}" for k, v in out["amortized_over_plain"].items()))  # fmt: skip


if __name__ == "__main__":
    main()
