"""User journeys through the diagnostics commands: what a user hits that the unit tests did not.

Each test reproduces one defect found in a QA pass (the command line in its docstring) on the tiny
random model, so the default run stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_report_shows_step_entanglement_without_probes(tmp_path: Path) -> None:
    """`preflens train --step-entanglement` (no --probe-every) then `preflens report RUN`.

    The train rows carry `entanglement/cosine` and `entanglement/frac_cond{1,2}_violated`; the report
    used to read only probe rows and said "no probe rows ... (train with probes on)".
    """
    from preflens.report import generate_report

    run = tmp_path / "run"
    run.mkdir()
    rows = []
    cond1 = [0.0, 0.5, 1.0, 0.5]
    for step in range(1, 5):
        rows.append(
            {
                "step": step,
                "split": "train",
                "loss": 0.69,
                "logps/chosen": -50.0 - step,
                "logps/rejected": -50.0 - 2 * step,
                "entanglement/cosine": 0.8,
                "entanglement/inner": 10.0,
                "entanglement/frac_cond1_violated": cond1[step - 1],
                "entanglement/frac_cond2_violated": 0.0,
            }
        )
    _write_jsonl(run / "metrics.jsonl", rows)
    out, findings = generate_report(run)
    page = out.read_text()
    assert (run / "plots" / "entanglement.png").exists()
    assert "no probe rows in metrics.jsonl" not in page
    text = " ".join(f.text for f in findings if f.kind == "entanglement")
    # means over the steps, written out: cond1 (0 + .5 + 1 + .5) / 4 = 50%, cosine 0.80
    assert "condition 1 (chosen rises) violated in 50% of training batches" in text
    assert "0.80" in text
    assert "training batch" in text  # says where the numbers come from


# ---------------------------------------------------------------------------------------------
# preflens ches / probe on the datasets TRL users have
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random Llama + word-level tokenizer (`--model DIR`)."""
    from preflens.models import tiny_model

    root = tmp_path_factory.mktemp("tiny") / "m"
    model, tok = tiny_model(hidden_size=32, seed=0)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


def _pairs(n: int, seed: int = 1) -> list[dict]:
    from preflens.data.synthetic import sentiment_pairs

    return [
        {k: r[k] for k in ("prompt", "chosen", "rejected")}
        for r in sentiment_pairs(n, seed=seed, response_length=4)
    ]


def _cli(*args: str):
    from typer.testing import CliRunner

    from preflens.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_ches_and_probe_map_columns_and_pick_a_split(tiny_dir: Path, tmp_path: Path) -> None:
    """`preflens ches --data DIR --data-split test --prompt-field question ...` (and `probe`).

    The data errors tell users to map their columns with --prompt-field/--chosen-field/--rejected-field,
    and `preflens train` has those flags and --data-split, but ches and probe had none: a dataset
    with other column names, or the test split of a DatasetDict, could not be scored at all.
    """
    import datasets
    import pandas as pd

    rows = _pairs(7)
    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in rows]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(renamed[:4]), "test": datasets.Dataset.from_list(renamed[4:])}
    ).save_to_disk(str(tmp_path / "ds"))
    plain = _write_jsonl(tmp_path / "test.jsonl", rows[4:])  # the same 3 pairs, standard columns
    mapping = ["--prompt-field", "question", "--chosen-field", "good", "--rejected-field", "bad"]

    res = _cli("ches", "--model", tiny_dir, "--data", tmp_path / "ds", "--data-split", "test", *mapping,
               "-o", tmp_path / "mapped.parquet")  # fmt: skip
    assert res.exit_code == 0, res.output
    res = _cli("ches", "--model", tiny_dir, "--data", plain, "-o", tmp_path / "plain.parquet")
    assert res.exit_code == 0, res.output
    mapped, ref = pd.read_parquet(tmp_path / "mapped.parquet"), pd.read_parquet(tmp_path / "plain.parquet")
    assert len(mapped) == 3
    assert mapped["ches"].tolist() == pytest.approx(ref["ches"].tolist(), rel=1e-5)

    res = _cli("probe", "--model", tiny_dir, "--data", tmp_path / "ds", "--data-split", "test", *mapping,
               "-o", tmp_path / "probe_mapped.parquet")  # fmt: skip
    assert res.exit_code == 0, res.output
    res = _cli("probe", "--model", tiny_dir, "--data", plain, "-o", tmp_path / "probe_plain.parquet")
    assert res.exit_code == 0, res.output
    pm, pp = (
        pd.read_parquet(tmp_path / "probe_mapped.parquet"),
        pd.read_parquet(tmp_path / "probe_plain.parquet"),
    )
    assert len(pm) == 3
    assert pm["inner"].tolist() == pytest.approx(pp["inner"].tolist(), rel=1e-4)


def test_ches_and_probe_on_invalid_drop(tiny_dir: Path, tmp_path: Path) -> None:
    """`preflens ches --on-invalid drop` (the flag the data error recommends) skips the bad row."""
    import pandas as pd

    rows = _pairs(4)
    rows[2]["rejected"] = 5  # a number: invalid
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    res = _cli("ches", "--model", tiny_dir, "--data", data, "-o", tmp_path / "s.parquet")
    assert res.exit_code != 0 and "row 2" in str(res.exception)
    res = _cli(
        "ches", "--model", tiny_dir, "--data", data, "-o", tmp_path / "s.parquet", "--on-invalid", "drop"
    )
    assert res.exit_code == 0, res.output
    assert pd.read_parquet(tmp_path / "s.parquet")["pair_index"].tolist() == [0, 1, 3]
    res = _cli(
        "probe", "--model", tiny_dir, "--data", data, "-o", tmp_path / "p.parquet", "--on-invalid", "drop"
    )
    assert res.exit_code == 0, res.output
    assert pd.read_parquet(tmp_path / "p.parquet")["pair_id"].tolist() == [0, 1, 3]


