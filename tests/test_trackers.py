"""--report-to tensorboard|wandb|mlflow|none in `train` and `rft`: every numeric metrics.jsonl key k of
split s reaches the tracker as s/k at the row's step with the row's value (read back from the tracker's
own files: wandb's offline run, MLflow's local file store, TensorBoard's events), and a missing package is
a one-line error naming the extra that installs it."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest

from preflens.cli import main
from preflens.data.synthetic import sentiment_pairs
from preflens.errors import PreflensError
from preflens.training.runtime import parse_report_to

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from preflens.models import tiny_model

    d = tmp_path_factory.mktemp("tiny")
    model, tok = tiny_model(hidden_size=32, seed=0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _train(monkeypatch, capsys, tmp_path, model_dir, report_to):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_pairs(16, seed=1, response_length=4)))
    run = tmp_path / "run"
    args = ["--data", data, "--model", model_dir, "--steps", 3, "--batch-size", 4, "--eval-every", 2]
    argv = ["preflens", "train", *map(str, args), "--output-dir", str(run), "--report-to", report_to]
    monkeypatch.setattr(sys, "argv", argv)
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out, run


def expected(run) -> dict[tuple[str, int], float]:
    """{(split/key, step): value} of every numeric metrics.jsonl entry (NaN dropped: trackers skip it)."""
    want = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for k, v in row.items():
            if k in ("step", "split") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not math.isnan(v):
                want[(f"{row['split']}/{k}", int(row["step"]))] = float(v)
    assert len({k for k, _ in want}) > 10
    return want


def test_parse_report_to(monkeypatch):
    assert parse_report_to("none") == [] and parse_report_to("") == [] and parse_report_to(None) == []
    assert parse_report_to("tensorboard") == ["tensorboard"]
    with pytest.raises(PreflensError, match="unknown tracker 'comet'.*tensorboard, wandb, mlflow, or none"):
        parse_report_to("tensorboard,comet")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(PreflensError, match=r"^--report-to wandb: the wandb package is not installed \(pip install 'preflens\[wandb\]'\)$"):  # fmt: skip
        parse_report_to("tensorboard, wandb")


def test_missing_tracker_package_is_one_line(tmp_path, monkeypatch, capsys, model_dir):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a))
    code, out, run = _train(monkeypatch, capsys, tmp_path, model_dir, "mlflow")
    assert code != 0 and "Traceback" not in out.err
    lines = [ln for ln in out.err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install 'preflens[mlflow]'" in lines[0], out.err
    assert not (run / "metrics.jsonl").exists()


def _records(path):
    """The records of a wandb run file: a 7-byte header (":W&B", magic, version), then the LevelDB log
    format (32 KiB blocks; each record: crc32 (4 bytes), length (2, little-endian), type (1): 1 full,
    2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is zero padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            buf = chunk
        elif kind in (3, 4):
            buf += chunk
        if kind in (1, 4):
            yield buf


def _wandb_history(run) -> dict[tuple[str, int], float]:
    from wandb.proto import wandb_internal_pb2

    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    got = {}
    for data in _records(files[0]):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") != "history":
            continue
        items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
        for k, v in items.items():
            if not k.startswith("_") and isinstance(v, (int, float)):
                got[(k, int(items["_step"]))] = float(v)
    return got


@pytest.mark.slow
def test_train_report_to_wandb_offline_writes_the_metrics(tmp_path, monkeypatch, capsys, model_dir):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    code, out, run = _train(monkeypatch, capsys, tmp_path, model_dir, "wandb,tensorboard")
    assert code == 0, out.err
    want, got = expected(run), _wandb_history(run)
    assert set(want) <= set(got), sorted(set(want) - set(got))[:5]
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    assert (run / "tb").is_dir()  # and TensorBoard beside it


@pytest.mark.slow
def test_train_report_to_mlflow_local_file_store(tmp_path, monkeypatch, capsys, model_dir):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    code, out, run = _train(monkeypatch, capsys, tmp_path, model_dir, "mlflow")
    assert code == 0, out.err
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "preflens"]
    (mrun,) = client.search_runs([exp.experiment_id])
    want = expected(run)
    got = {}
    for key in {k for k, _ in want}:
        for m in client.get_metric_history(mrun.info.run_id, key):
            got[(key, int(m.step))] = float(m.value)
    assert set(want) <= set(got), sorted(set(want) - set(got))[:5]
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    assert mrun.data.params["loss"] == "dpo"


def test_rft_report_to_tensorboard_logs_every_key(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from _say_word import make_tiny
    from preflens.data.prompts import PromptRow
    from preflens.rewards import get_reward
    from preflens.training.rft import RFTConfig, train_rft

    def apple(prompts, completions):
        return [float("apple" in c.split()) for c in completions]

    model, tok = make_tiny()
    rows = [PromptRow(i, p, "apple") for i, p in enumerate(["say apple", "x y", "please say", "the word"])]
    cfg = RFTConfig(
        steps=2, k=4, prompts_per_step=2, lr=1e-2, max_new_tokens=3, initial_sft=1, report_to="tensorboard"
    )
    train_rft(model, tok, rows, get_reward(apple), cfg, tmp_path / "run")
    acc = EventAccumulator(str(tmp_path / "run" / "tb" / "preflens-rft"), size_guidance={"scalars": 0})
    acc.Reload()
    got = {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    want = expected(tmp_path / "run")
    assert set(want) <= set(got), sorted(set(want) - set(got))[:5]
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key  # TensorBoard stores float32
