"""FSDP2 (`torch.distributed.fsdp.fully_shard`) on 2 CPU processes (torchrun, gloo) against 1 unsharded one.

- `sequence_gram` and the probe's per-pair rows (`ProbeRunner`) of each rank's own micro-batch, with the
  tiny Llama sharded by `preflens.training.fsdp.shard_model` (untied and tied embeddings, LoRA), equal the
  values of the unsharded model in this process (1e-5 relative). The references are computed here, in one
  process, with no FSDP in the picture; that the model really was sharded is checked (DTensor parameters).
- A 3-step `--fsdp` training run with `--step-entanglement` trains the parameters the 1-process run trains
  and logs the same metrics.jsonl rows (train, eval, entanglement keys), as tests/test_multiprocess.py
  checks for DDP.
- `--loss normalized` with LoRA under FSDP2 (a standalone Gram pass inside every step) equals 1 process.
- `--probe-every` under FSDP2: the probes table, update_pred_* columns included (sharded gradients dotted
  with the sharded update, all-reduced), equals the 1-process run's; `update_prediction` itself under a
  fixed update equals the unsharded one (untied, tied, LoRA).
- Resume under FSDP2 after Ctrl-C inside step 2 (every rank; a sharded DCP checkpoint of step 1) ends where the
  uninterrupted FSDP2 run ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_multiprocess import _config, _free_port, _rows, _weights, _write_inputs

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("_fsdp_script.py")
sys.path.insert(0, str(SCRIPT.parent))
GRAM_RTOL = 1e-5
PARAM_ATOL = 1e-5  # as test_multiprocess.py: AdamW steps of 1e-3, float32 summation order
METRIC_RTOL, METRIC_ATOL = 1e-4, 1e-5


def _torchrun(*args: str, ok: tuple[int, ...] = (0,)) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["ACCELERATE_USE_CPU"] = "true"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
    ]
    proc = subprocess.run(cmd + [str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode in ok, (
        f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return proc.stderr


def _one_process(*args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"1-process run failed:\n{proc.stderr[-6000:]}"


@pytest.mark.parametrize("variant", ["untied", "tied", "lora"])
def test_gram_and_probe_rows_match_unsharded(tmp_path, variant):
    from _fsdp_script import build, fsdp_batch, local_values, rank_slice, update_values

    _torchrun("gram", str(tmp_path), variant)
    model = build(variant)
    n_params = len(list(model.parameters()))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["dtensors"] == n_params, "the model was not sharded (its parameters are not all DTensors)"
        ref = local_values(model, rank_slice(fsdp_batch(), rank))
        g_ref, g = (
            torch.tensor(ref["gram"], dtype=torch.float64),
            torch.tensor(got["gram"], dtype=torch.float64),
        )
        assert g_ref.abs().max() > 0
        err = float((g - g_ref).abs().max() / g_ref.abs().max())
        assert err <= GRAM_RTOL, f"{variant} rank {rank}: sharded Gram off by {err:.3g} (relative)"
        # the two ranks' micro-batches differ, so matching its own slice is not matching any slice
        assert len(got["rows"]) == len(ref["rows"]) == 2
        checked = 0
        for row_ref, row in zip(ref["rows"], got["rows"]):
            for k, v in row_ref.items():
                if isinstance(v, float) and v == v:
                    assert row[k] == pytest.approx(v, rel=GRAM_RTOL, abs=1e-7), f"{variant} rank {rank} {k}"
                    checked += 1
        assert checked >= 10
    other = json.loads((tmp_path / "rank1.json").read_text())["gram"]
    assert other != json.loads((tmp_path / "rank0.json").read_text())["gram"]
    # update_pred_* / update_obs_*: <g_i, delta> under a fixed update, every rank on all 8 rows
    upd = update_values(model, fsdp_batch())
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())["update"]
        for key in ("pred", "obs", "start"):
            ref, val = torch.tensor(upd[key]), torch.tensor(got[key])
            assert ref.abs().max() > 0 and torch.isfinite(val).all(), (variant, key)
            err = float((val - ref).abs().max() / ref.abs().max())
            assert err <= GRAM_RTOL, (
                f"{variant} rank {rank}: sharded update_prediction {key} off by {err:.3g}"
            )


def test_chunked_gram_passes_agree_across_ranks(tmp_path):
    """Rank 0's memory budget fits only part of its micro-batch per pass, rank 1's all of it: alone they
    would run different numbers of forwards (the collectives of FSDP2 would then hang: the subprocess
    timeout fails the test). With `grad.api.agree_rows` both chunk, and each Gram equals the unsharded
    single pass; a pass rank 0 cannot fit at all stops both ranks with an error."""
    from _fsdp_script import build, fsdp_batch, rank_slice
    from preflens.grad import sequence_gram

    _torchrun("chunks", str(tmp_path))
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["alone"] < got[0]["n"] and got[1]["alone"] == got[1]["n"], "the budgets did not differ"
    model = build("untied")
    for rank in (0, 1):
        b = rank_slice(fsdp_batch(), rank)
        ref = sequence_gram(model, b["input_ids"], b["attention_mask"], b["response_mask"]).double()
        g = torch.tensor(got[rank]["gram"], dtype=torch.float64)
        err = float((g - ref).abs().max() / ref.abs().max())
        assert err <= GRAM_RTOL, f"rank {rank}: chunked sharded Gram off by {err:.3g}"
    assert got[0]["refused"].startswith("MemoryBudgetError") and "over the memory budget" in got[0]["refused"]
    assert got[1]["refused"].startswith("MemoryBudgetError") and "another rank" in got[1]["refused"]


def _cfg(tmp_path: Path, name: str, **over) -> Path:
    mdir, data = (tmp_path / "model", tmp_path / "pairs.jsonl")
    if not mdir.exists():
        _write_inputs(tmp_path)
    cfg = {**_config(mdir, data, tmp_path / name), "probe_every": 0, "step_entanglement": True, **over}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def _compare_runs(a: Path, b: Path) -> int:
    w1, w2 = _weights(a), _weights(b)
    assert w1.keys() == w2.keys()
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert worst <= PARAM_ATOL, f"{b.name} weights differ from {a.name} by {worst:.3g}"
    r2 = {(r["split"], r["step"]): r for r in _rows(b)}
    checked = 0
    for row in _rows(a):
        twin = r2[(row["split"], row["step"])]
        for k, v in row.items():
            if k in ("step", "split") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            assert twin[k] == pytest.approx(v, rel=METRIC_RTOL, abs=METRIC_ATOL, nan_ok=True), (
                row["step"],
                k,
            )
            checked += 1
    return checked


def test_fsdp_training_matches_one_process_and_resumes(tmp_path):
    one, sharded = _cfg(tmp_path, "run1"), _cfg(tmp_path, "run2", fsdp=True)
    _one_process("train", str(one))
    _torchrun("train", str(sharded))
    assert "fsdp: true" in (tmp_path / "run2" / "config.yaml").read_text()
    assert (tmp_path / "run2" / "checkpoints" / "step-3" / "pytorch_model_fsdp_0").is_dir()
    from safetensors.torch import load_file

    w0 = load_file(str(next((tmp_path / "model").glob("*.safetensors"))))
    w1 = _weights(tmp_path / "run1")
    assert max(float((w1[k] - w0[k]).abs().max()) for k in w1 if k in w0) > 1e-3
    checked = _compare_runs(tmp_path / "run1", tmp_path / "run2")
    assert checked > 20
    ent = [r for r in _rows(tmp_path / "run2") if "entanglement/cosine" in r]
    assert len(ent) == 3, "--step-entanglement rows missing under FSDP2"

    # Ctrl-C inside step 2 on every rank (rewound; step 1 checkpointed), then --resume: the sharded checkpoint resumes exactly
    cut = _cfg(tmp_path, "run3", fsdp=True, interrupt_at=1, save_every=0)
    # torchrun exits 1 when a worker fails; the workers exit 3 (the script's code for the interrupt)
    err = _torchrun("train", str(cut), ok=(1,))
    assert "exitcode  : 3" in err and "exitcode  : 1" not in err, err[-3000:]
    assert (tmp_path / "run3" / "checkpoints" / "step-1" / "optimizer_0").is_dir()
    assert not (tmp_path / "run3" / "final").exists()
    resumed = _cfg(tmp_path, "run3", fsdp=True, resume=True, save_every=0)
    _torchrun("train", str(resumed))
    assert _compare_runs(tmp_path / "run2", tmp_path / "run3") > 20


def test_fsdp_normalized_loss_with_lora_matches_one_process(tmp_path):
    """`--loss normalized` under FSDP2 with LoRA: its per-sequence gradient norms come from a standalone
    Gram pass on the sharded model inside every step (the root's parameters gathered by the capture);
    the run trains what the unsharded 1-process run trains."""
    over = dict(loss="normalized", lora_rank=4, step_entanglement=False)
    _one_process("train", str(_cfg(tmp_path, "run1", **over)))
    _torchrun("train", str(_cfg(tmp_path, "run2", fsdp=True, **over)))
    assert any("lora_B" in k for k in _weights(tmp_path / "run2"))
    assert _compare_runs(tmp_path / "run1", tmp_path / "run2") > 20


def _compare_tables(a, b) -> int:
    """Every numeric column of two per-pair tables (same rows, same order) within 1e-5 of its scale; NaN
    where the other has NaN. Differences of two log-probs (the observed changes) are compared on the
    log-probs' scale: each term matches within 1e-5 of it, so their difference can be off by that much.
    Returns the number of columns compared."""
    logp_scale = float(max(a["chosen"].abs().max(), a["rejected"].abs().max()))
    errs: dict[str, float] = {}
    for col in a.columns:
        if a[col].dtype.kind not in "fiu" or col in ("step", "pair_id"):
            continue
        x, y = a[col].to_numpy(float), b[col].to_numpy(float)
        assert ((x != x) == (y != y)).all(), f"{col}: NaN in one run only"
        ok = x == x
        if not ok.any():
            continue
        scale = logp_scale if col.startswith(("obs_delta_", "update_obs_")) else float(abs(x[ok]).max())
        errs[col] = float(abs(x[ok] - y[ok]).max()) / max(scale, 1e-12)
    bad = {k: f"{v:.2g}" for k, v in errs.items() if v > GRAM_RTOL}
    assert not bad, f"columns off (relative to their scale): {bad}; all: {errs}"
    return len(errs)


def _probe_table(run: Path):
    import pandas as pd

    t = pd.read_parquet(run / "probes.parquet")
    return t.sort_values(["step", "split", "pair_id"]).reset_index(drop=True)


@pytest.mark.parametrize("loss", ["dpo", "sparse"])
def test_fsdp_probe_every_matches_one_process(tmp_path, loss):
    """`--probe-every 1` under FSDP2: the probes table (the Gram statistics and the update_pred_* columns,
    <g_i, delta theta> of the optimizer's real update, from sharded gradients all-reduced over the ranks)
    equals the 1-process run's, every numeric column within 1e-5 of its scale. `sparse` (token-level) also
    reads the probe set's per-token log-probs in a forward of its own."""
    over = dict(probe_every=1, probe_pairs=4, step_entanglement=False, loss=loss)
    _one_process("train", str(_cfg(tmp_path, "run1", **over)))
    _torchrun("train", str(_cfg(tmp_path, "run2", fsdp=True, **over)))
    a, b = _probe_table(tmp_path / "run1"), _probe_table(tmp_path / "run2")
    assert len(a) == len(b) == 4 * 4  # probes before step 1 and after steps 1..3, 4 pairs each
    assert list(a["step"]) == list(b["step"]) and list(a["pair_id"]) == list(b["pair_id"])
    later = a["step"] > 0
    for col in ("update_pred_chosen", "update_pred_rejected", "update_obs_chosen", "update_obs_rejected"):
        assert a.loc[later, col].notna().all() and (a.loc[later, col].abs() > 0).any(), col
    checked = _compare_tables(a, b)
    assert checked >= 10
    assert _compare_runs(tmp_path / "run1", tmp_path / "run2") > 20


def test_trl_callback_on_fsdp2_models_matches_one_process(tmp_path):
    """The TRL callback (`PreflensCallback`) with FSDP2-sharded policy and reference (2 ranks, each its half
    of every DPO batch): pairs.parquet, probes.parquet and the probe rows of metrics.jsonl equal the
    1-process run's. TRL's DPOTrainer itself cannot shard on CPU processes (accelerate's FSDP plugin
    needs a GPU: README "70B with FSDP"), so the script drives the callback's events as TRL does."""
    import pandas as pd

    _one_process("callback", str(tmp_path / "one"))
    _torchrun("callback", str(tmp_path / "fsdp"))
    checked = 0
    for name in ("pairs.parquet", "probes.parquet"):
        a, b = (
            pd.read_parquet(tmp_path / d / name).sort_values(["step", "pair_id"]) for d in ("one", "fsdp")
        )
        a, b = a.reset_index(drop=True), b.reset_index(drop=True)
        assert len(a) == len(b) == 3 * 4 and sorted(a["step"].unique()) == [0, 1, 2], name
        assert list(a["pair_id"]) == list(b["pair_id"])
        moved = a.loc[a["step"] == 2, "chosen"].to_numpy() != a.loc[a["step"] == 0, "chosen"].to_numpy()
        assert moved.all(), "the two DPO steps did not change the policy"
        checked += _compare_tables(a, b)
    assert checked >= 15
    rows = [[r for r in _rows(tmp_path / d) if r["split"] == "probe"] for d in ("one", "fsdp")]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [0, 1, 2]
    for r1, r2 in zip(*rows):
        for k, v in r1.items():
            if isinstance(v, float) and v == v:
                assert r2[k] == pytest.approx(v, rel=GRAM_RTOL, abs=1e-6), (r1["step"], k)