def test_ches_checks_filtered_output_before_scoring(tiny_dir: Path, tmp_path: Path) -> None:
    """`preflens ches ... --drop-top 0.1 --filtered-output kept.txt`: the unwritable suffix was found
    only after the whole dataset had been scored."""
    from preflens.diagnostics.ches_scan import run_ches
    from preflens.errors import PreflensError

    data = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(4))
    out = tmp_path / "s.parquet"
    with pytest.raises(PreflensError, match="kept.txt"):
        run_ches(model=str(tmp_path / "no-such-model"), data=data, output=out, drop_top=0.25,
                 filtered_output=tmp_path / "kept.txt", progress=False)  # fmt: skip
    assert not out.exists() and not (tmp_path / "s.parquet.parts").exists()


def test_probe_token_level_takes_the_first_pairs(tiny_dir: Path, tmp_path: Path) -> None:
    """`preflens probe --token-level 2`: the help says "for the first N pairs"; it measured the N
    shortest (the batches are sorted by length)."""
    import pandas as pd

    rows = _pairs(5)
    rows[0]["chosen"] = rows[0]["chosen"] + " good good good"  # pairs 0 and 1 the longest
    rows[1]["rejected"] = rows[1]["rejected"] + " bad bad bad"
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "p.parquet"
    res = _cli(
        "probe", "--model", tiny_dir, "--data", data, "-o", out, "--token-level", "2", "--batch-size", "2"
    )
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    assert df.loc[df["token/sentence_inner"].notna(), "pair_id"].tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------
# preflens train --probe-every / --probe-pairs
# ---------------------------------------------------------------------------------------------


def _train_cfg(tmp_path: Path, n: int, **kw):
    from preflens.train import TrainConfig

    data = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(n, seed=0))
    base = dict(
        data=str(data),
        output_dir=str(tmp_path / "run"),
        steps=2,
        batch_size=4,
        lr=1e-2,
        eval_every=0,
        save_every=0,
        report_to="none",
        progress=False,
        probe_every=2,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_probe_set_has_the_pairs_asked_for_when_the_eval_split_is_small(tmp_path: Path) -> None:
    """`preflens train --data 12pairs.jsonl --probe-every 2 --probe-pairs 4`: the default eval split
    of 12 pairs has 1 pair, and the probe set silently had 1 pair instead of 4. It now takes the eval
    pairs and fills up with train pairs (by pair id), each row with its own split and reference."""
    import pandas as pd

    from preflens.models import tiny_model
    from preflens.train import train

    model, tok = tiny_model(hidden_size=32, seed=0)
    run = train(_train_cfg(tmp_path, 12, probe_pairs=4, eval_fraction=0.1), model=model, tokenizer=tok)
    probes = pd.read_parquet(run / "probes.parquet")
    assert (probes.groupby("step").size() == 4).all()
    s0 = probes[probes.step == 0]
    assert s0["split"].tolist().count("eval") == 1 and s0["split"].tolist().count("train") == 3
    train_ids = s0.loc[s0.split == "train", "pair_id"].tolist()
    assert train_ids == sorted(train_ids) and len(set(train_ids)) == 3
    # before step 1 the model is the reference: every row's reference is its own log-prob
    assert (s0["chosen"] - s0["ref_chosen"]).abs().max() < 1e-4
    assert (s0["rejected"] - s0["ref_rejected"]).abs().max() < 1e-4


def test_probe_frac_chosen_fell_after_resume_is_against_step_0(tmp_path: Path) -> None:
    """`preflens train --probe-every 2 --steps 2`, then `--resume --steps 4`: probe/frac_chosen_fell
    at step 4 must compare with the start of training (as an uninterrupted run does), not with the
    first probe after the resume."""
    import pandas as pd

    from preflens.models import tiny_model
    from preflens.train import train

    cfg = _train_cfg(tmp_path, 16, probe_pairs=4, eval_fraction=0.25, steps=2, save_every=2, lr=5e-2)
    model, tok = tiny_model(hidden_size=32, seed=0)
    train(cfg, model=model, tokenizer=tok)
    model, tok = tiny_model(hidden_size=32, seed=0)
    cfg.steps, cfg.resume = 6, True
    run = train(cfg, model=model, tokenizer=tok)
    probes = pd.read_parquet(run / "probes.parquet")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for step in (4, 6):
        agg = [r for r in rows if r["split"] == "probe" and r["step"] == step][-1]
        now = probes[probes.step == step].set_index("pair_id")["chosen"]
        start = probes[probes.step == 0].set_index("pair_id")["chosen"]
        expected = float((now < start.loc[now.index]).mean())
        assert agg["probe/frac_chosen_fell"] == pytest.approx(expected), step


# ---------------------------------------------------------------------------------------------
# impossible settings: one-line errors naming the flag, not tracebacks from torch/transformers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--lr", "-1"], "--lr"),  # was: ValueError from torch.optim.RMSprop
        (["--beta", "0"], "--beta"),  # was: a run whose loss has no gradient
    ],
)
def test_displacement_rejects_impossible_settings(tiny_dir: Path, flags: list[str], flag: str) -> None:
    """`preflens displacement --prompt p --chosen good --rejected bad --lr -1`."""
    from preflens.diagnostics.displacement import run_displacement
    from preflens.errors import PreflensError

    lr = float(flags[1]) if flags[0] == "--lr" else 1e-6
    beta = float(flags[1]) if flags[0] == "--beta" else 0.1
    with pytest.raises(PreflensError, match=flag):
        run_displacement(
            model=str(tiny_dir), prompt="is it", chosen="good", rejected="bad", steps=1, lr=lr, beta=beta
        )


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens"),  # was: ValueError from GenerationConfig
        (["--batch-size", "0"], "--batch-size"),  # was: ValueError: range() arg 3 must not be zero
        (["--top-p", "0"], "--top-p"),  # was: accepted (top-p 0 keeps no token)
        (["--top-p", "1.5"], "--top-p"),
        (["--std-threshold", "-1"], "--std-threshold"),  # was: accepted, nothing could be "small"
    ],
)
def test_reward_std_rejects_impossible_settings(
    tiny_dir: Path, tmp_path: Path, flags: list[str], flag: str
) -> None:
    """`preflens reward-std --prompts p.jsonl --reward keyword:good --max-new-tokens 0` etc."""
    from preflens.errors import PreflensError

    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "is it"}, {"prompt": "the dog"}])
    res = _cli("reward-std", "--model", tiny_dir, "--prompts", prompts, "--reward", "keyword:good", "-k", "2",
               "-o", tmp_path / "out", *flags)  # fmt: skip
    assert isinstance(res.exception, PreflensError), res.exception
    assert flag in str(res.exception)


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--lr", "-1"], "--lr"),  # was: ValueError from torch.optim
        (["--kl-coef", "-1"], "--kl-coef"),  # was: accepted (a bonus for moving away from the reference)
        (["--top-p", "0"], "--top-p"),
    ],
)
def test_rft_rejects_impossible_settings(tiny_dir: Path, tmp_path: Path, flags: list[str], flag: str) -> None:
    """`preflens rft --prompts p.jsonl --reward keyword:good --lr -1` etc."""
    from preflens.errors import PreflensError

    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "is it"}, {"prompt": "the dog"}])
    res = _cli("rft", "--model", tiny_dir, "--prompts", prompts, "--reward", "keyword:good", "-k", "2",
               "--steps", "1", "--max-new-tokens", "2", "-o", tmp_path / "run", *flags)  # fmt: skip
    assert isinstance(res.exception, PreflensError), res.exception
    assert flag in str(res.exception)


