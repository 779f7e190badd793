"""Synchronized chosen/rejected movement under margin-based losses, and its absence under sppo/normalized.

Yuan et al. 2024 ("A Common Pitfall of Margin-based Language Model Alignment: Gradient
Entanglement", arXiv 2410.13828), Fig. 1 and Sec. 3-5: under a margin-based loss (DPO, IPO, SimPO,
SLiC, R-DPO, ...) the chosen and rejected log-probs move *together* (usually both down), because
the loss only constrains their difference and their gradients are entangled (<g_w, g_l> large);
SPPO gives each its own target, and normalized preference optimization (Sec. 5) rescales each
pair's gradients so that, to first order, chosen rises and rejected falls.

Set-up (a CPU-sized version of the paper's synthetic sentiment task): a 2-layer Llama (hidden 64,
`preflens.models.tiny_model`) first trained by SFT on prompt + chosen *and* prompt + rejected (so
both responses start likely, as after SFT on a mixed corpus), then `preflens.compare.run_compare`
trains it once per loss on the same 48 sentiment pairs (`synthetic.sentiment_pairs`, responses of
6 words sharing a 2-word prefix), same seed, AdamW lr 2e-3, batch 8, 60 steps, each loss with its own
default hyper-parameters, probes every 20 steps. The table is the mean change of the summed chosen
and rejected log-probs of the 16 eval pairs from step 0 to the end, whether they moved the same way,
the share of eval pairs whose chosen log-prob fell, and the probes' gradient cosine and condition-1
violations. Each run's report and the comparison page are written under --output-dir.

Run: `.venv/bin/python experiments/synchronized_movement.py` (CPU, a few minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from preflens.compare import run_compare, summarize_run
from preflens.data import synthetic

LOSSES = "dpo,ipo,simpo,cpo,slic,rrhf,dpop,rdpo,sppo,normalized"


def sft_model(train_rows: list[dict], steps: int, seed: int, out: Path) -> Path:
    """SFT a tiny Llama on every response of the training pairs and save it (the common start)."""
    from preflens.data.collate import collate_pairs, tokenize_pairs
    from preflens.data.formats import load_pairs
    from preflens.logprobs import sequence_logps
    from preflens.models import tiny_model

    model, tok = tiny_model(hidden_size=64, seed=seed)
    pairs, _ = load_pairs(train_rows)
    items, _ = tokenize_pairs(pairs, tok, max_length=None, max_prompt_length=None)
    batch = collate_pairs(items, tok.pad_token_id)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        lp = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        (-(lp.logps / lp.lengths).mean()).backward()
        opt.step()
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--losses", default=LOSSES)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--sft-steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--output-dir", default=None, help="where the runs go (default: a temporary directory)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny matrices: extra threads only spin-wait on a shared CPU
    t0 = time.time()

    work = Path(args.output_dir or tempfile.mkdtemp(prefix="preflens-sync-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = synthetic.sentiment_pairs(64, seed=0, shared_tokens=2, response_length=6)
    train_rows, eval_rows = rows[:48], rows[48:]
    for name, rs in (("train.jsonl", train_rows), ("eval.jsonl", eval_rows)):
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in rs))
    start = sft_model(train_rows, args.sft_steps, seed=0, out=work / "sft-model")

    losses = [x for x in args.losses.split(",") if x]
    page = run_compare(
        losses,
        str(work / "train.jsonl"),
        work / "runs",
        model=str(start),
        eval_data=str(work / "eval.jsonl"),
        steps=args.steps,
        batch_size=8,
        lr=args.lr,
        eval_every=10,
        probe_every=20,
        probe_pairs=8,
        report_to="none",
        save_every=0,
        progress=False,
        seed=0,
    )
    print(
        f"tiny Llama (hidden 64) after {args.sft_steps} SFT steps on both responses; {args.steps} steps per "
        f"loss, AdamW lr {args.lr}, batch 8; 16 eval pairs"
    )
    print(
        "| loss | Δ chosen | Δ rejected | moved together? | eval pairs whose chosen fell | grad cosine | cond. 1 violated |"
    )
    print("|" + "---|" * 7)
    for name in losses:
        s = summarize_run(name, work / "runs" / name)
        pr = pd.read_parquet(work / "runs" / name / "probes.parquet")
        together = (
            "yes, both fell"
            if s.chosen_change < 0 and s.rejected_change < 0
            else ("yes, both rose" if s.chosen_change > 0 and s.rejected_change > 0 else "no")
        )
        cos = float(pr["cosine"].mean())
        c1 = float(pr["cond1_violated"].astype(float).mean())
        print(
            f"| {name} | {s.chosen_change:+.2f} | {s.rejected_change:+.2f} | {together} | "
            f"{100 * s.frac_chosen_fell:.0f}% | {cos:.2f} | {100 * c1:.0f}% |"
            if not math.isnan(s.chosen_change)
            else f"| {name} | – | – | – | – | – | – |"
        )
    print(f"\ncomparison: {page}\nwall time {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
