"""How a DPO step and a gradient-entanglement probe grow with sequence length and batch size.

For planning: one table, one row per (pairs, sequence length), with
  step s      one preflens training step on the batch (sequence_logps over chosen+rejected, DPO loss with
              cached reference log-probs, backward, AdamW), median of --repeats after a warm-up;
  tokens/s    real tokens of the batch / step s;
  step MB     peak memory of the step above the memory held before it (benchmarks/common.py);
  probe s     preflens.diagnostics.gram.sequence_gram on the same 2B sequences (the per-sequence gradient
              Gram matrix behind the entanglement probes: one forward and one activation-only backward);
  probe/step  probe s / step s: what `--probe-every 1` would add to every step (a probe every k steps
              adds 1/k of it).
Sequences are prompt L/2 + response L/2 random tokens, no padding (the cost of the real tokens only).

    .venv/bin/python benchmarks/scaling.py                       # 4-layer Llama, SmolLM2 vocabulary, CPU
    .venv/bin/python benchmarks/scaling.py --model-config embedded --lengths 128,256,512 --batches 1,2
    .venv/bin/python benchmarks/scaling.py --device cuda --dtype bfloat16 --model-config llama-1b \\
        --lengths 256,512,1024,2048,4096 --batches 1,4,8,16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import format_table, machine_info, peak_memory, sync_fn, time_interleaved  # noqa: E402
from train_vs_trl import build_model, n_params  # noqa: E402


def _batch(pairs: int, length: int, vocab: int, device: str, seed: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    ids = torch.randint(3, vocab, (n, length), generator=g)
    am = torch.ones_like(ids)
    rm = torch.zeros_like(ids, dtype=torch.bool)
    rm[:, length // 2 :] = True
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=am, response_mask=rm).items()}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", default="small", help="embedded | tiny | small | llama-1b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--lengths", default="128,256,512,1024,2048", help="total tokens per sequence")
    ap.add_argument("--batches", default="1,2,4", help="pairs per step, measured at --batch-length")
    ap.add_argument("--pairs", type=int, default=1, help="pairs per step for the length sweep")
    ap.add_argument("--batch-length", type=int, default=256, help="sequence length for the batch sweep")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-probe", action="store_true", help="skip the sequence_gram column")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args(argv)
    args.trl_optim = "adamw_torch"
    warnings.filterwarnings("ignore")

    import torch

    from preflens.logprobs import pair_logps_from_batch, sequence_logps
    from preflens.losses import get_loss

    model, _ = build_model(args)
    if args.gradient_checkpointing:
        from preflens.models import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    model.train()
    # fused AdamW, as the trainer and TRL use: the per-tensor loop would add a large constant per step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7, fused=True)
    loss_fn = get_loss("dpo", beta=0.1)
    sync = sync_fn(args.device)
    vocab = model.config.vocab_size
    print("[scaling] " + ", ".join(f"{k} {v}" for k, v in machine_info(args.device).items()))
    print(
        f"[scaling] model {args.model_config} ({n_params(model) / 1e6:.1f}M params, {args.dtype}), {args.device}"
    )

    grid = [(args.pairs, n) for n in map(int, args.lengths.split(","))]
    grid += [
        (b, args.batch_length)
        for b in map(int, args.batches.split(","))
        if (b, args.batch_length) not in grid
    ]
    rows = []
    for pairs, length in grid:
        b = _batch(pairs, length, vocab, args.device, seed=length * 100 + pairs)
        with torch.no_grad():
            ref = sequence_logps(model, b["input_ids"], b["attention_mask"], b["response_mask"]).logps
        ref_pair = (ref[:pairs], ref[pairs:])

        def step(b: dict[str, Any] = b, ref_pair: tuple = ref_pair) -> None:
            s = sequence_logps(model, b["input_ids"], b["attention_mask"], b["response_mask"])
            loss_fn(pair_logps_from_batch(s, ref_pair)).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns = {"step": step}
        if not args.no_probe:
            from preflens.grad import sequence_gram

            def probe(b: dict[str, Any] = b) -> None:
                sequence_gram(model, b["input_ids"], b["attention_mask"], b["response_mask"])

            fns["probe"] = probe
        times = time_interleaved(fns, warmup=1, repeats=args.repeats, sync=sync)
        mem, _ = peak_memory(step, args.device)
        st = statistics.median(times["step"])
        tokens = int(b["attention_mask"].sum())
        row = {
            "pairs": pairs,
            "seq len": length,
            "tokens": tokens,
            "step s": st,
            "tokens/s": tokens / st,
            "step MB": mem.delta_bytes / 2**20,
        }
        if "probe" in times:
            pt = statistics.median(times["probe"])
            row.update({"probe s": pt, "probe/step": pt / st})
        rows.append(row)
        print(f"[scaling] {row}", flush=True)
    print()
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