# ---------------------------------------------------------------------------------------------
# reward-std / rft prompts in TRL's prompt-only format
# ---------------------------------------------------------------------------------------------


def test_load_prompts_reads_trl_prompt_only_datasets(tmp_path: Path) -> None:
    """`preflens reward-std --prompts grpo.parquet --reference-field solution`: TRL's GRPO data is
    prompt-only, often conversational ({"prompt": [{"role": "user", ...}]}) with the answer in a
    column of its own, and in parquet as often as jsonl. load_prompts read jsonl with a string
    `prompt` and a `reference` column only."""
    import pandas as pd

    from preflens.diagnostics.reward_std import load_prompts

    conv = [
        {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "is it good"}],
         "solution": "good"},
        {"prompt": [{"role": "user", "content": "the dog is"}], "solution": "brown"},
    ]  # fmt: skip
    for path in (tmp_path / "p.jsonl", tmp_path / "p.json", tmp_path / "p.parquet"):
        if path.suffix == ".jsonl":
            _write_jsonl(path, conv)
        elif path.suffix == ".json":
            path.write_text(json.dumps(conv))
        else:
            pd.DataFrame(conv).to_parquet(path)
        rows = load_prompts(path, need_reference=True, reference_field="solution")
        assert [r.reference for r in rows] == ["good", "brown"], path
        assert rows[0].messages == conv[0]["prompt"], path
        assert rows[0].prompt == "is it good"  # the text shown in tables and given to rewards: the user turn
    pd.DataFrame([{"question": "is it", "answer": "good"}]).to_csv(tmp_path / "q.csv", index=False)
    rows = load_prompts(tmp_path / "q.csv", prompt_field="question", reference_field="answer")
    assert (rows[0].prompt, rows[0].reference, rows[0].messages) == ("is it", "good", None)


def test_conversational_prompt_goes_through_the_chat_template(tiny_dir: Path, tmp_path: Path) -> None:
    """The system turn of a conversational prompt must reach the model: encode_prompt renders the
    whole conversation with the tokenizer's template (TRL's maybe_apply_chat_template)."""
    from transformers import AutoTokenizer

    from preflens.diagnostics.reward_std import encode_prompt

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "is it good"}]
    want = tok(
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )
    assert encode_prompt(tok, "is it good", messages=msgs) == list(want["input_ids"])


