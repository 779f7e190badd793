"""`--step-entanglement` with losses whose gradient reads per-token log-probs (issue 12).

The fused per-step statistics (`grad.StepGramCapture`) recover each sequence's gradient from the step's
backward by dividing by one weight dL/dlogp_s per sequence. That is exact for losses of the summed
log-probs, WPO's detached weight included (TRL's `use_weighting`), and wrong for a loss that weighs tokens
itself (`sparse`, TRL's `ld_alpha`, a comma combination holding one): before this check such runs wrote
statistics silently (`dpo,sparse`) or dropped them (`sigmoid` with `ld_alpha`: every c_s = 0). These are
refused up front with one line naming the loss and the option; the supported ones are checked against an
explicit per-sequence autograd loop.
"""

from __future__ import annotations

import copy
import json
import math
import sys

import pandas as pd
import pytest
import torch

from preflens.data.synthetic import sentiment_pairs
from preflens.errors import PreflensError
from preflens.models import tiny_model
from preflens.train import TrainConfig, Trainer, TrainerCallback

pytestmark = pytest.mark.usefixtures("one_thread")
BETA = 0.2


def _cfg(tmp_path, **kw):
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_pairs(16, seed=0, response_length=4)))
    base = dict(
        data=str(data), output_dir=str(tmp_path / "run"), steps=1, batch_size=4, lr=1e-3, eval_every=0,
        save_every=0, report_to="none", progress=False, eval_fraction=0.25, beta=BETA,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


REFUSED = [
    ("sigmoid", {"ld_alpha": 0.5}, "'sigmoid' with ld_alpha=0.5"),
    ("sigmoid", {"ld_alpha": 1.0}, "'sigmoid' with ld_alpha=1.0"),  # plain weights, but read per token
    ("dpo,sparse", {}, "'sparse' weighs the response tokens"),
    ("sparse", {}, "'sparse' weighs the response tokens"),
    ("sigmoid,bco_pair,sft", {"ld_alpha": 0.5}, "'bco_pair' with ld_alpha=0.5"),
]


@pytest.mark.parametrize("loss,kw,names", REFUSED, ids=[f"{c[0]}-{c[1]}" for c in REFUSED])
def test_token_weighted_losses_are_refused_up_front(tmp_path, loss, kw, names):
    cfg = _cfg(tmp_path, loss=loss, loss_kwargs=kw, step_entanglement=True)
    with pytest.raises(PreflensError) as e:
        cfg.validate()
    msg = str(e.value)
    assert msg.startswith(f"--step-entanglement with --loss {loss}: ") and names in msg and "\n" not in msg
    cfg.step_entanglement = False
    cfg.validate()  # the loss itself is fine without the fused statistics


@pytest.mark.parametrize(
    "loss,kw",
    [("sigmoid", {"use_weighting": True}), ("sigmoid,bco_pair,sft", {"use_weighting": True}),
     ("sft", {"ld_alpha": 0.5}), ("dpo", {}), ("normalized", {})],
)  # fmt: skip
def test_losses_of_the_summed_log_probs_are_accepted(tmp_path, loss, kw):
    """WPO's weight is detached (one factor per pair); TRL's `sft` ignores ld_alpha (it reads the sums)."""
    cfg = _cfg(tmp_path, loss=loss, loss_kwargs=kw, step_entanglement=True)
    cfg.beta = None if loss in ("sft", "normalized") else BETA
    cfg.validate()


def test_cli_refuses_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from preflens.cli import main

    _cfg(tmp_path)  # writes the data
    argv = ["preflens", "train", "--data", str(tmp_path / "pairs.jsonl"), "--model", str(tmp_path / "no-model"),
            "--output-dir", str(tmp_path / "run"), "--loss", "sigmoid", "--loss-kwargs", "ld_alpha=0.5",
            "--step-entanglement", "--report-to", "none", "--no-progress"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code not in (0, None)
    assert "--step-entanglement with --loss sigmoid: 'sigmoid' with ld_alpha=0.5" in err
    assert "no-model" not in err and "Traceback" not in err  # refused before the model path was read


# -- use_weighting is exact: against an explicit per-sequence autograd loop ----------------------------


class _Grab(TrainerCallback):
    def __init__(self) -> None:
        self.seen: dict = {}

    def on_logps(self, trainer, batch, seq, pair, per_pair_loss):
        if not self.seen:
            self.seen = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}


def _explicit(model, batch):
    """Summed response log-probs from the full logits, and the [2B, 2B] Gram of their parameter gradients
    (one backward per sequence), and log sum_v pi(v)^2 per token; no preflens code on this path."""
    ids, am, rm = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    logits = model(input_ids=ids, attention_mask=am).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1)
    tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    m = rm[:, 1:].double()
    lp = (tok * m).sum(1)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = [
        torch.cat([g.flatten() for g in torch.autograd.grad(lp[s], params, retain_graph=True)])
        for s in range(len(lp))
    ]  # noqa: E501
    g = torch.stack(rows)
    lss = torch.logsumexp(2 * logp, -1).detach()
    w = torch.exp(((tok.detach() - lss) * m).sum(1) / m.sum(1))
    return lp.detach(), g @ g.T, w


