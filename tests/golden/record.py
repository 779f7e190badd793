"""The tiny training runs whose `metrics.jsonl`, `pairs.parquet` and `probes.parquet` were recorded before
the layout refactor (issue: one layout a newcomer can live in). `tests/test_golden_runs.py` reruns them and
compares against the files under `tests/golden/<name>/`; `python tests/golden/record.py` rewrites those
files (only do that when a change of behaviour is intended, and say so in the commit).

Three runs cover the paths the refactor moved: a full finetune with DPO, evaluations, probes and the fused
step statistics; LoRA with Balanced-DPO (its lambda, the adapter-off reference); a token-level loss (sparse).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = ("metrics.jsonl", "pairs.parquet", "probes.parquet")

RUNS: dict[str, dict] = {
    "dpo_probes": dict(
        loss="dpo", steps=4, eval_every=2, probe_every=2, probe_pairs=4, step_entanglement=True
    ),
    "bdpo_lora": dict(loss="bdpo", steps=3, lora_rank=4, eval_every=0, probe_every=3, probe_pairs=3),
    "sparse_tokens": dict(loss="sparse", mask="diff", steps=2, eval_every=1, probe_every=2, probe_pairs=3),
}


def run(name: str, workdir: Path) -> Path:
    """Train run `name` in `workdir` (tiny random Llama, synthetic sentiment pairs, one thread)."""
    import torch

    from preflens.data.synthetic import sentiment_pairs
    from preflens.models import tiny_model
    from preflens.train import TrainConfig, train

    torch.manual_seed(0)
    data = workdir / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_pairs(24, seed=0, response_length=4)))
    cfg = TrainConfig(
        data=str(data),
        output_dir=str(workdir / name),
        batch_size=4,
        lr=1e-3,
        save_every=0,
        report_to="none",
        progress=False,
        eval_fraction=0.2,
        **RUNS[name],
    )
    model, tok = tiny_model(hidden_size=32, seed=0)
    return train(cfg, model=model, tokenizer=tok)


def main() -> None:
    import tempfile

    import torch

    torch.set_num_threads(1)
    for name in RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            out = run(name, Path(tmp))
            dest = HERE / name
            dest.mkdir(exist_ok=True)
            for f in FILES:
                if (out / f).is_file():
                    (dest / f).write_bytes((out / f).read_bytes())
            print(f"recorded {name}: {sorted(p.name for p in dest.iterdir())}", file=sys.stderr)


if __name__ == "__main__":
    main()
