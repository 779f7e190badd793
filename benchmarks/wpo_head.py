"""What WPO's weight (TRL's `use_weighting`) costs in the unembedding head: forward+backward of the fused
log-softmax head at M response positions with and without log sum_v pi(v)^2 per row.

`preflens.logprobs._selected_logps` (the default: what every run without use_weighting executes) against
`_selected_logps_and_sq` (one more logsumexp over each [chunk, V] logits chunk in the forward, a second,
non-differentiable output; the backward is the same). Timed interleaved (medians), peak RSS per call.

    .venv/bin/python benchmarks/wpo_head.py                       # SmolLM2 shapes, 512 rows
    .venv/bin/python benchmarks/wpo_head.py --device cuda --dtype bfloat16 --rows 4096
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import format_table, machine_info, peak_memory, sync_fn, time_interleaved  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    from preflens.logprobs import _selected_logps, _selected_logps_and_sq

    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False).to(dev, dt)
    h0 = torch.randn(args.rows, args.hidden, generator=g).to(dev, dt)
    targets = torch.randint(0, args.vocab, (args.rows,), generator=g).to(dev)
    upstream = torch.randn(args.rows, generator=g).to(dev)

    def plain():
        h = h0.clone().requires_grad_(True)
        head.zero_grad(set_to_none=True)
        (_selected_logps(head, h, targets, args.chunk_rows) * upstream).sum().backward()

    def with_sq():
        h = h0.clone().requires_grad_(True)
        head.zero_grad(set_to_none=True)
        tok, lss = _selected_logps_and_sq(head, h, targets, args.chunk_rows)
        (tok * upstream).sum().backward()
        return lss

    fns = {"default (no log sum p^2)": plain, "use_weighting (with log sum p^2)": with_sq}
    times = time_interleaved(fns, warmup=1, repeats=args.repeats, sync=sync_fn(dev))
    rows = []
    for name, fn in fns.items():
        peak, _ = peak_memory(fn, dev)
        rows.append(
            {"path": name, "median s": statistics.median(times[name]), "peak MiB": peak.delta_bytes / 2**20}
        )
    base = rows[0]["median s"]
    for r in rows:
        r["x default"] = r["median s"] / base
    print(machine_info(args.device))
    print(
        f"rows {args.rows}, hidden {args.hidden}, vocab {args.vocab}, chunk {args.chunk_rows}, {args.dtype}"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