def test_reward_std_and_rft_cli_on_conversational_parquet(tiny_dir: Path, tmp_path: Path) -> None:
    """`preflens reward-std --prompts grpo.parquet --reference-field solution --reward exact` and the
    same for `preflens rft`, end to end."""
    import pandas as pd

    conv = [
        {"prompt": [{"role": "user", "content": q}], "solution": a}
        for q, a in (("is it", "good"), ("a", "dog"))
    ]
    pd.DataFrame(conv).to_parquet(tmp_path / "grpo.parquet")
    res = _cli("reward-std", "--model", tiny_dir, "--prompts", tmp_path / "grpo.parquet", "--reward", "exact",
               "--reference-field", "solution", "-k", "2", "--max-new-tokens", "2", "-o", tmp_path / "rs")  # fmt: skip
    assert res.exit_code == 0, (res.output, res.exception)
    df = pd.read_parquet(tmp_path / "rs" / "reward_std.parquet")
    assert df["prompt"].tolist() == ["is it", "a"]
    res = _cli("rft", "--model", tiny_dir, "--prompts", tmp_path / "grpo.parquet", "--reward", "exact",
               "--reference-field", "solution", "-k", "2", "--max-new-tokens", "2", "--steps", "1",
               "--prompts-per-step", "2", "--initial-sft", "1", "-o", tmp_path / "run")  # fmt: skip
    assert res.exit_code == 0, (res.output, res.exception)


# ---------------------------------------------------------------------------------------------
# a trained run's LoRA adapter (`--model RUN/final`) in the gradient diagnostics
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the tiny model with non-zero A and B (as after training), saved like `final/`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preflens.models import apply_lora

    out = tmp_path_factory.mktemp("adapter") / "final"
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model = apply_lora(base, rank=2, alpha=4, target_modules="all-linear")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return out


