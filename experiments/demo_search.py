"""Search for the demo's setting: where does DPO displace the chosen likelihood on the embedded model?

Data candidates (HH-RLHF harmless-base test, single-turn prompts, MIT licence: ../shared/data/LICENSE-hh-rlhf):
- `hh`: the pairs' own short chosen/rejected responses;
- `repeat`: the pair's chosen response, and as rejected the same response said twice (a degenerate,
  repetitive answer): every rejected token is a chosen token (shared tokens, Yuan et al. 2024, arXiv
  2410.13828, Sec. 4; similar hidden embeddings, high CHES, Razin et al. 2024, Sec. 5);
- `onpolicy`: two responses sampled from the embedded model itself for each prompt (so the model is
  already confident in both, Razin et al. 2024, arXiv 2410.08847, Sec. 1 and 6), ordered by length
  (chosen = the shorter) so the label is a fixed rule.
Each setting trains `dpo` and a mitigation from the same start with `preflens.train` and prints the
share of eval pairs whose chosen log-prob fell by more than the noise tolerance.

    .venv/bin/python experiments/demo_search.py --data onpolicy --lr 1e-5 --steps 16 --out /tmp/search
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl"


def single_turn(path: Path, max_words: int = 30, max_prompt_words: int = 1000) -> list[dict]:
    out = []
    for line in path.open():
        row = json.loads(line)
        c, r = row["chosen"], row["rejected"]
        k = c.rfind("\n\nAssistant:") + len("\n\nAssistant:")
        p = c[:k]
        if not r.startswith(p) or p.count("Human:") != 1 or len(p.split()) > max_prompt_words:
            continue
        ch, rj = c[k:], r[k:]
        if ch.strip() == rj.strip() or not (
            3 <= len(ch.split()) <= max_words and 3 <= len(rj.split()) <= max_words
        ):
            continue
        out.append({"prompt": p, "chosen": ch, "rejected": rj})
    return out


def sample_pairs(rows: list[dict], n: int, max_new: int, temperature: float, seed: int) -> list[dict]:
    import torch

    from preflens.models import load_model

    model, tok = load_model(None)
    model.eval()
    torch.manual_seed(seed)
    out = []
    for row in rows[:n]:
        ids = tok(row["prompt"], return_tensors="pt").input_ids
        with torch.no_grad():
            g = model.generate(
                ids.repeat(2, 1),
                do_sample=True,
                temperature=temperature,
                max_new_tokens=max_new,
                pad_token_id=tok.eos_token_id,
            )
        texts = [tok.decode(s[ids.shape[1] :], skip_special_tokens=True).split("\n\nHuman")[0] for s in g]
        texts = [t.split("\n")[0].rstrip() for t in texts]
        if not all(t.strip() for t in texts) or texts[0] == texts[1]:
            continue
        a, b = sorted(texts, key=len)
        out.append({"prompt": row["prompt"], "chosen": a, "rejected": b})
    return out


def frac_fell(run: Path, tol: float) -> tuple[float, float, float]:
    import pandas as pd

    p = pd.read_parquet(run / "pairs.parquet")
    p = p[p["split"] == "eval"].sort_values(["pair_id", "step"])
    first = p.groupby("pair_id").first()
    last = p.groupby("pair_id").last()
    dc = last["chosen"] - first["chosen"]
    dr = last["rejected"] - first["rejected"]
    return float((dc < -tol).mean()), float(dc.mean()), float(dr.mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="onpolicy", choices=["hh", "repeat", "onpolicy"])
    ap.add_argument("--max-words", type=int, default=30)
    ap.add_argument("--max-prompt-words", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--n-train", type=int, default=24)
    ap.add_argument("--n-eval", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--lora-rank", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--losses", default="dpo,rpo")
    ap.add_argument("--out", default="/tmp/demo_search")
    ap.add_argument("--pairs-file", default=None, help="reuse a written pairs file")
    a = ap.parse_args()

    from preflens.diagnostics.displacement import fell_tolerance
    from preflens.train import TrainConfig, train

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if a.pairs_file:
        rows = [json.loads(x) for x in open(a.pairs_file)]
    else:
        base = single_turn(HH, a.max_words, a.max_prompt_words)
        need = a.n_train + a.n_eval
        if a.data == "onpolicy":
            rows = sample_pairs(base, need + 8, a.max_new, a.temperature, 0)[:need]
        else:
            rows = base[:need]
        if a.data == "repeat":
            rows = [{**r, "rejected": r["chosen"] + r["chosen"]} for r in rows]
        (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tr, ev = out / "train.jsonl", out / "eval.jsonl"
    tr.write_text("".join(json.dumps(r) + "\n" for r in rows[: a.n_train]))
    ev.write_text("".join(json.dumps(r) + "\n" for r in rows[a.n_train : a.n_train + a.n_eval]))
    print(f"data {a.data}: {len(rows)} pairs in {time.time() - t0:.0f} s", flush=True)
    tol = fell_tolerance("float32", "no")
    for loss in a.losses.split(","):
        t = time.time()
        rd = out / f"{loss}-lr{a.lr:g}-r{a.lora_rank}-s{a.steps}"
        cfg = TrainConfig(
            model=None,
            data=str(tr),
            eval_data=str(ev),
            loss=loss,
            output_dir=str(rd),
            overwrite=True,
            steps=a.steps,
            batch_size=a.batch_size,
            lr=a.lr,
            lora_rank=a.lora_rank,
            eval_every=a.steps // 2,
            max_length=a.max_length,
            max_prompt_length=a.max_length // 2,
            save_every=0,
            report_to="none",
            progress=False,
            seed=0,
            scheduler="constant",
        )
        train(cfg)
        f, dc, dr = frac_fell(rd, tol)
        print(
            f"{loss} lr={a.lr:g} rank={a.lora_rank} steps={a.steps}: chosen fell in {f:.0%} of eval pairs, "
            f"mean dchosen {dc:+.2f}, drejected {dr:+.2f} ({time.time() - t:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
