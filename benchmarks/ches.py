"""CHES scoring throughput vs a bare forward pass over the same tokens (DESIGN.md target: <= 1.2x).

Times, side by side in one process, over the same 2B right-padded rows (B pairs, prompt P + response R):
  forward   model(input_ids, attention_mask) under inference_mode: the bare forward a user would write
            (backbone + lm_head over every position);
  backbone  the decoder alone (the floor: CHES cannot need less than this);
  ches      preflens.diagnostics.ches.ches_score on the same pairs (chosen and rejected passed separately,
            concatenated inside, one backbone forward, sums of the response-predicting hidden states).

    .venv/bin/python benchmarks/ches.py                      # a Llama built from a config (CPU-sized)
    .venv/bin/python benchmarks/ches.py --embedded           # the embedded SmolLM2-135M-Instruct
    .venv/bin/python benchmarks/ches.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, time_interleaved  # noqa: E402


def _model(args):
    if args.embedded:
        from preflens.models import load_model

        model, _ = load_model(None)
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.prompt + args.response + 8,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedded", action="store_true")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--response", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    from preflens.diagnostics.ches import ches_score, get_decoder

    dtype = getattr(torch, args.dtype)
    model = _model(args).to(args.device, dtype).eval()
    vocab = model.config.vocab_size
    b, p, r = args.pairs, args.prompt, args.response
    g = torch.Generator().manual_seed(0)
    # responses of varying length (right padding), prompt shared by a pair's two rows
    t = p + r
    ids = torch.randint(0, vocab, (2 * b, t), generator=g)
    ids[b:, :p] = ids[:b, :p]
    lens = torch.randint(r // 2, r + 1, (2 * b,), generator=g)
    pos = torch.arange(t)
    att = (pos[None] < (p + lens)[:, None]).long()
    rm = (pos[None] >= p) & att.bool()
    ids, att, rm = ids.to(args.device), att.to(args.device), rm.to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    decoder = get_decoder(model)

    def forward():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=att, use_cache=False)

    def backbone():
        with torch.inference_mode():
            decoder(input_ids=ids, attention_mask=att, use_cache=False)

    def ches():
        ches_score(model, ids[:b], att[:b], rm[:b], ids[b:], att[b:], rm[b:])

    # interleaved (forward, backbone, ches, forward, ...) so load bursts hit all three alike
    times = time_interleaved({"forward": forward, "backbone": backbone, "ches": ches}, 1, args.repeats, sync)
    tf, tb, tc = (statistics.median(times[k]) for k in ("forward", "backbone", "ches"))
    tokens = int(att.sum())
    n_params = sum(x.numel() for x in model.parameters())
    print(
        f"model {n_params / 1e6:.1f}M params ({args.dtype}, {args.device}), {b} pairs = {2 * b} rows x {t} "
        f"positions ({tokens} real tokens), torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(", ".join(f"{k}: {v}" for k, v in machine_info(args.device).items()))
    print(f"bare forward (with lm_head): {tf * 1e3:8.1f} ms   {tokens / tf:10.0f} tok/s")
    print(f"backbone only              : {tb * 1e3:8.1f} ms   {tokens / tb:10.0f} tok/s")
    print(f"ches_score                 : {tc * 1e3:8.1f} ms   {tokens / tc:10.0f} tok/s")
    print(f"ratio ches / bare forward  : {tc / tf:.3f}  (target <= 1.2)")
    print(f"ratio ches / backbone only : {tc / tb:.3f}")


if __name__ == "__main__":
    main()
