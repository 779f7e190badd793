"""WPO's weighting (TRL's `use_weighting`; Zhou et al. 2024, arXiv 2406.11827, Eq. 2) through `preflens train`.

The trainer's own loss path (its forward, the fused head's per-token log sum_v pi(v)^2, the loss) against
TRL's own `DPOTrainer._compute_loss` running TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`) on
a copy of the same tiny Llama with the same batch: batch loss and parameter gradient agree to 1e-6
relative. The evaluation's loss against the weight written out from the model's full logits.
"""

from __future__ import annotations

import collections
import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

from preflens.data.collate import collate_pairs
from preflens.data.synthetic import sentiment_pairs
from preflens.models import tiny_model
from preflens.train import TrainConfig, Trainer, TrainerCallback

pytestmark = pytest.mark.usefixtures("one_thread")
trl = pytest.importorskip("trl")
trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")

BETA = 0.2


def _model():
    model, tok = tiny_model(hidden_size=32, seed=0)
    with torch.no_grad():  # a peaked next-token distribution, so that WPO's weights are far from 1
        model.lm_head.weight.mul_(4.0)
    return model, tok


class _GrabStep2(TrainerCallback):
    """The second step's first micro-batch as the trainer computed it: batch, per-pair loss, gradient."""

    def __init__(self) -> None:
        self.seen: dict = {}

    def on_logps(self, trainer, batch, seq, pair, per_pair_loss):
        if trainer.state.step != 1 or self.seen:
            return
        m = trainer.accelerator.unwrap_model(trainer.model)
        params = [p for p in m.parameters() if p.requires_grad]
        grads = torch.autograd.grad(per_pair_loss.mean(), params, retain_graph=True)
        self.seen = dict(
            batch={k: v.clone() for k, v in batch.items() if torch.is_tensor(v)},
            loss=per_pair_loss.detach().mean(),
            grads=[g.clone() for g in grads],
            model=copy.deepcopy(m),
            lss=(pair.chosen_log_sum_sq.clone(), pair.rejected_log_sum_sq.clone()),
        )


def _train(tmp_path, **loss):
    rows = sentiment_pairs(24, seed=0, response_length=4)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tok = _model()
    init = copy.deepcopy(model)
    grab = _GrabStep2()
    cfg = TrainConfig(
        data=str(tmp_path / "p.jsonl"), output_dir=str(tmp_path / "run"), steps=2, batch_size=4, lr=1e-2,
        eval_every=1, save_every=0, report_to="none", progress=False, eval_fraction=0.2, beta=BETA, **loss,
    )  # fmt: skip
    trainer = Trainer(cfg, model=model, tokenizer=tok, callbacks=[grab])
    run = trainer.train()
    return trainer, run, init, grab.seen


def _trl_loss(policy, ref, batch, use_weighting: bool):
    """TRL's `_compute_loss` on a trainer-like object holding TRL-patched copies of the models."""
    pol, ref = copy.deepcopy(policy), copy.deepcopy(ref)
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1") + (
        ("log_sum_sq_probs",) if use_weighting else ()
    )
    trl_utils.add_fused_lm_head(pol, outputs=outputs)
    trl_utils.add_fused_lm_head(ref)
    args = trl.DPOConfig(
        output_dir="/tmp/preflens-trl-wpo", report_to=[], bf16=False, use_cpu=True, loss_type=["sigmoid"],
        beta=BETA, use_weighting=use_weighting,
    )  # fmt: skip
    t = SimpleNamespace(
        args=args, model=pol, ref_model=ref, aux_loss_enabled=False, precompute_ref_logps=False, beta=BETA,
        loss_types=["sigmoid"], loss_weights=[1.0], ld_alpha=None, f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=1.0, label_smoothing=0.0, use_weighting=use_weighting,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x),
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    pol.train()
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": batch["response_mask"].long(),
    }
    loss = trl_dpo.DPOTrainer._compute_loss(t, pol, inputs, return_outputs=False)
    grads = torch.autograd.grad(loss, [p for p in pol.parameters() if p.requires_grad])
    return loss.detach(), grads


def _flat(gs):
    return torch.cat([g.flatten().double() for g in gs])


def test_use_weighting_train_path_matches_trls_dpo_trainer(tmp_path):
    trainer, run, init, seen = _train(tmp_path, loss="sigmoid", loss_kwargs={"use_weighting": True})
    assert trainer.needs_log_sum_sq and seen
    want, want_g = _trl_loss(seen["model"], init, seen["batch"], use_weighting=True)
    got, got_g = seen["loss"], seen["grads"]
    assert abs(float(got) - float(want)) / abs(float(want)) < 1e-6, (float(got), float(want))
    gw, gg = _flat(want_g), _flat(got_g)
    assert float((gg - gw).norm() / gw.norm()) < 1e-6
    for a, b in zip(got_g, want_g):  # every parameter, elementwise, within float32's precision
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    # the weighting matters on this batch: TRL without it is another number, so the check can fail
    plain, _ = _trl_loss(seen["model"], init, seen["batch"], use_weighting=False)
    assert abs(float(plain) - float(want)) > 0.1 * float(want)


def test_use_weighting_eval_loss_is_wpo_weight_times_log2_at_step_0(tmp_path):
    """At step 0 the policy is the reference, so each eval pair's sigmoid loss is log 2 w_w w_l, with
    w = exp(mean_t(log pi(y_t) - log sum_v pi(v)^2)) written out from the initial model's full logits."""
    trainer, run, init, _ = _train(tmp_path, loss="sigmoid", loss_kwargs={"use_weighting": True})
    ev0 = next(json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x)
    b = collate_pairs(trainer.eval_items, trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = init(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1)
    tok = logp.gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
    lss = torch.logsumexp(2 * logp, -1)
    m = b["response_mask"][:, 1:].double()
    w = torch.exp(((tok - lss) * m).sum(1) / m.sum(1))
    n = w.shape[0] // 2
    want = float((math.log(2) * w[:n] * w[n:]).mean())
    assert ev0["step"] == 0 and ev0["loss"] == pytest.approx(want, rel=1e-5)
    assert want < 0.9 * math.log(2)  # far from the unweighted log 2


def test_compare_runs_use_weighting_beside_plain_dpo(tmp_path):
    """`run_compare` (preflens compare's work) with TRL's options per loss: sigmoid with use_weighting next
    to dpo, same start; at step 0 the eval log-probs agree and the losses differ by WPO's weights."""
    from preflens.compare import run_compare

    rows = sentiment_pairs(16, seed=0, response_length=4)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cmp"
    run_compare(
        ["dpo", "sigmoid"], str(tmp_path / "p.jsonl"), out, model_factory=_model,
        loss_kwargs={"sigmoid": {"use_weighting": True}}, steps=1, batch_size=4, lr=1e-3, eval_every=1,
        report_to="none", save_every=0, progress=False,
    )  # fmt: skip

    def ev0(name):
        rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in rows if r["split"] == "eval" and r["step"] == 0)

    a, b = ev0("dpo"), ev0("sigmoid")
    assert a["logps/chosen"] == pytest.approx(b["logps/chosen"], abs=1e-5)
    assert a["loss"] == pytest.approx(math.log(2), abs=1e-6) and abs(b["loss"] - a["loss"]) > 0.05