def test_use_weighting_step_entanglement_matches_an_explicit_loop(tmp_path):
    model, tok = tiny_model(hidden_size=32, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # WPO's weights far from 1
    init = copy.deepcopy(model)
    grab = _Grab()
    cfg = _cfg(tmp_path, loss="sigmoid", loss_kwargs={"use_weighting": True}, step_entanglement=True)
    run = Trainer(cfg, model=model, tokenizer=tok, callbacks=[grab]).train()
    row = next(json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x)
    lp, gram, w = _explicit(init, grab.seen)
    b = lp.shape[0] // 2
    i = torch.arange(b)
    gw2, gl2, inner = gram[i, i], gram[i + b, i + b], gram[i, i + b]
    cos = inner / (gw2.sqrt() * gl2.sqrt())
    # step 1: policy = reference, so sigmoid's d_w = d_l = beta/2, times WPO's w_w w_l (detached)
    d = BETA / 2 * w[:b] * w[b:]
    assert float(d.max() / d.min()) > 1.5  # the weights differ between pairs: the check has teeth
    move_c = d * gw2 - d * inner  # Yuan et al. 2024, arXiv 2410.13828, Sec. 3 (unit step)
    move_r = d * inner - d * gl2
    assert row["entanglement/cosine"] == pytest.approx(float(cos.mean()), rel=1e-4, abs=1e-6)
    assert row["entanglement/inner"] == pytest.approx(float(inner.mean()), rel=1e-4)
    assert row["entanglement/norm_w"] == pytest.approx(float(gw2.sqrt().mean()), rel=1e-4)
    assert row["entanglement/norm_l"] == pytest.approx(float(gl2.sqrt().mean()), rel=1e-4)
    assert row["entanglement/frac_cond1_violated"] == float((move_c < 0).double().mean())
    assert row["entanglement/frac_cond2_violated"] == float((move_r > 0).double().mean())


def test_use_weighting_with_probe_every_runs_and_weights_the_probe_pairs(tmp_path):
    """`--probe-every` with use_weighting: the probe's margin weights at step 0 are beta/2 w_w w_l."""
    model, tok = tiny_model(hidden_size=32, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    init = copy.deepcopy(model)
    cfg = _cfg(tmp_path, loss="sigmoid", loss_kwargs={"use_weighting": True}, probe_every=1, probe_pairs=3)
    trainer = Trainer(cfg, model=model, tokenizer=tok)
    run = trainer.train()
    probes = pd.read_parquet(run / "probes.parquet")
    s0 = probes[probes.step == 0].sort_values("pair_id")
    from preflens.data.collate import collate_pairs

    items = {it.pair_id: it for it in list(trainer.eval_items) + list(trainer.train_items)}
    batch = collate_pairs([items[int(p)] for p in s0.pair_id], tok.pad_token_id)
    _, _, w = _explicit(init, batch)
    b = len(s0)
    want = BETA / 2 * w[:b] * w[b:]
    torch.testing.assert_close(torch.tensor(s0.d_w.to_numpy(), dtype=torch.float64), want, rtol=1e-4, atol=0)
    assert not math.isclose(float(want[0]), BETA / 2, rel_tol=0.1)
