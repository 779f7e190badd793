"""Every loss name through `preflens train` (flags and TRL-style --config files), and the one loss table
(`src/preflens/losses/TABLE.md`) that `preflens train --help` and README.md show."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from preflens.cli import main
from preflens.data.synthetic import sentiment_pairs
from preflens.errors import PreflensError
from preflens.losses import LOSSES, loss_hparams
from preflens.training.config import TrainConfig, resolve_loss_kwargs
from preflens.training.config_file import build_config

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "src" / "preflens" / "losses" / "TABLE.md"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from preflens.models import tiny_model

    d = tmp_path_factory.mktemp("tiny")
    model, tok = tiny_model(hidden_size=32, seed=0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["preflens", "train", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def data_file(tmp_path, n=8):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in sentiment_pairs(n, seed=1, response_length=4)))
    return p


def _combination_run(tmp_path, monkeypatch, capsys, model_dir):
    run = tmp_path / "run"
    code, out, err = run_cli(
        monkeypatch, capsys, "--data", data_file(tmp_path), "--model", model_dir, "--output-dir", run,
        "--loss", "sigmoid,bco_pair,sft", "--loss-weights", "0.8,0.2,1", "--beta", "0.2", "--steps", 2,
        "--batch-size", 4, "--eval-every", 0, "--report-to", "none", "--no-progress", "--lr", "1e-3",
    )  # fmt: skip
    assert code == 0, err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["loss"] == "sigmoid,bco_pair,sft"
    assert saved["loss_kwargs_resolved"]["loss_weights"] == [0.8, 0.2, 1.0]
    assert saved["loss_kwargs_resolved"]["beta"] == 0.2
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rows)
    return run


def test_train_with_a_weighted_combination_from_flags(tmp_path, monkeypatch, capsys, model_dir):
    _combination_run(tmp_path, monkeypatch, capsys, model_dir)


@pytest.mark.slow
def test_report_reads_a_combined_loss_run(tmp_path, monkeypatch, capsys, model_dir):
    from preflens.report import generate_report

    page, _findings = generate_report(_combination_run(tmp_path, monkeypatch, capsys, model_dir))
    assert Path(page).is_file()


def test_trl_config_file_keys_carry_over_and_ld_alpha_trains(tmp_path, monkeypatch, capsys, model_dir):
    """A TRL user's YAML: `loss_type` as a list, `loss_weights`, `label_smoothing`, `ld_alpha` top-level."""
    cfg = tmp_path / "trl.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "dataset_name": str(data_file(tmp_path)),
                "loss_type": ["sigmoid", "robust"],
                "loss_weights": [1.0, 0.5],
                "label_smoothing": 0.1,
                "ld_alpha": 0.5,
                "beta": 0.2,
                "max_steps": 2,
                "learning_rate": 1e-3,
                "batch_size": 4,
                "eval_every": 0,
                "report_to": "none",
                "progress": False,
            }
        )
    )
    run = tmp_path / "run"
    code, out, err = run_cli(monkeypatch, capsys, "--config", cfg, "--model", model_dir, "--output-dir", run)
    assert code == 0, err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["loss"] == "sigmoid,robust"
    kw = saved["loss_kwargs_resolved"]
    assert kw["loss_weights"] == [1.0, 0.5] and kw["ld_alpha"] == 0.5 and kw["label_smoothing"] == 0.1


