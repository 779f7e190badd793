"""Two processes (torchrun, gloo on the CPU) train exactly what one process trains.

Same global batch (`batch_size` is global: accelerate splits each batch of 4 pairs into 2 + 2), same
data order, same seed. DDP averages the per-process gradients of the per-pair mean loss, which equals
the gradient of the mean over all 4 pairs, so the parameters after N AdamW steps must agree up to
float32 summation order. The logged metrics (loss, reward accuracies, margins, log-probs, eval rows)
must be the means over *all* pairs of the global batch, i.e. gathered across processes, not rank 0's
half: we check every row of the 1-process metrics.jsonl (train, eval, and probe rows once the trainer
writes them: `probe_every` is set) against its twin, after checking that per-pair values differ, so
rank 0's half alone could not match by luck. Measured: the weights agree to ~2e-6 (tolerance 1e-5).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiproc

SCRIPT = Path(__file__).with_name("_mp_train_script.py")
# Parameters: AdamW moves every weight by ~lr per step whatever the gradient's scale, so a
# summation-order difference in a near-zero gradient component can show at ~lr * 1e-3; 3 steps at
# lr 1e-3 keep that well below 1e-5 while the weights themselves move by ~3e-3.
PARAM_ATOL = 1e-5
METRIC_RTOL, METRIC_ATOL = 1e-4, 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_inputs(tmp_path: Path) -> tuple[Path, Path]:
    from preflens.data.synthetic import sentiment_pairs
    from preflens.models import tiny_model

    model, tok = tiny_model(hidden_size=32, num_layers=2, seed=0)
    mdir = tmp_path / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    data = tmp_path / "pairs.jsonl"
    # pairs of different lengths, so padding differs between the 1- and 2-process micro-batches
    rows = sentiment_pairs(12, seed=3, response_length=5) + sentiment_pairs(12, seed=4, response_length=9)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return mdir, data


def _config(mdir: Path, data: Path, out: Path) -> dict:
    return dict(
        model=str(mdir),
        data=str(data),
        eval_fraction=0.25,
        loss="dpo",
        output_dir=str(out),
        steps=3,
        batch_size=4,
        lr=1e-3,
        scheduler="constant",
        max_grad_norm=1.0,
        eval_every=2,
        save_every=0,
        log_every=1,
        probe_every=1,
        probe_pairs=4,
        step_entanglement=True,
        pairs_train_subset=8,
        report_to="none",
        progress=False,
        seed=0,
    )


def _run(nproc: int, cfg_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, str(SCRIPT), str(cfg_path)]
    if nproc > 1:
        # torchrun (= python -m torch.distributed.run). Without a GPU, accelerate 1.x builds a gloo
        # process group from torchrun's environment only when told the run is a CPU run, which is
        # what `accelerate launch --cpu` sets: ACCELERATE_USE_CPU.
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={_free_port()}",
            str(SCRIPT),
            str(cfg_path),
        ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{nproc}-process run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted((run / "final").glob("*.safetensors"))
    assert files, f"no safetensors in {run / 'final'}"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def test_two_processes_match_one(tmp_path):
    mdir, data = _write_inputs(tmp_path)
    runs = {}
    for n in (1, 2):
        cfg = _config(mdir, data, tmp_path / f"run{n}")
        cfg_path = tmp_path / f"cfg{n}.json"
        cfg_path.write_text(json.dumps(cfg))
        _run(n, cfg_path)
        runs[n] = tmp_path / f"run{n}"

    # the 2-process run really ran in 2 processes
    resolved = (runs[2] / "config.yaml").read_text()
    assert "num_processes: 2" in resolved

    # parameters: same after 3 steps, and they did move
    from safetensors.torch import load_file

    w0 = load_file(str(next(mdir.glob("*.safetensors"))))
    w1, w2 = _weights(runs[1]), _weights(runs[2])
    assert w1.keys() == w2.keys()
    moved = max(float((w1[k] - w0[k]).abs().max()) for k in w1 if k in w0)
    assert moved > 1e-3, "the 1-process run did not change the weights: the comparison would be empty"
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert worst <= PARAM_ATOL, f"2-process weights differ from 1-process by {worst:.3g} > {PARAM_ATOL}"

    # metrics: every row of the 1-process run has its twin, with the same numbers
    r1, r2 = _rows(runs[1]), _rows(runs[2])
    key = lambda r: (r["split"], r["step"])  # noqa: E731
    by2 = {key(r): r for r in r2}
    splits = {r["split"] for r in r1}
    assert {"train", "eval"} <= splits, splits
    checked = 0
    for row in r1:
        twin = by2.get(key(row))
        assert twin is not None, f"2-process metrics.jsonl lacks the {key(row)} row"
        for k, v in row.items():
            if k in ("step", "split") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if k.startswith(("time", "runtime")) or k.endswith(("_s", "/s", "per_second")):
                continue
            w = twin.get(k)
            assert w is not None, f"{key(row)}: key {k} missing in the 2-process row"
            assert w == pytest.approx(v, rel=METRIC_RTOL, abs=METRIC_ATOL, nan_ok=True), (
                f"{key(row)} {k}: 2 processes {w} vs 1 process {v}"
            )
            checked += 1
    assert checked > 20
    # train-token count is the global batch's, not one rank's
    t1 = [r["tokens"] for r in r1 if r["split"] == "train"]
    t2 = [r["tokens"] for r in r2 if r["split"] == "train"]
    assert t1 == t2
    # the per-pair log-probs differ from pair to pair, so a mean over rank 0's half of a batch could
    # not equal the mean over the whole batch by luck: the equality above means gathered statistics
    import pandas as pd

    pairs = pd.read_parquet(runs[1] / "pairs.parquet")
    assert pairs["chosen"].std() > 0.1


def test_two_processes_packed_match_one_padded(tmp_path):
    """`--padding-free` under DDP (each rank packs its half of the batch) trains what one padded process
    trains: packing is exact, so only summation order differs."""
    mdir, data = _write_inputs(tmp_path)
    runs = {}
    for n, packed in ((1, False), (2, True)):
        cfg = dict(
            _config(mdir, data, tmp_path / f"run{n}"),
            padding_free=packed,
            probe_every=0,
            step_entanglement=False,
        )
        cfg_path = tmp_path / f"cfg{n}.json"
        cfg_path.write_text(json.dumps(cfg))
        _run(n, cfg_path)
        runs[n] = tmp_path / f"run{n}"
    assert "padding_free: true" in (runs[2] / "config.yaml").read_text()
    w1, w2 = _weights(runs[1]), _weights(runs[2])
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert worst <= PARAM_ATOL, f"packed 2-process weights differ from padded 1-process by {worst:.3g}"
    loss1 = [r["loss"] for r in _rows(runs[1]) if r["split"] == "train"]
    loss2 = [r["loss"] for r in _rows(runs[2]) if r["split"] == "train"]
    assert loss2 == pytest.approx(loss1, rel=METRIC_RTOL, abs=METRIC_ATOL)
