"""Benchmark `sequence_gram` against one plain forward+backward and a per-sequence gradient loop.

DESIGN.md targets: gram time <= 1.5x one plain forward+backward over the same sequences; memory
without N copies of the parameters. The per-sequence loop (one backward per sequence, N flattened
gradients, G = stack stack^T) is what the papers' own analysis does.

Times: all methods in one process, interleaved (plain, gram, loop, plain, gram, loop, ...) so that
they see the same machine load; medians over --repeats after one warm-up. On CPU both wall time and
process CPU time are reported (on a shared machine the CPU time is the stable measure of work; one
thread by default). Memory: each method once more in its own child process (same seed, model and
batch), so the peak of one does not hide in another's: on CPU the child's peak RSS above its RSS
after the model and batch were built; on CUDA `torch.cuda.max_memory_allocated` above the same
baseline. The loop's Gram (in float64) is compared with `sequence_gram`'s (relative Frobenius
error), so a fast wrong answer cannot pass.

    python benchmarks/gram.py                                # CPU, a small Llama
    python benchmarks/gram.py --device cuda --config 1b --dtype bfloat16 --pairs 8 \
        --prompt-len 256 --response-len 256                  # the DESIGN.md H100 setting
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
from typing import Any

from common import sync_fn, time_interleaved_wall_cpu

CONFIGS: dict[str, dict[str, Any]] = {
    # CPU-sized: 4 layers, d=256, vocab 8k (about 10M parameters)
    "small": dict(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    ),
    # wider layers, so the vocabulary is a smaller share (about 21M parameters)
    "medium": dict(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    ),
    # the shape of Llama-3.2-1B (1.24B parameters, tied 128k embedding)
    "1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
}


def _build(args: argparse.Namespace):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    cfg = LlamaConfig(max_position_embeddings=args.prompt_len + args.response_len + 8, **CONFIGS[args.config])
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.eval()
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(r=args.lora, lora_alpha=2 * args.lora, target_modules="all-linear", lora_dropout=0.0),
        )
        model.eval()
    n = 2 * args.pairs
    t = args.prompt_len + args.response_len
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, cfg.vocab_size, (n, t), generator=g)
    att = torch.ones(n, t, dtype=torch.long)
    rm = torch.zeros(n, t, dtype=torch.bool)
    for s in range(n):  # ragged responses, right padding: lengths between 3/4 and all of the budget
        length = args.prompt_len + args.response_len - (s * args.response_len // (4 * n))
        att[s, length:] = 0
        ids[s, length:] = 0
        rm[s, args.prompt_len : length] = True
    dev = torch.device(args.device)
    return model, ids.to(dev), att.to(dev), rm.to(dev)


def _vm(field: str) -> float:
    """A /proc/self/status memory field in MiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _mem_reset(device: str) -> float:
    """Reset the peak counter and return the current usage (MiB)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM (peak RSS) to the current RSS
        f.write("5")
    return _vm("VmRSS")


def _mem_peak(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return _vm("VmHWM")


def _methods(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    import torch

    from preflens.grad import sequence_gram
    from preflens.logprobs import sequence_logps

    model, ids, att, rm = _build(args)
    params = [p for p in model.parameters() if p.requires_grad]

    def plain() -> None:
        for p in params:
            p.grad = None
        sequence_logps(model, ids, att, rm).logps.sum().backward()
        for p in params:
            p.grad = None

    def gram() -> Any:
        return sequence_gram(model, ids, att, rm)

    def loop() -> Any:
        rows = []
        for s in range(ids.shape[0]):
            lp = sequence_logps(model, ids[s : s + 1], att[s : s + 1], rm[s : s + 1]).logps.sum()
            gs = torch.autograd.grad(lp, params, allow_unused=True)
            rows.append(
                torch.cat(
                    [(x if x is not None else torch.zeros_like(p)).reshape(-1) for x, p in zip(gs, params)]
                )
            )
        g = torch.stack(rows)  # N copies of the gradient, in the model's dtype
        out = torch.zeros(g.shape[0], g.shape[0], dtype=torch.float64, device=g.device)
        step = 1 << 24
        for c in range(0, g.shape[1], step):
            blk = g[:, c : c + step].double()
            out += blk @ blk.T
        return out

    fns = {"plain": plain, "gram": gram}
    if not args.skip_loop:
        fns["loop"] = loop
    return fns, model


def _child(method: str, args: argparse.Namespace, q: Any) -> None:
    import torch

    torch.set_num_threads(args.threads)
    fns, _ = _methods(args)
    sync = sync_fn(args.device)
    sync()
    base = _mem_reset(args.device)
    fns[method]()
    sync()
    q.put(_mem_peak(args.device) - base)


def peak_memory(method: str, args: argparse.Namespace) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(method, args, q))
    p.start()
    res = q.get()
    p.join()
    return res


def timings(args: argparse.Namespace) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    import torch

    torch.set_num_threads(args.threads)
    fns, _ = _methods(args)
    results = {m: f() for m, f in fns.items()}  # warm-up, and the Grams to compare
    wall, cpu = time_interleaved_wall_cpu(fns, warmup=0, repeats=args.repeats, sync=sync_fn(args.device))
    out = {m: {"wall": statistics.median(wall[m]), "cpu": statistics.median(cpu[m])} for m in fns}
    return out, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--pairs", type=int, default=4, help="B pairs = 2B sequences")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank on all linear layers (0: full finetuning)")
    ap.add_argument(
        "--skip-loop", action="store_true", help="skip the per-sequence loop (it needs N gradient copies)"
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    t, results = timings(args)
    mem = {m: peak_memory(m, args) for m in t}
    key = "cpu" if args.device == "cpu" else "wall"
    out: dict[str, Any] = {
        "setting": vars(args),
        "torch": torch.__version__,
        "sequences": 2 * args.pairs,
        "times_s": t,
        "gram_over_plain": t["gram"][key] / t["plain"][key],
        "gram_over_plain_wall": t["gram"]["wall"] / t["plain"]["wall"],
        "peak_extra_mib": mem,
    }
    if "loop" in t:
        g = results["gram"].double().cpu()
        ref = results["loop"].double().cpu()
        out["loop_over_gram"] = t["loop"][key] / t["gram"][key]
        out["gram_rel_err_vs_loop"] = float((g - ref).norm() / ref.norm())
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(
        f"device={args.device} config={args.config} dtype={args.dtype} lora={args.lora or 'off'} "
        f"sequences={2 * args.pairs} tokens/seq<={args.prompt_len + args.response_len} threads={args.threads}"
    )
    print(f"{'method':<26}{'wall s':>10}{'cpu s':>10}{'peak extra MiB':>16}")
    names = {"plain": "plain forward+backward", "gram": "sequence_gram", "loop": "per-sequence loop"}
    for m in t:
        print(f"{names[m]:<26}{t[m]['wall']:>10.4f}{t[m]['cpu']:>10.4f}{mem[m]:>16.1f}")
    print(f"gram / plain fwd+bwd      = {out['gram_over_plain']:.2f} ({key} time; target <= 1.5)")
    if "loop" in t:
        print(f"loop / gram               = {out['loop_over_gram']:.2f} ({key} time)")
        print(f"gram vs loop rel. error   = {out['gram_rel_err_vs_loop']:.2e}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
