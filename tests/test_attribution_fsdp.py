"""In-run attribution (`--attribute-every`) under FSDP2 (`--fsdp`, 2 CPU processes under torchrun, gloo)
against the same run in 1 unsharded process.

Why it can be exact: each training pair's products with the probe set need only the per-module inputs and
output-gradients of its own rows (`preflens.grad.capture` reads them while FSDP2 has the layer gathered),
so each rank attributes its half of the global batch; as under DDP the rows are gathered and FSDP's mean
over ranks is the 1/N the callback applies. The Adam form also needs each parameter's whole Adam
denominator, which FSDP2 shards: the callback gathers it one parameter at a time
(`training.attribution.preconditioned_crosses`).

References: the 1-process run (no FSDP anywhere) for the SGD form and the cosine: every (step, pair,
probe) entry within 1e-5 of the column's largest magnitude (entries near zero have no meaningful
relative error), full finetuning and LoRA. The Adam form divides by D = sqrt(v) + eps, which at step 1 is
|g| + eps: where the batch's pairs nearly cancel in a gradient entry, the float32 summation order of the
2-process gradient (which the AdamW update itself amplifies the same way, tests/test_multiprocess.py)
moves g_i / D by far more than 1e-5; measured on this setting 1.9e-3 / 2.5e-3 of the column maximum at
step 1 for DDP and for FSDP2 alike, 6e-6 at step 2. So the Adam columns are checked against a 2-process
DDP run of the same batches (same summation of the gradient; no sharding) within 1e-5 (measured: equal to
the last bit), and against the 1-process run within 1e-2, which a wrong shard, a missing 1/N or one rank's
denominator would exceed by far. That the run really was sharded is checked from the run directory (its
checkpoint is a DCP directory only FSDP2 writes). The Adam form's own exactness (the pairs' shares sum to
the actual first AdamW update) is tests/test_attribution.py's, in float64.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_multiprocess import _free_port, _write_inputs

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("_mp_train_script.py")
RTOL = 1e-5
ADAM_VS_ONE_PROCESS = 1e-2  # the float32 conditioning of Adam's step-1 denominator (docstring)
EXACT = ("sgd_chosen", "sgd_rejected", "cosine")
ADAM = ("adam_chosen", "adam_rejected")


def _run(tmp_path: Path, name: str, nproc: int, **over) -> Path:
    mdir, data = (tmp_path / "model", tmp_path / "pairs.jsonl")
    out = tmp_path / name
    cfg = dict(model=str(mdir), data=str(data), eval_fraction=0.25, output_dir=str(out), steps=2,
               batch_size=4, lr=1e-3, scheduler="constant", max_grad_norm=1.0, eval_every=0, save_every=2,
               attribute_every=1, attribute_pairs=3, attribute_optimizer="adam", report_to="none",
               progress=False, seed=0, **over)  # fmt: skip
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, str(SCRIPT), str(path)]
    if nproc > 1:
        port = _free_port()
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={port}", str(SCRIPT), str(path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return out


def _table(run: Path):
    import pandas as pd

    df = pd.read_parquet(run / "attribution.parquet")
    return df.sort_values(["step", "pair_id", "probe_pair_id"]).reset_index(drop=True)


def _worst(a, b, cols) -> dict[str, float]:
    out = {}
    for col in cols:
        x, y = (torch.tensor(t[col].to_numpy(), dtype=torch.float64) for t in (a, b))
        scale = float(x.abs().max())
        assert scale > 0 and float(x.std()) > 0, col  # not a trivial column
        out[col] = float((x - y).abs().max()) / scale
    return out


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp_attribution_equals_one_process(tmp_path, lora) -> None:
    import pandas as pd

    _write_inputs(tmp_path)
    over = {"lora_rank": 4} if lora else {}
    one = _run(tmp_path, "run1", 1, **over)
    sharded = _run(tmp_path, "run2", 2, fsdp=True, **over)
    ddp = _run(tmp_path, "run3", 2, **over)
    assert (sharded / "checkpoints" / "step-2" / "pytorch_model_fsdp_0").is_dir(), "the run was not sharded"
    assert not (ddp / "checkpoints" / "step-2" / "pytorch_model_fsdp_0").exists()
    a, b, c = _table(one), _table(sharded), _table(ddp)
    assert len(a) == len(b) == len(c) == 2 * 4 * 3  # 2 steps x 4 pairs x 3 probes: both ranks' rows
    keys = ["step", "pair_id", "probe_pair_id"]
    assert (a[keys].to_numpy() == b[keys].to_numpy()).all() and (
        a[keys].to_numpy() == c[keys].to_numpy()
    ).all()
    name = "lora" if lora else "full"
    for col, err in _worst(a, b, EXACT).items():
        assert err <= RTOL, f"{name} {col}: FSDP2 off the 1-process run by {err:.3g} of max |entry|"
    for col, err in _worst(c, b, ADAM).items():
        assert err <= RTOL, f"{name} {col}: FSDP2 off the DDP run by {err:.3g} of max |entry|"
    for col, err in _worst(a, b, ADAM).items():
        assert err <= ADAM_VS_ONE_PROCESS, f"{name} {col}: FSDP2 off the 1-process run by {err:.3g}"
    sa = pd.read_parquet(one / "attribution_pairs.parquet").set_index("pair_id").sort_index()
    sb = pd.read_parquet(sharded / "attribution_pairs.parquet").set_index("pair_id").sort_index()
    assert list(sa.index) == list(sb.index) and (sa["seen"] == sb["seen"]).all()
    x, y = (torch.tensor(s["total_chosen"].to_numpy(), dtype=torch.float64) for s in (sa, sb))
    assert float((x - y).abs().max()) <= RTOL * float(x.abs().max())