def _adapter_inner(adapter: Path, data: Path, pair: int) -> float:
    """<g_w, g_l> over the adapter's LoRA matrices by plain autograd, one sequence at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preflens.data.collate import tokenize_pairs
    from preflens.data.formats import load_pairs

    tok = AutoTokenizer.from_pretrained(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, adapter).eval()
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    items, _ = tokenize_pairs(load_pairs(data)[0], tok)
    it = next(i for i in items if i.pair_id == pair)
    grads = []
    for resp in (it.chosen_ids, it.rejected_ids):
        ids = torch.tensor([list(it.prompt_ids) + list(resp)])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        start = len(it.prompt_ids)
        total = logp[start - 1 :, :].gather(1, ids[0, start:, None]).sum()
        grads.append(torch.autograd.grad(total, params))
    return float(sum((a * b).sum() for a, b in zip(*grads)))


def test_probe_reward_std_rft_take_a_trained_adapter(adapter_dir: Path, tmp_path: Path) -> None:
    """`preflens probe --model RUN/final`: a saved adapter loads frozen, and probe/reward-std said
    "the model has no trainable parameters" (rft: a ValueError from torch.optim). The adapter's LoRA
    matrices are what a further run trains, so they are what the gradients are over."""
    import pandas as pd

    data = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(3))
    res = _cli("probe", "--model", adapter_dir, "--data", data, "-o", tmp_path / "p.parquet")
    assert res.exit_code == 0, (res.output, res.exception)
    df = pd.read_parquet(tmp_path / "p.parquet").set_index("pair_id")
    assert df.loc[1, "inner"] == pytest.approx(_adapter_inner(adapter_dir, data, 1), rel=1e-4)

    prompts = _write_jsonl(tmp_path / "q.jsonl", [{"prompt": "is it"}, {"prompt": "the dog"}])
    common = ["--prompts", prompts, "--reward", "keyword:good", "-k", "2", "--max-new-tokens", "2"]
    res = _cli("reward-std", "--model", adapter_dir, *common, "-o", tmp_path / "rs")
    assert res.exit_code == 0, (res.output, res.exception)
    res = _cli("rft", "--model", adapter_dir, *common, "--steps", "1", "-o", tmp_path / "run")
    assert res.exit_code == 0, (res.output, res.exception)


@pytest.mark.parametrize("command", ["probe", "rft"])
def test_lora_rank_on_an_adapter_is_a_one_line_error(adapter_dir: Path, tmp_path: Path, command: str) -> None:
    """`preflens probe --model RUN/final --lora-rank 4`: was an AttributeError from inside peft."""
    from preflens.errors import PreflensError

    if command == "probe":
        data = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(2))
        args = ["probe", "--data", data, "-o", tmp_path / "p.parquet"]
    else:
        prompts = _write_jsonl(tmp_path / "q.jsonl", [{"prompt": "is it"}])
        args = ["rft", "--prompts", prompts, "--reward", "keyword:good", "-k", "2", "--steps", "1",
                "--max-new-tokens", "2", "-o", tmp_path / "run"]  # fmt: skip
    res = _cli(*args, "--model", adapter_dir, "--lora-rank", "4")
    assert isinstance(res.exception, PreflensError), res.exception
    assert "--lora-rank" in str(res.exception) and "adapter" in str(res.exception)


# ---------------------------------------------------------------------------------------------
# "low reward" for rewards without a known range
# ---------------------------------------------------------------------------------------------


def test_low_reward_is_undefined_when_every_prompt_has_the_same_mean() -> None:
    """`preflens reward-std --reward my_module:fn` where every completion scores 0: the median
    threshold is 0, nothing is *below* it, and the summary said "small std AND low reward 0%" for
    the very case the diagnostic exists to flag. Without a range or --low-reward, equal means leave
    "low" undefined, and the summary says so."""
    from preflens.diagnostics.reward_std import summarize

    rows = [{"reward_mean": 0.0, "reward_std": 0.0, "grad_norm": 0.0} for _ in range(4)]
    s = summarize(rows, std_threshold=0.1)
    assert s["frac_small_std"] == 1.0
    assert s["frac_low_reward"] is None and s["frac_small_std_and_low_reward"] is None
    assert "--low-reward" in s["low_reward_threshold_from"]
    # with a range, or a threshold given, "low" is defined as before
    assert summarize(rows, std_threshold=0.1, value_range=(0.0, 1.0))["frac_small_std_and_low_reward"] == 1.0
    assert summarize(rows, std_threshold=0.1, low_reward=0.5)["frac_low_reward"] == 1.0


def test_reward_std_cli_prints_undefined_low_reward(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The table and reward_std.parquet of that case (no crash formatting None, no `flagged` column)."""
    import pandas as pd

    (tmp_path / "zero_reward.py").write_text(
        "def fn(prompts, completions):\n    return [0.0] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = _write_jsonl(tmp_path / "q.jsonl", [{"prompt": "is it"}, {"prompt": "the dog"}])
    res = _cli("reward-std", "--model", tiny_dir, "--prompts", prompts, "--reward", "zero_reward:fn", "-k", "2",
               "--max-new-tokens", "2", "-o", tmp_path / "rs")  # fmt: skip
    assert res.exit_code == 0, (res.output, res.exception)
    assert "pass --low-reward" in res.output
    df = pd.read_parquet(tmp_path / "rs" / "reward_std.parquet")
    assert "flagged" not in df.columns


def test_rft_keeps_one_low_reward_threshold_across_evaluations(
    tiny_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """`preflens rft --reward my_module:fn --initial-sft 1` (no range, no --low-reward): each evaluation
    took the median of *its own* means as the threshold, so "small std & low reward" before and after
    SFT were measured against different bars. The first evaluation's median now holds for the run."""
    (tmp_path / "len_reward.py").write_text(
        "def fn(prompts, completions):\n    return [float(len(c) % 7) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = _write_jsonl(
        tmp_path / "q.jsonl",
        [{"prompt": p, "reference": "good"} for p in ("is it", "the dog", "a small", "we see", "it was")],
    )
    res = _cli("rft", "--model", tiny_dir, "--prompts", prompts, "--reward", "len_reward:fn", "-k", "3",
               "--max-new-tokens", "3", "--steps", "2", "--eval-every", "1", "--initial-sft", "1",
               "--prompts-per-step", "5", "-o", tmp_path / "run")  # fmt: skip
    assert res.exit_code == 0, (res.output, res.exception)
    evals = json.loads((tmp_path / "run" / "evals.json").read_text())
    assert len(evals) >= 3
    thresholds = {ev["low_reward_threshold"] for ev in evals.values()}
    assert len(thresholds) == 1, evals
    import statistics

    import pandas as pd

    pr = pd.read_parquet(tmp_path / "run" / "prompts.parquet")
    init_means = pr[(pr["phase"] == "init")]["reward_mean"].tolist()
    assert len(init_means) == 5
    assert evals["init"]["low_reward_threshold"] == pytest.approx(statistics.median(init_means))
    assert all("init" in ev["low_reward_threshold_from"] for ph, ev in evals.items() if ph != "init")


# ---------------------------------------------------------------------------------------------
# devices: the gradient diagnostics use the GPU when there is one, as ches and reward-std do
# ---------------------------------------------------------------------------------------------


def test_probe_and_displacement_ask_for_the_gpu_by_default(
    tiny_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """`preflens probe --data D` and `preflens displacement ...` on a GPU machine ran on the CPU:
    probe's --device defaulted to cpu, and displacement loaded the model on the CPU with no --device
    at all (hours on a 1B model). Both now default to `auto` (a GPU if torch sees one)."""
    import preflens.models as models

    asked: list[str] = []
    real = models.load_model

    def spy(name=None, **kw):
        asked.append(kw.get("device", "cpu"))
        return real(name, **kw)

    monkeypatch.setattr(models, "load_model", spy)
    data = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(2))
    res = _cli("probe", "--model", tiny_dir, "--data", data, "-o", tmp_path / "p.parquet")
    assert res.exit_code == 0, (res.output, res.exception)
    res = _cli("displacement", "--model", tiny_dir, "--prompt", "is it", "--chosen", "good", "--rejected", "bad",
               "--steps", "1")  # fmt: skip
    assert res.exit_code == 0, (res.output, res.exception)
    res = _cli("displacement", "--model", tiny_dir, "--prompt", "is it", "--chosen", "good", "--rejected", "bad",
               "--steps", "1", "--device", "cpu")  # fmt: skip
    assert res.exit_code == 0, (res.output, res.exception)
    assert asked == ["auto", "auto", "cpu"]


def test_probe_every_with_no_probe_pairs_is_an_error(tmp_path: Path) -> None:
    """`preflens train --probe-every 5 --probe-pairs 0`: ran without a single probe and said nothing."""
    from preflens.errors import PreflensError
    from preflens.models import tiny_model
    from preflens.train import train

    model, tok = tiny_model(hidden_size=32, seed=0)
    with pytest.raises(PreflensError, match="--probe-pairs"):
        train(_train_cfg(tmp_path, 8, probe_pairs=0, eval_fraction=0.25), model=model, tokenizer=tok)


def test_imbalance_ratio_median_of_an_even_batch_is_the_usual_median() -> None:
    """metrics.jsonl's `imbalance/ratio` took torch.median, the *lower* of the two middle values of an
    even batch, while `preflens probe` and the report use pandas' median (their mean): the same pairs
    gave two different "medians". Log ratios 0, 1, 2, 3: the median is 1.5."""
    import math

    import torch

    from preflens.diagnostics.imbalance import ImbalanceStats, imbalance_metrics

    lr = torch.tensor([3.0, 0.0, 2.0, 1.0])
    st = ImbalanceStats(lr, lr.exp(), torch.full((4,), 0.5), torch.ones(4), torch.ones(4))
    assert imbalance_metrics(st)["imbalance/ratio"] == pytest.approx(math.exp(1.5))
    odd = torch.tensor([5.0, 0.0, 1.0])
    st = ImbalanceStats(odd, odd.exp(), torch.full((3,), 0.5), torch.ones(3), torch.ones(3))
    assert imbalance_metrics(st)["imbalance/ratio"] == pytest.approx(math.exp(1.0))


@pytest.mark.parametrize("command", ["ches", "probe"])
def test_output_that_is_not_parquet_is_refused(tiny_dir: Path, tmp_path: Path, command: str) -> None:
    """`preflens ches --data D -o scores.csv`: wrote parquet bytes into a file named .csv."""
    data = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(2))
    res = _cli(command, "--model", tiny_dir, "--data", data, "-o", tmp_path / "scores.csv")
    assert res.exit_code != 0
    assert ".parquet" in str(res.exception)
    assert not (tmp_path / "scores.csv").exists()


# ---------------------------------------------------------------------------------------------
# sequence_gram on the model families users bring (Gemma, Qwen3, OPT), against plain autograd
# ---------------------------------------------------------------------------------------------


def _family_model(family: str):
    import torch
    import transformers

    v = 64
    common = dict(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    cfg = {
        "gemma": lambda: transformers.GemmaConfig(head_dim=8, **common),
        "gemma2": lambda: transformers.Gemma2Config(head_dim=8, **common),
        "gemma3_text": lambda: transformers.Gemma3TextConfig(head_dim=8, **common),
        "qwen3": lambda: transformers.Qwen3Config(head_dim=8, **common),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "mistral": lambda: transformers.MistralConfig(**common),
        "phi": lambda: transformers.PhiConfig(
            **{k: v for k, v in common.items() if k != "num_key_value_heads"}
        ),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(
            **{k: v for k, v in common.items() if k != "num_key_value_heads"}
        ),
        "falcon": lambda: transformers.FalconConfig(
            **{k: v for k, v in common.items() if k not in ("num_key_value_heads", "intermediate_size")}
        ),
        "opt": lambda: transformers.OPTConfig(
            vocab_size=v,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),  # fmt: skip
    }[family]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # norms away from their init (Gemma's 1 + w with w = 0 would hide a missing term)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _loop_gram(model, ids, am, rm, names=None):
    """Per-sequence autograd: G[s, t] = <grad logp_s, grad logp_t> over all (or the named) parameters."""
    import torch

    params = [p for n, p in model.named_parameters() if p.requires_grad and (names is None or n in names)]
    rows = []
    for s in range(ids.shape[0]):
        logits = model(input_ids=ids[s : s + 1], attention_mask=am[s : s + 1]).logits.float()
        lp = torch.log_softmax(logits[0, :-1], -1).gather(1, ids[s, 1:, None])[:, 0]
        g = torch.autograd.grad((lp * rm[s, 1:].float()).sum(), params, allow_unused=True)
        rows.append(
            torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)])
        )
    m = torch.stack(rows).double()
    return m @ m.T


