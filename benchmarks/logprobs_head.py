"""The unembedding + log-softmax at response positions: preflens's path vs alternatives, forward+backward.

This is the part of a DPO step that depends on the vocabulary (SmolLM2: 49k x 576, about a fifth of the
model's FLOPs per response token). M response-predicting hidden states [M, d] -> log p(target) [M] and
the gradients to the hidden states and the unembedding weight, timed interleaved (medians):

  preflens      preflens.logprobs._selected_logps: row chunks, each recomputed in the backward through
                torch.utils.checkpoint (the full-vocabulary fp32 log-softmax never exists for all rows)
  no-recompute  the same chunk function without checkpointing (stores [M, V] fp32 logits)
  full          log_softmax(h W^T)[targets]: what a plain implementation does at these positions
  fused         a candidate custom autograd.Function (below): chunked forward keeping only the logsumexp,
                backward recomputes each chunk's logits once and writes d/dz = g (onehot - softmax) in
                place: same memory as `preflens`, no autograd graph over [chunk, V] tensors
  trl-cpu       TRL 1.16's ChunkedLogProbFunction with the outputs DPOTrainer asks for (log_probs, entropy,
                mean_logits, is_top1), as it runs on a CPU (torch tiles; on CUDA it uses Triton)

    .venv/bin/python benchmarks/logprobs_head.py                  # SmolLM2 shapes, 512 rows
    .venv/bin/python benchmarks/logprobs_head.py --rows 2048 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import format_table, machine_info, peak_memory, sync_fn, time_interleaved  # noqa: E402


class FusedSelectedLogps(torch.autograd.Function):
    """log softmax(h W^T)[targets] over row chunks; the backward recomputes each chunk's logits once.

    d log p_t / d z_j = 1[j = t] - softmax(z)_j, so with upstream g: dz = g (onehot - p), computed in
    place in the recomputed chunk; dh = dz W, dW += dz^T h.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int) -> Tensor:  # type: ignore[override]
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.empty_like(out)
        for s in range(0, h.shape[0], chunk_rows):
            z = (h[s : s + chunk_rows] @ weight.t()).float()
            lse[s : s + chunk_rows] = torch.logsumexp(z, -1)
            out[s : s + chunk_rows] = z.gather(-1, targets[s : s + chunk_rows, None]).squeeze(-1)
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk_rows = chunk_rows
        return out - lse

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        h, weight, targets, lse = ctx.saved_tensors
        cr = ctx.chunk_rows
        gh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        gw = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], cr):
            hc, gc = h[s : s + cr], g[s : s + cr, None].float()
            p = (hc @ weight.t()).float().sub_(lse[s : s + cr, None]).exp_()
            dz = p.mul_(-gc).scatter_add_(-1, targets[s : s + cr, None], gc).to(h.dtype)
            if gh is not None:
                gh[s : s + cr] = dz @ weight
            if gw is not None:
                gw.addmm_(dz.t().float(), hc.float())
        return gh, None if gw is None else gw.to(weight.dtype), None, None


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=512, help="response-predicting positions in the batch")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    from preflens.logprobs import _chunk_logps, _selected_logps

    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False).to(dev, dtype)
    h = (torch.randn(args.rows, args.hidden) * 3).to(dev, dtype).requires_grad_(True)
    targets = torch.randint(0, args.vocab, (args.rows,), device=dev)
    g = torch.randn(args.rows, device=dev)

    def run(fn):
        def go():
            h.grad = None
            head.weight.grad = None
            (fn() * g).sum().backward()

        return go

    contenders = {
        "preflens": run(lambda: _selected_logps(head, h, targets, args.chunk_rows)),
        "no-recompute": run(lambda: _chunk_logps(head, h, targets)),
        "full": run(
            lambda: (
                torch.log_softmax((h @ head.weight.t()).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
            )
        ),
        "fused": run(lambda: FusedSelectedLogps.apply(h, head.weight, targets, args.chunk_rows)),
    }
    try:
        from trl.kernels import ChunkedLogProbFunction

        outs = ("log_probs", "entropy", "mean_logits", "is_top1")
        contenders["trl-cpu"] = run(
            lambda: ChunkedLogProbFunction.apply(h, head.weight, None, targets, 1.0, 32768, None, 1.0, outs)[
                0
            ]
        )
    except ImportError:
        pass

    # correctness of the candidate against the plain formula (gradients included)
    grads = {}
    for name in ("full", "fused"):
        contenders[name]()
        grads[name] = (h.grad.float().clone(), head.weight.grad.float().clone())
    for a, b in zip(grads["full"], grads["fused"]):
        err = float((a - b).abs().max() / a.abs().max())
        assert err < (1e-4 if dtype == torch.float32 else 2e-2), f"fused gradient off by {err}"

    sync = sync_fn(args.device)
    times = time_interleaved(contenders, warmup=1, repeats=args.repeats, sync=sync)
    base = statistics.median(times["preflens"])
    rows = []
    for name, fn in contenders.items():
        mem, _ = peak_memory(fn, args.device)
        t = statistics.median(times[name])
        rows.append(
            {"path": name, "fwd+bwd s": t, "vs preflens": base / t, "peak MB": mem.delta_bytes / 2**20}
        )
    print("[head] " + ", ".join(f"{k} {v}" for k, v in machine_info(args.device).items()))
    print(f"[head] rows {args.rows}, vocab {args.vocab}, hidden {args.hidden}, {args.dtype}, {args.device}")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
