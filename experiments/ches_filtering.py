"""Does dropping high-CHES pairs reduce likelihood displacement? (Razin et al. 2024, arXiv 2410.08847, Sec. 5)

Protocol (the paper's UltraFeedback experiment, shrunk to a CPU):
1. Data: the synthetic sentiment pairs of `preflens.data.synthetic` (a review opening; a positive chosen
   vs a negative rejected continuation), with `shared_tokens` cycling over 0..R-2 so some pairs are
   nearly identical and some share nothing.
2. Model: a small Llama (`preflens.models.tiny_model`) first finetuned with SFT on the chosen responses
   (the paper starts DPO from a post-SFT model), or `--embedded` for SmolLM2-135M-Instruct (slow on CPU).
3. Score every pair with CHES (raw or `--length-normalized`) and edit-distance similarity under that model.
4. Train DPO (full batch, RMSprop as in the paper's code, beta 0.1) from the same post-SFT start on
   (a) all pairs, (b) all minus the top `--drop` fraction by CHES, (c) minus as many random pairs,
   (d) minus the top fraction by edit-distance similarity (the baseline measure),
   and on each CHES quartile alone (the paper's percentile subsets: it finds the chosen log-prob change
   ordered by CHES percentile, and not by edit distance).
5. Report, over the pairs each run trained on, the share whose chosen log-prob fell and the mean change.

    .venv/bin/python experiments/ches_filtering.py
    .venv/bin/python experiments/ches_filtering.py --embedded --pairs 32 --steps 20 --lr 1e-6
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch


def load(args):
    from preflens.models import load_model, tiny_model

    if args.embedded:
        return load_model(None)
    return tiny_model(
        hidden_size=args.hidden, num_layers=2, seed=args.seed, intermediate_size=4 * args.hidden
    )


def make_rows(args) -> list[dict]:
    from preflens.data.synthetic import sentiment_pairs

    rows = []
    for i in range(args.pairs):
        shared = i % (args.response_length - 1)
        (row,) = sentiment_pairs(
            1, seed=args.seed * 100003 + i, shared_tokens=shared, response_length=args.response_length,
            shared_positions="random",
        )  # fmt: skip
        rows.append(row)
    return rows


def batch_of(tok, rows):
    """ARCHITECTURE.md's batch (chosen rows, then rejected rows) through preflens.data."""
    from preflens.data.collate import collate_pairs, tokenize_pairs
    from preflens.data.formats import load_pairs

    pairs, _ = load_pairs([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    items, _ = tokenize_pairs(pairs, tok)
    assert len(items) == len(rows)
    return collate_pairs(items, tok.pad_token_id)


def sft(model, tok, rows, *, steps: int, lr: float) -> None:
    """Cross-entropy on prompt -> chosen (the post-SFT start of the paper's experiments)."""
    from preflens.logprobs import sequence_logps

    b = batch_of(tok, rows)
    n = len(rows)
    ids, att, rm = b["input_ids"][:n], b["attention_mask"][:n], b["response_mask"][:n]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        out = sequence_logps(model, ids, att, rm)
        loss = -(out.logps / out.lengths).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def score(model, tok, rows):
    from preflens.commands.ches import edit_similarity
    from preflens.diagnostics.ches import ches_from_sums, response_hidden_sums

    b = batch_of(tok, rows)
    ids, att, rm = b["input_ids"], b["attention_mask"], b["response_mask"]
    sums, counts = response_hidden_sums(model, ids, att, rm)
    n = len(rows)
    raw = ches_from_sums(sums[:n], sums[n:], counts[:n], counts[n:], False)
    norm = ches_from_sums(sums[:n], sums[n:], counts[:n], counts[n:], True)
    edit = [edit_similarity(ids[i][rm[i]].tolist(), ids[n + i][rm[n + i]].tolist()) for i in range(n)]
    return raw, norm, torch.tensor(edit)


def train_dpo(model, tok, rows, *, steps: int, lr: float, beta: float):
    """Full-batch DPO (RMSprop) from the current weights; returns chosen and rejected log-prob change [B]."""
    from preflens.logprobs import pair_logps_from_batch, sequence_logps
    from preflens.losses import get_loss

    b = batch_of(tok, rows)
    ids, att, rm = b["input_ids"], b["attention_mask"], b["response_mask"]
    loss_fn = get_loss("dpo", beta=beta)
    n = len(rows)
    with torch.no_grad():
        ref = sequence_logps(model, ids, att, rm).logps
    opt = torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        pol = sequence_logps(model, ids, att, rm)
        loss = loss_fn(pair_logps_from_batch(pol, (ref[:n], ref[n:]))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = sequence_logps(model, ids, att, rm).logps
    return after[:n] - ref[:n], after[n:] - ref[n:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedded", action="store_true", help="SmolLM2-135M-Instruct instead of a tiny Llama")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--response-length", type=int, default=8)
    ap.add_argument("--sft-steps", type=int, default=100, help="0 for --embedded (already instruction-tuned)")
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--drop", type=float, default=0.25, help="fraction dropped by each filter")
    ap.add_argument("--length-normalized", action="store_true", help="rank by length-normalized CHES")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=None, help="write the results as JSON")
    args = ap.parse_args()

    t0 = time.time()
    torch.manual_seed(args.seed)
    model, tok = load(args)
    rows = make_rows(args)
    if args.sft_steps and not args.embedded:
        sft(model, tok, rows, steps=args.sft_steps, lr=args.sft_lr)
    model.eval()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    raw, norm, edit = score(model, tok, rows)
    ches = norm if args.length_normalized else raw
    n = len(rows)
    k = int(args.drop * n)
    by_ches = torch.argsort(ches, descending=True).tolist()
    by_edit = torch.argsort(edit, descending=True).tolist()
    rnd = random.Random(args.seed + 1).sample(range(n), n)
    q = n // 4
    subsets = {
        "all pairs": list(range(n)),
        f"minus top {args.drop:.0%} by CHES": sorted(by_ches[k:]),
        f"minus random {args.drop:.0%}": sorted(rnd[k:]),
        f"minus top {args.drop:.0%} by edit sim": sorted(by_edit[k:]),
        "CHES quartile 4 (top) only": sorted(by_ches[:q]),
        "CHES quartile 3 only": sorted(by_ches[q : 2 * q]),
        "CHES quartile 2 only": sorted(by_ches[2 * q : 3 * q]),
        "CHES quartile 1 (bottom) only": sorted(by_ches[3 * q :]),
    }
    shared = torch.tensor([float(r["shared_tokens"]) for r in rows])

    def rho(a: torch.Tensor, b: torch.Tensor) -> float:
        ranks = torch.stack([a.argsort().argsort().float(), b.argsort().argsort().float()])
        return float(torch.corrcoef(ranks)[0, 1])

    print(
        f"{n} pairs, {'embedded SmolLM2' if args.embedded else f'tiny Llama (hidden {args.hidden}), SFT {args.sft_steps} steps'}; "
        f"DPO {args.steps} full-batch RMSprop steps, lr {args.lr:g}, beta {args.beta:g}; "
        f"score: {'length-normalized ' if args.length_normalized else ''}CHES"
    )
    print(
        f"Spearman(CHES, shared tokens) = {rho(ches, shared):+.2f}; Spearman(CHES, edit sim) = {rho(ches, edit):+.2f}"
    )
    results = {}
    for name, idx in subsets.items():
        model.load_state_dict(start)
        dc, dr = train_dpo(model, tok, [rows[i] for i in idx], steps=args.steps, lr=args.lr, beta=args.beta)
        r = results[name] = {
            "pairs": len(idx),
            "frac_chosen_fell": float((dc < 0).float().mean()),
            "mean_chosen_change": float(dc.mean()),
            "mean_rejected_change": float(dr.mean()),
            "mean_score": float(ches[idx].mean()),
            "mean_edit_similarity": float(edit[idx].mean()),
        }
        print(
            f"{name:32s} pairs {r['pairs']:4d}  chosen fell {r['frac_chosen_fell']:5.0%}  "
            f"mean d chosen {r['mean_chosen_change']:+8.3f}  d rejected {r['mean_rejected_change']:+8.3f}  "
            f"(mean CHES {r['mean_score']:+.3g}, edit sim {r['mean_edit_similarity']:.2f})",
            flush=True,
        )
    # the baseline's version of the percentile experiment: edit-similarity quartiles
    for j, name in enumerate(["edit-sim quartile 4 (top) only", "edit-sim quartile 1 (bottom) only"]):
        idx = sorted(by_edit[:q] if j == 0 else by_edit[3 * q :])
        model.load_state_dict(start)
        dc, dr = train_dpo(model, tok, [rows[i] for i in idx], steps=args.steps, lr=args.lr, beta=args.beta)
        results[name] = {
            "pairs": len(idx),
            "frac_chosen_fell": float((dc < 0).float().mean()),
            "mean_chosen_change": float(dc.mean()),
        }
        print(
            f"{name:32s} pairs {len(idx):4d}  chosen fell {results[name]['frac_chosen_fell']:5.0%}  mean d chosen {float(dc.mean()):+8.3f}",
            flush=True,
        )
    model.load_state_dict(start)
    print(f"total {time.time() - t0:.0f} s")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