@pytest.mark.parametrize(
    "family",
    ["gemma", "gemma2", "gemma3_text", "qwen3", "opt", "qwen2", "mistral", "phi", "gpt_neox", "falcon"],
)
def test_sequence_gram_is_exact_on_other_model_families(family: str) -> None:
    """`preflens probe --model google/gemma-2b` gave gradient inner products off by 20-50%
    (Gemma's embedding module multiplies its lookup by sqrt(d), which the embedding rule ignored);
    Qwen3/Gemma3 (per-head q/k norms) and OPT (flattened [N*T, d] layers) raised GramError. OPT's
    learned position embedding (its input is the attention mask, not ids) is refused by name, so it
    is left out with `params=`."""
    import torch

    from preflens.grad import GramError, sequence_gram

    model = _family_model(family)
    names = None
    if family == "opt":
        names = [n for n, _ in model.named_parameters() if "embed_positions" not in n]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (4, 10), generator=g)
    am = torch.ones_like(ids)
    am[2, 7:] = 0
    am[3, 8:] = 0
    rm = torch.zeros_like(ids, dtype=torch.bool)
    rm[:, 5:] = True
    rm &= am.bool()
    if family == "opt":
        with pytest.raises(GramError, match="OPTLearnedPositionalEmbedding"):
            sequence_gram(model, ids, am, rm)
    got = sequence_gram(model, ids, am, rm, params=names).double()
    want = _loop_gram(model, ids, am, rm, names)
    assert (got - want).abs().max() / want.abs().max() < 1e-4


@pytest.mark.parametrize("family", ["gemma", "qwen3"])
def test_step_entanglement_fused_gradients_are_exact_on_gemma_and_qwen3(family: str) -> None:
    """`preflens train --step-entanglement` writes the weight gradients from the same hooks (autograd
    skips them): on Gemma the embedding gradient missed the sqrt(d) factor, so the *training* itself
    went wrong, not only the statistics. The fused .grad must equal an ordinary backward's."""
    import copy

    import torch

    from preflens.grad import StepGramCapture
    from preflens.logprobs import sequence_logps

    model = _family_model(family)
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 64, (4, 9), generator=g)
    am = torch.ones_like(ids)
    am[3, 6:] = 0
    rm = torch.zeros_like(ids, dtype=torch.bool)
    rm[:, 4:] = True
    rm &= am.bool()
    want = _loop_gram(model, ids, am, rm)
    c = torch.tensor([0.5, -1.0, 2.0, 0.25])
    (c * sequence_logps(twin, ids, am, rm).logps).sum().backward()
    cap = StepGramCapture(model, am, rm, fuse_grads=True)
    with cap:
        lp = sequence_logps(model, ids, am, rm).logps
        cap.watch(lp)
        (c * lp).sum().backward()
    got = cap.result().double()  # the log-prob Gram (the capture divides out the loss weights c)
    assert (got - want).abs().max() / want.abs().max() < 1e-4
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