def test_use_weighting_trains_from_flags_and_from_a_trl_config(tmp_path, monkeypatch, capsys, model_dir):
    """WPO (TRL's use_weighting) through `preflens train`: `--loss-kwargs use_weighting=true`, and a TRL
    YAML's top-level `use_weighting: true` with a loss_type list. The run trains and evaluates (the head
    computes log sum p^2; before, the loss refused for want of it); the logged losses differ from the unweighted
    ones; tests/test_losses_wpo_train.py checks the numbers against TRL's own trainer."""

    def run_flags(out, *extra):
        code, _, err = run_cli(
            monkeypatch, capsys, "--data", data_file(tmp_path), "--model", model_dir, "--output-dir", out,
            "--loss", "sigmoid", "--steps", 2, "--batch-size", 4, "--eval-every", 1, "--report-to", "none",
            "--no-progress", "--lr", "1e-3", *extra,
        )  # fmt: skip
        assert code == 0, err
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    weighted = run_flags(tmp_path / "wpo", "--loss-kwargs", "use_weighting=true")
    plain = run_flags(tmp_path / "plain")
    saved = yaml.safe_load((tmp_path / "wpo" / "config.yaml").read_text())
    assert saved["loss_kwargs_resolved"]["use_weighting"] is True
    ev_w = [r for r in weighted if r["split"] == "eval"]
    ev_p = [r for r in plain if r["split"] == "eval"]
    assert len(ev_w) == len(ev_p) == 3 and ev_p[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert all(abs(w["loss"] - p["loss"]) > 1e-3 for w, p in zip(ev_w, ev_p))  # weighted by w_w w_l != 1
    cfg = tmp_path / "trl.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "dataset_name": str(data_file(tmp_path)),
                "loss_type": ["sigmoid", "bco_pair", "sft"],
                "loss_weights": [0.8, 0.2, 1.0],
                "use_weighting": True,
                "max_steps": 1,
                "batch_size": 4,
                "eval_every": 0,
                "report_to": "none",
                "progress": False,
            }  # fmt: skip
        )
    )
    code, _, err = run_cli(
        monkeypatch, capsys, "--config", cfg, "--model", model_dir, "--output-dir", tmp_path / "r3"
    )
    assert code == 0, err
    kw = yaml.safe_load((tmp_path / "r3" / "config.yaml").read_text())["loss_kwargs_resolved"]
    assert kw["use_weighting"] is True and kw["loss_weights"] == [0.8, 0.2, 1.0]


def test_config_errors_name_the_option():
    def cfg(**kw):
        return build_config(TrainConfig, {"data": "x", "output_dir": "y", **kw}, {})

    with pytest.raises(PreflensError, match="--loss: unknown loss 'nope'"):
        cfg(loss="sigmoid,nope").validate()
    with pytest.raises(PreflensError, match="--loss-weights has 2 weights"):
        resolve_loss_kwargs(cfg(loss="sigmoid,bco_pair,sft", loss_weights=[1, 2]))
    with pytest.raises(PreflensError, match="does not apply"):
        resolve_loss_kwargs(cfg(loss="dpo", loss_kwargs={"ld_alpha": 0.5}))  # dpo's contract is beta alone
    assert resolve_loss_kwargs(cfg(loss="sigmoid", loss_kwargs={"ld_alpha": 0.5})) == {"ld_alpha": 0.5}
    assert cfg(loss_type=["sigmoid", "sft"]).loss == "sigmoid,sft"


def _table_rows():
    lines = [ln for ln in TABLE.read_text().splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[1:] if not ln.startswith("|---")]


def test_the_loss_table_lists_every_loss_with_its_defaults():
    rows = _table_rows()
    assert [r[0] for r in rows] == list(LOSSES)
    for name, _formula, _paper, hps, _trl in rows:
        want = ", ".join(f"{k}={v!r}" for k, v in loss_hparams(name).items()) or "none"
        assert hps == want, name
        assert ("+options" in _trl) == bool(set(loss_hparams(name, options=True)) - set(loss_hparams(name)))


def test_train_help_and_readme_show_the_table(monkeypatch, capsys):
    from preflens.commands.train import loss_table_help

    text = loss_table_help()
    for name in LOSSES:
        assert f"  {name} " in text
    readme = (ROOT / "README.md").read_text()
    assert TABLE.read_text().strip() in readme  # the same table, verbatim
    code, out, err = run_cli(monkeypatch, capsys, "--help")
    assert code == 0 and "sigmoid_norm" in out and "cal_dpo" in out
