"""The papers' claims on real preference data: HH-RLHF harmless-base test pairs, embedded SmolLM2-135M-Instruct.

Data: Anthropic's HH-RLHF harmless-base test split (MIT licence: ../shared/data/LICENSE-hh-rlhf), the
single-turn pairs (`demo_search.single_turn`) whose prompt + reply is at most `--max-tokens` tokens for both
replies, in file order. Every training run is `preflens.train` (DPO and relatives, LoRA, AdamW, constant lr,
seed 0); per-pair chosen/rejected changes are read back from each run directory's pairs.parquet
(`preflens.diagnostics.displacement.chosen_change_table`, "fell" = by more than the run's tolerance).

--part a  Razin et al. 2024 (arXiv 2410.08847, Sec. 5, the CHES percentile experiment): CHES (`run_ches`) of
          the first --pairs pairs at the start model; DPO on each CHES quartile alone (lowest to highest) from
          the same start; per subset, the mean chosen log-prob change of the pairs trained on and the share
          whose chosen fell; the same with edit-distance-similarity quartiles (the paper's baseline).
--part b  Yuan et al. 2024 (arXiv 2410.13828, Fig. 1): chosen and rejected log-prob trajectories of the
          training pairs over steps, per loss (--losses, each with its own default hyper-parameters); a
          table at a few steps and a PNG (--figure).
--part c  CHES filtering vs random filtering of the same share (Razin et al. 2024, Sec. 5): train on all
          --train-pairs pairs, on them minus the top --drop by CHES, and minus --drop at random
          (--random-seeds seeds; the training seed stays 0, so only the dropped pairs differ); the share
          of held-out eval pairs whose chosen fell and the mean change per arm.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/hh_claims.py --part a --out /tmp/hh_claims
    OMP_NUM_THREADS=1 .venv/bin/python experiments/hh_claims.py --part b --out /tmp/hh_claims \
        --figure experiments/figures/hh_trajectories.png
    OMP_NUM_THREADS=1 .venv/bin/python experiments/hh_claims.py --part c --out /tmp/hh_claims
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_search import HH, single_turn  # noqa: E402

LOSSES = "dpo,ipo,simpo,slic,sppo,cal_dpo,dpo_shift"


def short_pairs(n: int, max_tokens: int) -> list[dict]:
    """The first n single-turn HH pairs whose prompt + chosen and prompt + rejected both fit max_tokens
    (tokenizer of the embedded model, no special tokens), so a CPU can train on them."""
    from transformers import AutoTokenizer

    from preflens.models import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    out = []
    for r in single_turn(HH, max_words=40, max_prompt_words=40):
        lens = [
            len(tok(r["prompt"] + r[k], add_special_tokens=False).input_ids) for k in ("chosen", "rejected")
        ]
        if max(lens) <= max_tokens:
            out.append(r)
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} HH pairs fit {max_tokens} tokens; lower --pairs or raise --max-tokens")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_run(args, out: Path, data: Path, eval_data: Path, *, loss: str = "dpo", **kw: Any) -> Path:
    """One `preflens.train` run; kw overrides (eval_every, pairs_train_subset, steps)."""
    from preflens.train import TrainConfig, train

    opts: dict[str, Any] = {
        "model": None, "data": str(data), "eval_data": str(eval_data), "loss": loss, "output_dir": str(out),
        "overwrite": True, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "lora_rank": args.lora_rank, "eval_every": 0, "max_length": args.max_tokens + 8,
        "max_prompt_length": args.max_tokens, "save_every": 0, "save_total_limit": 1, "report_to": "none",
        "progress": False, "seed": 0, "scheduler": "constant", "pairs_train_subset": 0,
    }  # fmt: skip
    opts.update(kw)
    if args.reuse and (out / "pairs.parquet").is_file():
        print(f"  reusing {out.name}", flush=True)
        return out
    t = time.time()
    run = train(TrainConfig(**opts))
    print(f"  trained {out.name} ({loss}, {opts['steps']} steps) in {time.time() - t:.0f} s", flush=True)
    return run


def ches_scores(args, data: Path, out: Path):
    """CHES and edit-distance similarity of every pair of `data` at the start model (`run_ches`)."""
    import pandas as pd

    from preflens.diagnostics.ches_scan import run_ches

    if not (args.reuse and out.is_file()):
        run_ches(model=None, data=data, output=out, overwrite=True, max_length=args.max_tokens + 8,
                 max_prompt_length=args.max_tokens, progress=False)  # fmt: skip
    return pd.read_parquet(out).set_index("pair_index").sort_index()


def change(run: Path, split: str):
    from preflens.diagnostics.displacement import chosen_change_table

    return chosen_change_table(run, split).set_index("pair_id")


def spearman(a, b) -> float:
    return float(a.rank().corr(b.rank()))


def part_a(args, rows: list[dict], work: Path) -> dict:
    """Each CHES (and edit-similarity) quartile trained alone; changes of the pairs trained on."""
    import pandas as pd

    rows = rows[: args.pairs]
    pool = write_jsonl(work / "a_pool.jsonl", rows)
    sc = ches_scores(args, pool, work / "a_ches.parquet")
    n, q = len(sc), len(sc) // 4
    print(
        f"{n} pairs scored; Spearman(CHES, edit similarity) = {spearman(sc['score'], sc['edit_similarity']):+.2f}"
    )
    results, per_pair = [], []
    for measure, col in (("CHES", "score"), ("edit similarity", "edit_similarity")):
        order = sc.sort_values([col], kind="stable").index.tolist()  # lowest first
        for j in range(4):
            idx = order[j * q : (j + 1) * q]
            sub = write_jsonl(work / f"a_{col}_q{j + 1}.jsonl", [rows[i] for i in idx])
            run = train_run(args, work / f"a_{col}_q{j + 1}", sub, sub)
            t = change(run, "eval")  # eval data = the subset itself: the pairs trained on
            t.index = [idx[i] for i in t.index]
            results.append({
                "measure": measure, "quartile": j + 1, "pairs": len(t),
                "mean_ches": float(sc.loc[idx, "score"].mean()),
                "mean_edit_similarity": float(sc.loc[idx, "edit_similarity"].mean()),
                "mean_chosen_change": float(t["chosen_change"].mean()),
                "mean_rejected_change": float(t["rejected_change"].mean()),
                "frac_chosen_fell": float(t["chosen_fell"].mean()),
                "mean_chosen_tokens": float(sc.loc[idx, "chosen_len"].mean()),
                "mean_rejected_tokens": float(sc.loc[idx, "rejected_len"].mean()),
                "mean_chosen_change_per_token": float((t["chosen_change"] / sc.loc[t.index, "chosen_len"]).mean()),
            })  # fmt: skip
            if measure == "CHES":
                per_pair.append(t.join(sc[["score", "chosen_len"]]))
    pp = pd.concat(per_pair)
    per_tok = pp["chosen_change"] / pp["chosen_len"]
    rhos = {
        "ches_vs_chosen_change": spearman(pp["score"], pp["chosen_change"]),
        "ches_vs_chosen_change_per_token": spearman(pp["score"], per_tok),
        "chosen_tokens_vs_chosen_change": spearman(pp["chosen_len"], pp["chosen_change"]),
        "ches_vs_chosen_tokens": spearman(pp["score"], pp["chosen_len"]),
    }
    print(
        "\n| subset | pairs | mean CHES | mean edit sim | chosen / rejected tokens | mean Δ chosen | "
        "Δ chosen per token | mean Δ rejected | chosen fell |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        label = f"{r['measure']} Q{r['quartile']}" + {1: " (lowest)", 4: " (highest)"}.get(r["quartile"], "")
        print(
            f"| {label} | {r['pairs']} | {r['mean_ches']:+.3g} | {r['mean_edit_similarity']:.2f} | "
            f"{r['mean_chosen_tokens']:.1f} / {r['mean_rejected_tokens']:.1f} | {r['mean_chosen_change']:+.2f} | "
            f"{r['mean_chosen_change_per_token']:+.3f} | {r['mean_rejected_change']:+.2f} | {r['frac_chosen_fell']:.0%} |"
        )
    print(
        f"\nacross the four CHES-quartile runs (n = {len(pp)} pairs), Spearman: CHES vs chosen change "
        f"{rhos['ches_vs_chosen_change']:+.2f}; CHES vs chosen change per chosen token "
        f"{rhos['ches_vs_chosen_change_per_token']:+.2f}; chosen tokens vs chosen change "
        f"{rhos['chosen_tokens_vs_chosen_change']:+.2f}; CHES vs chosen tokens {rhos['ches_vs_chosen_tokens']:+.2f}"
    )
    return {"quartiles": results, "spearman": rhos}


def part_b(args, rows: list[dict], work: Path) -> dict:
    """Chosen/rejected trajectories of the training pairs, per loss."""
    import pandas as pd

    tr = write_jsonl(work / "b_train.jsonl", rows[: args.train_pairs])
    ev = write_jsonl(work / "b_eval.jsonl", rows[args.train_pairs : args.train_pairs + 2])
    traj: dict[str, pd.DataFrame] = {}
    for loss in args.losses.split(","):
        run = train_run(args, work / f"b_{loss}", tr, ev, loss=loss, eval_every=args.eval_every,
                        pairs_train_subset=args.train_pairs)  # fmt: skip
        p = pd.read_parquet(run / "pairs.parquet")
        p = p[p["split"] == "train"].sort_values(["pair_id", "step"])
        p = p.assign(
            dc=p["chosen"] - p.groupby("pair_id")["chosen"].transform("first"),
            dr=p["rejected"] - p.groupby("pair_id")["rejected"].transform("first"),
        )
        traj[loss] = p.groupby("step")[["dc", "dr"]].mean()
    steps = list(next(iter(traj.values())).index)
    show = [s for s in steps if s > 0]
    print(
        "\n| loss | "
        + " | ".join(f"step {s}: Δ chosen / Δ rejected" for s in show)
        + " | moved together at end? |"
    )
    print("|---|" + "---|" * (len(show) + 1))
    out = {}
    for loss, t in traj.items():
        dc, dr = float(t["dc"].iloc[-1]), float(t["dr"].iloc[-1])
        together = "both fell" if dc < 0 and dr < 0 else ("both rose" if dc > 0 and dr > 0 else "no")
        cells = " | ".join(f"{t.loc[s, 'dc']:+.2f} / {t.loc[s, 'dr']:+.2f}" for s in show)
        print(f"| {loss} | {cells} | {together} |")
        out[loss] = {
            "steps": [int(s) for s in t.index],
            "chosen": t["dc"].tolist(),
            "rejected": t["dr"].tolist(),
        }
    if args.figure:
        plot(traj, Path(args.figure), args)
    return out


def plot(traj: dict, path: Path, args) -> None:
    """One small panel per loss, chosen and rejected mean change (Yuan et al. 2024's Fig. 1 layout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(traj)
    cols = min(4, k)
    rows_ = (k + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(3.0 * cols, 2.4 * rows_), sharex=True, squeeze=False)
    for ax, (loss, t) in zip(axes.flat, traj.items()):
        ax.plot(t.index, t["dc"], "o-", color="tab:green", label="chosen", ms=3)
        ax.plot(t.index, t["dr"], "s-", color="tab:red", label="rejected", ms=3)
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_title(loss, fontsize=10)
        ax.tick_params(labelsize=8)
    for ax in axes.flat[k:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("mean Δ log-prob (nats)", fontsize=8)
    fig.suptitle(
        f"HH-RLHF harmless-base, {args.train_pairs} train pairs, SmolLM2-135M LoRA r{args.lora_rank}, "
        f"lr {args.lr:g}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    print(f"figure: {path} ({path.stat().st_size // 1024} KB)")


def part_c(args, rows: list[dict], work: Path) -> dict:
    """All pairs vs minus the top --drop by CHES vs minus --drop at random (several seeds)."""
    train_rows = rows[: args.train_pairs]
    eval_rows = rows[args.train_pairs : args.train_pairs + args.eval_pairs]
    tr = write_jsonl(work / "c_train.jsonl", train_rows)
    ev = write_jsonl(work / "c_eval.jsonl", eval_rows)
    sc = ches_scores(args, tr, work / "c_ches.parquet")
    n = len(train_rows)
    k = round(args.drop * n)
    top = sc.sort_values(["score"], ascending=False, kind="stable").index[:k].tolist()
    arms: dict[str, list[int]] = {"all pairs": [], f"minus top {args.drop:.0%} by CHES": top}
    for s in range(args.random_seeds):
        arms[f"minus random {args.drop:.0%} (seed {s})"] = random.Random(s).sample(range(n), k)
    res = {}
    for name, drop in arms.items():
        keep = [r for i, r in enumerate(train_rows) if i not in set(drop)]
        slug = "c_" + "".join(ch if ch.isalnum() else "_" for ch in name)
        data = write_jsonl(work / f"{slug}.jsonl", keep)
        t = change(train_run(args, work / slug, data, ev), "eval")
        res[name] = {
            "train_pairs": len(keep), "dropped": len(drop),
            "overlap_with_ches_top": len(set(drop) & set(top)),
            "mean_ches_dropped": float(sc.loc[drop, "score"].mean()) if drop else None,
            "frac_chosen_fell": float(t["chosen_fell"].mean()), "n_eval": len(t),
            "mean_chosen_change": float(t["chosen_change"].mean()),
            "mean_rejected_change": float(t["rejected_change"].mean()),
        }  # fmt: skip
    print(
        "\n| arm | train pairs | mean CHES of dropped | eval pairs whose chosen fell | mean Δ chosen | mean Δ rejected |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in res.items():
        mc = "–" if r["mean_ches_dropped"] is None else f"{r['mean_ches_dropped']:+.1f}"
        print(
            f"| {name} | {r['train_pairs']} | {mc} | {r['frac_chosen_fell']:.0%} "
            f"({round(r['frac_chosen_fell'] * r['n_eval'])}/{r['n_eval']}) | {r['mean_chosen_change']:+.3f} | "
            f"{r['mean_rejected_change']:+.3f} |"
        )
    rnd = [r for name, r in res.items() if name.startswith("minus random")]
    if rnd:
        import statistics

        f = [r["frac_chosen_fell"] for r in rnd]
        m = [r["mean_chosen_change"] for r in rnd]
        print(
            f"\nrandom arms over {len(rnd)} seeds: chosen fell {min(f):.0%}-{max(f):.0%} (mean {statistics.mean(f):.0%}), "
            f"mean Δ chosen {min(m):+.3f} to {max(m):+.3f} (mean {statistics.mean(m):+.3f})"
        )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", required=True, choices=["a", "b", "c"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/hh_claims"))
    ap.add_argument("--max-tokens", type=int, default=64, help="longest prompt + reply (tokens)")
    ap.add_argument("--pairs", type=int, default=64, help="part a: pairs scored and split into quartiles")
    ap.add_argument("--train-pairs", type=int, default=32, help="parts b, c: training pairs")
    ap.add_argument("--eval-pairs", type=int, default=16, help="part c: held-out eval pairs")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lora-rank", type=int, default=8, help="0: full finetuning")
    ap.add_argument("--eval-every", type=int, default=4, help="part b: trajectory points")
    ap.add_argument("--losses", default=LOSSES, help="part b")
    ap.add_argument("--figure", default=None, help="part b: PNG path")
    ap.add_argument("--drop", type=float, default=0.25, help="part c: share dropped")
    ap.add_argument("--random-seeds", type=int, default=3, help="part c")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--reuse", action="store_true", help="keep finished runs and scores under --out (re-read only)"
    )
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    work = args.out / f"part_{args.part}"
    work.mkdir(parents=True, exist_ok=True)
    need = {"a": args.pairs, "b": args.train_pairs + 2, "c": args.train_pairs + args.eval_pairs}[args.part]
    rows = short_pairs(need, args.max_tokens)
    print(
        f"part {args.part}: {len(rows)} single-turn HH-RLHF harmless-base test pairs (prompt + reply <= "
        f"{args.max_tokens} tokens); SmolLM2-135M-Instruct, {f'LoRA r{args.lora_rank}' if args.lora_rank else 'full finetuning'}, "
        f"AdamW lr {args.lr:g} constant, batch {args.batch_size}, {args.steps} steps, seed 0",
        flush=True,
    )
    res = {"a": part_a, "b": part_b, "c": part_c}[args.part](args, rows, work)
    total = time.time() - t0
    print(f"\npart {args.part} total {total / 60:.1f} min")
    (work / "result.json").write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "result": res, "total_s": total}, indent=2
        )
    )


if __name__ == "__main__":
    main()