def test_rouge_l_ignores_punctuation_like_rouge_score() -> None:
    """`preflens reward-std --reward rougeL` on the embedded model: "yes, it is good. ..." scored 0
    against the reference "good" (words split on whitespace only: "good." != "good"), so prompts the
    model answers well were flagged as small-std, low-reward. ROUGE's tokenizer drops punctuation."""
    from preflens.rewards import get_reward, rouge_l

    # candidate words: yes it is good smol accepting (6); LCS with "good" = 1: P = 1/6, R = 1, F = 2/7
    assert rouge_l("yes, it is good. smol accepting", "good") == pytest.approx(2 / 7)
    assert rouge_l("Good!", "good") == 1.0
    assert rouge_l("the cat-sat", "the cat sat") == 1.0  # "cat-sat" is two words, as in rouge-score
    assert rouge_l("...", "good") == 0.0
    assert rouge_l("café au lait", "Café") == pytest.approx(2 * (1 / 3) / (1 + 1 / 3))  # non-ASCII words kept
    assert get_reward("rougeL")(["q"], ["It is good."], references=["good"]) == [
        pytest.approx(2 * (1 / 3) / (1 + 1 / 3))
    ]


def test_ches_score_is_deterministic_on_a_model_in_training_mode() -> None:
    """`ches_score(model, ...)` right after training (the model still in train mode, dropout on) gave a
    different score at every call; scoring is inference: dropout must be off, and the mode restored."""
    import torch

    from preflens.data.collate import collate_pairs, tokenize_pairs
    from preflens.data.formats import load_pairs
    from preflens.diagnostics.ches import ches_score
    from preflens.models import tiny_model

    model, tok = tiny_model(hidden_size=32, seed=0)
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    items, _ = tokenize_pairs(load_pairs(_pairs(3))[0], tok)
    b = collate_pairs(items, tok.pad_token_id)
    n = len(items)
    args = [b["input_ids"][:n], b["attention_mask"][:n], b["response_mask"][:n],
            b["input_ids"][n:], b["attention_mask"][n:], b["response_mask"][n:]]  # fmt: skip
    model.eval()
    want = ches_score(model, *args)
    model.train()
    torch.manual_seed(0)
    first = ches_score(model, *args)
    second = ches_score(model, *args)
    assert model.training
    assert torch.allclose(first, want) and torch.allclose(second, want)


def test_pair_and_token_entanglement_measure_in_eval_mode() -> None:
    """README's `pair_entanglement(model, batch, get_loss("dpo"), ref=...)` on a model in train mode
    (dropout on) gave other numbers at every call; the papers' gradients are eval-mode ones, as
    `preflens probe` and the in-training probes take them. The model's mode is restored."""
    import torch

    from preflens.data.collate import collate_pairs, tokenize_pairs
    from preflens.data.formats import load_pairs
    from preflens.diagnostics.entanglement import pair_entanglement, token_entanglement
    from preflens.losses import get_loss
    from preflens.models import tiny_model

    model, tok = tiny_model(hidden_size=32, seed=0)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    items, _ = tokenize_pairs(load_pairs(_pairs(2))[0], tok)
    batch = collate_pairs(items, tok.pad_token_id)
    ref = (torch.full((2,), -40.0), torch.full((2,), -40.0))
    model.eval()
    want = pair_entanglement(model, batch, get_loss("dpo"), ref=ref).inner
    want_tok = token_entanglement(model, batch, 0).sentence_inner
    model.train()
    torch.manual_seed(0)
    got = [pair_entanglement(model, batch, get_loss("dpo"), ref=ref).inner for _ in range(2)]
    got_tok = token_entanglement(model, batch, 0).sentence_inner
    assert model.training
    assert all(torch.allclose(g, want, rtol=1e-5) for g in got)
    assert got_tok == pytest.approx(want_tok, rel=1e-5)


