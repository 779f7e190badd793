"""Experiment: drop the training pairs that in-run attribution says pushed the chosen responses down, vs
dropping by CHES (Razin et al. 2024, arXiv 2410.08847, Sec. 5) and at random; retrain from the same start.

Protocol (HH-RLHF harmless-base test pairs, MIT licence: ../shared/data/LICENSE-hh-rlhf; CPU-sized):
1. train pairs = rows [0, --train) of the HH file, eval pairs = rows [1000, 1000 + --eval) (disjoint);
2. run A: DPO with LoRA on the embedded SmolLM2-135M-Instruct, `--attribute-every 1 --attribute-pairs P`
   (the probe set: the first P eval pairs), evaluated at step 0 and at the end;
3. rank the train pairs by their total predicted effect on the probes' chosen log-probs
   (attribution_pairs.parquet, most negative first), by CHES (`run_ches`, highest first), and at random;
4. retrain from the same start (same seed, same --steps) on the train pairs minus the top --drop of each
   ranking;
5. per arm: the share of eval pairs whose chosen log-prob fell (final vs step 0) and the mean change, over
   all eval pairs and over the eval pairs outside the probe set.

    .venv/bin/python benchmarks/attribution_filtering.py --out /tmp/attr_exp
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

HH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl"


def _config(args, data: Path, eval_data: Path, out: Path, **kw):
    from preflens.training.config import TrainConfig

    return TrainConfig(
        data=str(data), eval_data=str(eval_data), output_dir=str(out), overwrite=True, steps=args.steps,
        batch_size=args.batch, lr=args.lr, lora_rank=args.lora, max_length=args.max_length,
        max_prompt_length=args.max_prompt_length, eval_every=0, save_every=0, save_total_limit=1,
        report_to="none", progress=False, seed=args.seed, pairs_train_subset=0, **kw,
    )  # fmt: skip


def _displacement(run: Path, probe_ids: set[int]) -> dict[str, float]:
    import pandas as pd

    df = pd.read_parquet(run / "pairs.parquet")
    ev = df[df["split"] == "eval"]
    first, last = ev["step"].min(), ev["step"].max()
    a = ev[ev["step"] == first].set_index("pair_id")["chosen"]
    b = ev[ev["step"] == last].set_index("pair_id")["chosen"]
    d = (b - a).dropna()
    rest = d[~d.index.isin(probe_ids)]
    return {
        "frac_chosen_fell": float((d < 0).mean()),
        "mean_chosen_change": float(d.mean()),
        "frac_chosen_fell_outside_probes": float((rest < 0).mean()),
        "mean_chosen_change_outside_probes": float(rest.mean()),
        "n_eval": len(d),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/attribution_filtering"))
    ap.add_argument("--train", type=int, default=48)
    ap.add_argument("--eval", type=int, default=32)
    ap.add_argument("--probe-pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--lora", type=int, default=8)
    ap.add_argument("--drop", type=float, default=0.25)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--max-prompt-length", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import pandas as pd
    import torch

    from preflens.diagnostics.ches_scan import run_ches
    from preflens.training.trainer import train

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = HH.read_text().splitlines()
    train_lines, eval_lines = lines[: args.train], lines[1000 : 1000 + args.eval]
    (args.out / "train.jsonl").write_text("\n".join(train_lines) + "\n")
    (args.out / "eval.jsonl").write_text("\n".join(eval_lines) + "\n")
    t0 = time.time()
    base = train(_config(args, args.out / "train.jsonl", args.out / "eval.jsonl", args.out / "run_all",
                         attribute_every=1, attribute_pairs=args.probe_pairs))  # fmt: skip
    t_base = time.time() - t0
    att = pd.read_parquet(base / "attribution_pairs.parquet")
    probe_ids = set(pd.read_parquet(base / "attribution.parquet")["probe_pair_id"].astype(int))
    ches = run_ches(model=None, data=args.out / "train.jsonl", output=args.out / "ches.parquet", overwrite=True,
                    max_length=args.max_length, max_prompt_length=args.max_prompt_length, progress=False)  # fmt: skip
    assert ches is not None
    scores = pd.read_parquet(args.out / "ches.parquet")
    k = round(args.drop * args.train)
    rankings = {
        "attribution": [int(i) for i in att.sort_values(["total_chosen", "pair_id"])["pair_id"]][:k],
        "ches": [int(i) for i in scores.sort_values(["ches", "pair_index"], ascending=[False, True])["pair_index"]][:k],
        "random": random.Random(args.seed).sample(range(args.train), k),
    }  # fmt: skip
    results = {"all": {**_displacement(base, probe_ids), "dropped": 0}}
    for name, drop in rankings.items():
        keep = [line for i, line in enumerate(train_lines) if i not in set(drop)]
        path = args.out / f"train_minus_{name}.jsonl"
        path.write_text("\n".join(keep) + "\n")
        run = train(_config(args, path, args.out / "eval.jsonl", args.out / f"run_minus_{name}"))
        results[name] = {**_displacement(run, probe_ids), "dropped": len(drop)}
    overlap = {
        "attribution_ches": len(set(rankings["attribution"]) & set(rankings["ches"])),
        "attribution_random": len(set(rankings["attribution"]) & set(rankings["random"])),
    }
    from preflens.diagnostics.attribution import concentration, rank_agreement

    both = att.join(scores.set_index("pair_index")[["ches"]], on="pair_id", how="inner")
    out = {
        "setting": {k_: str(v) for k_, v in vars(args).items()},
        "results": results,
        "top_overlap": overlap,
        "spearman_attribution_vs_ches": rank_agreement(list(-both["total_chosen"]), list(both["ches"])),
        "concentration": concentration(list(att["total_chosen"])),
        "frac_train_pairs_pushing_down": float((att["total_chosen"] < 0).mean()),
        "baseline_run_s": round(t_base, 1),
        "total_s": round(time.time() - t0, 1),
    }
    (args.out / "result.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