def test_reward_std_resume_continues_a_partial_run(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """`preflens reward-std ...` stopped by a failing reward (or Ctrl-C) after 2 of 4 prompts: the
    error said the first 2 are saved, but the only way on was --overwrite, sampling them again.
    `--resume` keeps the saved prompts and does the rest; other settings are refused."""
    import pandas as pd

    from preflens.commands.reward_std import run_reward_std
    from preflens.errors import PreflensError
    from preflens.rewards import RewardError

    flag = tmp_path / "server_up"
    (tmp_path / "flaky_reward.py").write_text(
        "from pathlib import Path\n"
        "def fn(prompts, completions):\n"
        f"    if 'boom' in prompts and not Path({str(flag)!r}).exists():\n"
        "        raise RuntimeError('reward server down')\n"
        "    return [float(len(c) % 3) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = _write_jsonl(
        tmp_path / "q.jsonl", [{"prompt": p} for p in ("is it", "the dog", "boom", "a small")]
    )
    out = tmp_path / "out"
    kw = dict(model=str(tiny_dir), prompts=prompts, reward="flaky_reward:fn", k=2, output_dir=out,
              max_new_tokens=2, batch_size=2)  # fmt: skip
    with pytest.raises(RewardError, match="2 of 4"):
        run_reward_std(**kw)
    before = pd.read_parquet(out / "reward_std.parquet")
    samples_before = pd.read_parquet(out / "samples.parquet")
    flag.write_text("up")
    with pytest.raises(PreflensError, match="--resume"):
        run_reward_std(**kw)  # the saved results are not silently replaced
    with pytest.raises(PreflensError, match="k"):
        run_reward_std(**{**kw, "k": 3}, resume=True)
    summary = run_reward_std(**kw, resume=True)
    after = pd.read_parquet(out / "reward_std.parquet")
    assert after["prompt_id"].tolist() == ["0", "1", "2", "3"]
    assert summary["partial"] is False and summary["num_prompts"] == 4
    pd.testing.assert_frame_equal(after.iloc[:2][before.columns].reset_index(drop=True), before)
    samples = pd.read_parquet(out / "samples.parquet")
    assert len(samples) == 8
    pd.testing.assert_frame_equal(samples.iloc[:4].reset_index(drop=True), samples_before)


def test_ches_vs_change_names_a_missing_scores_file(tmp_path: Path) -> None:
    """`ches_vs_change("scores.parquet", RUN)` before running `preflens ches`: a bare FileNotFoundError."""
    from preflens.diagnostics.displacement import ches_vs_change
    from preflens.errors import PreflensError

    with pytest.raises(PreflensError, match="preflens ches"):
        ches_vs_change(tmp_path / "scores.parquet", tmp_path)


def test_displacement_table_shows_small_probabilities(capsys) -> None:
    """`preflens displacement ...` on the embedded model listed 'Section' as a token whose probability
    rose most with "0.0000 -> 0.0000": four decimals hide the probabilities the ranking is about."""
    from preflens.commands.displacement import _print

    run = {
        "prompt": "p", "chosen": "No", "rejected": "Never", "warnings": [],
        "p_chosen_before": 0.0763, "p_chosen_after": 0.7117, "p_rejected_before": 2e-4, "p_rejected_after": 3e-6,
        "decrease": 0.0, "chosen_fell": False, "sign_agreement": 0.5, "rank_correlation": 0.2,
        "top_increase": [{"token": "Section", "p_before": 3.1e-5, "p_after": 4.9e-5, "logp_change": 0.47,
                          "prediction": -0.19}],
    }  # fmt: skip
    _print(
        {
            "runs": [run],
            "settings": {"steps": 5, "optimizer": "rmsprop", "lr": 1e-6, "beta": 0.1, "mode": "model"},
        }
    )
    out = capsys.readouterr().out
    assert "3.1e-05" in out and "4.9e-05" in out
    assert "3e-06" in out  # pi(y-) after


def test_probe_says_why_pairs_were_dropped_by_tokenization(tiny_dir: Path, tmp_path: Path) -> None:
    """`preflens probe --max-length 5`: "no pairs left after tokenization" without saying why; and
    when only some were dropped, nothing said so (the summary counted the survivors)."""
    from preflens.diagnostics.probe_table import run_probe
    from preflens.errors import PreflensError

    rows = _pairs(3)
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(PreflensError, match="too_long"):
        run_probe(data=data, output=tmp_path / "p.parquet", model=str(tiny_dir), max_length=5)
    rows[1]["prompt"] = " ".join(["good"] * 40)  # with a 40-word response: no room in 30 tokens
    rows[1]["chosen"] = " ".join(["nice"] * 40)
    data = _write_jsonl(tmp_path / "pairs2.jsonl", rows)
    s = run_probe(data=data, output=tmp_path / "p.parquet", model=str(tiny_dir), max_length=30,
                  on_invalid="error")  # fmt: skip
    assert s["pairs"] == 2 and s["skipped_by_tokenization"] == {"too_long": 1}


def test_sequence_gram_checks_its_input_shapes() -> None:
    """`sequence_gram(model, ids, attention_mask[:, :5], response_mask)`: a RuntimeError from deep
    inside the model; DESIGN's contract is [N, T] tensors of one shape, say so."""
    import torch

    from preflens.errors import PreflensError
    from preflens.grad import sequence_gram
    from preflens.models import tiny_model

    model, _ = tiny_model(hidden_size=32, seed=0)
    ids = torch.randint(3, 100, (2, 6))
    am = torch.ones_like(ids)
    rm = torch.zeros_like(ids, dtype=torch.bool)
    rm[:, 3:] = True
    for bad in ((ids, am[:, :5], rm), (ids, am, rm[:, :5]), (ids[0], am[0], rm[0])):
        with pytest.raises(PreflensError, match=r"\[N, T\]"):
            sequence_gram(model, *bad)


def test_ctrl_c_says_aborted_and_exits_130(monkeypatch, capsys, tmp_path) -> None:
    """Ctrl-C during `preflens probe`/`ches`/`reward-std`: exit 130, and a word saying so (typer
    returns 130 silently in non-standalone mode, so the "aborted" branch of main() never ran)."""
    import sys

    import preflens.commands.probe as probe_cmd
    from preflens.cli import main

    def interrupted(**_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(probe_cmd, "run_probe", interrupted)
    data = tmp_path / "x.jsonl"  # a valid file: `probe` checks its data before it starts
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    monkeypatch.setattr(sys, "argv", ["preflens", "probe", "--data", str(data)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 130
    assert "aborted" in capsys.readouterr().err
