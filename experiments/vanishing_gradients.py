"""Vanishing gradients in RFT on a controlled task (Razin et al. 2024, arXiv 2310.20703; apple/ml-rlgrad's controlled setting).

Setting (DESIGN.md "Reference settings"): each prompt is one token q_i, the answer one token a_j out of
C labels; reward +1 if the sampled token is the prompt's correct label, -1 otherwise. Because the answer
is a single token, everything is exact: V_x = sum_y p(y|x) r(x,y), the reward std
sqrt(sum_y p(y|x)(r(x,y) - V_x)^2), and grad V_x by autograd over the full softmax.

A tiny Llama is first *pre-trained* (plain cross-entropy, not RFT) so that the prompts fall into three
groups, like apple/ml-rlgrad's "10% of labels modified" but with the groups made explicit:
- `wrong`:   confidently wrong (trained on a wrong label)       -> small reward std, low reward;
- `unsure`:  uncertain (trained on a uniform target over 3 labels, one correct) -> large std, low-ish reward;
- `right`:   confidently right                                   -> small std, high reward.
Then preflens.rft trains with RLOO on the true labels (K=10 samples per prompt, as in ml-rlgrad),
(a) directly and (b) after a short initial SFT phase on the true labels of a fraction of the prompts.
The script prints per-group exact reward/std/grad-norm tables and the frac-small-std before/after SFT.

    .venv/bin/python experiments/vanishing_gradients.py            # ~1-2 CPU minutes
    .venv/bin/python experiments/vanishing_gradients.py --optimizer adamw
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from preflens.data.prompts import PromptRow
from preflens.rewards import ExactMatch
from preflens.training.rft import RFTConfig, train_rft

GROUPS = ("wrong", "unsure", "right")


def build(num_prompts: int, num_labels: int, seed: int):
    """Word-level tokenizer over q0..q{P-1}, a0..a{C-1} and a 2-layer Llama (hidden 32)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for i in range(num_prompts):
        vocab[f"q{i}"] = len(vocab)
    for j in range(num_labels):
        vocab[f"a{j}"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg), tok, vocab


def next_token_probs(model, prompt_ids: torch.Tensor) -> torch.Tensor:
    """p(y | q_i) over the whole vocabulary for one-token prompts [P] -> [P, V]."""
    return model(input_ids=prompt_ids[:, None]).logits[:, -1].float().softmax(-1)


def pretrain(model, prompt_ids, targets, steps: int, lr: float) -> None:
    """Cross-entropy to per-prompt target distributions (targets [P, V]) — the 'pre-trained' model."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        logp = model(input_ids=prompt_ids[:, None]).logits[:, -1].float().log_softmax(-1)
        loss = -(targets * logp).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def exact_stats(model, prompt_ids, correct_ids) -> dict[str, torch.Tensor]:
    """Exact V_x, reward std and ||grad V_x|| (r = +1 on the correct token, -1 on any other)."""
    params = [p for p in model.parameters() if p.requires_grad]
    probs = next_token_probs(model, prompt_ids)
    r = torch.full_like(probs, -1.0)
    r[torch.arange(len(correct_ids)), correct_ids] = 1.0
    value = (probs * r).sum(-1)  # V_x = sum_y p(y|x) r(x, y)
    std = (probs * (r - value.detach()[:, None]) ** 2).sum(-1).clamp_min(0).sqrt()
    norms = []
    for i in range(len(prompt_ids)):
        g = torch.autograd.grad(value[i], params, retain_graph=True)
        norms.append(math.sqrt(sum(float((x**2).sum()) for x in g)))
    return {"value": value.detach(), "std": std.detach(), "grad_norm": torch.tensor(norms)}


def group_table(
    stats: dict[str, torch.Tensor], groups: list[str], std_threshold: float = 0.1
) -> dict[str, dict[str, float]]:
    """Per-group means of the exact quantities, and the share of prompts stuck (small std, V_x < 0)."""
    out = {}
    stuck = (stats["std"] < std_threshold) & (stats["value"] < 0)
    for g in GROUPS:
        idx = [i for i, x in enumerate(groups) if x == g]
        out[g] = {k: float(v[idx].mean()) for k, v in stats.items()}
        out[g]["n"] = len(idx)
        out[g]["stuck"] = float(stuck[idx].float().mean())
    return out


def fmt(title: str, table: dict[str, dict[str, float]]) -> str:
    lines = [
        f"{title}",
        "| group | n | exact reward V_x | exact std | exact ‖∇V_x‖ | stuck (std < 0.1 and V_x < 0) |",
        "|---|---|---|---|---|---|",
    ]
    for g, row in table.items():
        lines.append(
            f"| {g} | {row['n']} | {row['value']:+.3f} | {row['std']:.3f} | {row['grad_norm']:.2e} | {row['stuck']:.0%} |"
        )
    return "\n".join(lines)


def sampled_table(run_dir: Path, groups: list[str], step: int) -> str:
    """The preflens estimates (K samples) at one evaluation, per group, beside the exact values."""
    import pandas as pd

    df = pd.read_parquet(run_dir / "prompts.parquet")
    df = df[(df["split"] == "eval") & (df["step"] == step)].copy()
    df["group"] = [groups[int(p)] for p in df["prompt_id"]]
    agg = df.groupby("group")[["reward_mean", "reward_std", "grad_norm"]].mean()
    lines = ["| group | sampled reward | sampled std (ddof=1) | RLOO ‖g‖ |", "|---|---|---|---|"]
    for g in GROUPS:
        r = agg.loc[g]
        lines.append(f"| {g} | {r['reward_mean']:+.3f} | {r['reward_std']:.3f} | {r['grad_norm']:.2e} |")
    return "\n".join(lines)


def md(df) -> str:
    """A pandas frame as a markdown table (no tabulate dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| step | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for idx, row in df.iterrows():
        lines.append(f"| {idx} | " + " | ".join(f"{v:+.3f}" for v in row.tolist()) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--labels", type=int, default=8)
    ap.add_argument("--rft-steps", type=int, default=100)
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    ap.add_argument("--sft-steps", type=int, default=10)
    ap.add_argument("--sft-lr", type=float, default=None, help="default: --lr")
    ap.add_argument("--sft-fraction", type=float, default=1.0)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="run dirs + results.json (default: a temp dir)")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest for a model this small)"
    )
    ap.add_argument(
        "--unsure-labels",
        type=int,
        default=3,
        help="'unsure' prompts spread over this many labels (incl. the correct one)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    out = args.out or Path(tempfile.mkdtemp(prefix="vanishing_gradients_"))
    out.mkdir(parents=True, exist_ok=True)

    model, tok, vocab = build(args.prompts, args.labels, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    n_wrong, n_right = args.prompts // 4, args.prompts // 4
    groups = ["wrong"] * n_wrong + ["right"] * n_right + ["unsure"] * (args.prompts - n_wrong - n_right)
    groups = [groups[i] for i in torch.randperm(args.prompts, generator=gen).tolist()]
    correct = torch.randint(args.labels, (args.prompts,), generator=gen)
    label_ids = torch.tensor([vocab[f"a{j}"] for j in range(args.labels)])
    prompt_ids = torch.tensor([vocab[f"q{i}"] for i in range(args.prompts)])
    correct_ids = label_ids[correct]

    # pre-training targets: wrong -> a different label, right -> the label, unsure -> uniform over labels
    targets = torch.zeros(args.prompts, len(vocab))
    for i, g in enumerate(groups):
        if g == "wrong":
            targets[
                i,
                label_ids[
                    (correct[i] + 1 + torch.randint(args.labels - 1, (1,), generator=gen)) % args.labels
                ],
            ] = 1
        elif g == "right":
            targets[i, correct_ids[i]] = 1
        else:  # uniform over the correct label and (unsure_labels - 1) random wrong ones
            wrong = [j for j in torch.randperm(args.labels, generator=gen).tolist() if j != int(correct[i])]
            cands = [int(correct[i])] + wrong[: args.unsure_labels - 1]
            targets[i, label_ids[cands]] = 1 / len(cands)
    pretrain(model, prompt_ids, targets, args.pretrain_steps, lr=1e-2)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}

    rows = [PromptRow(i, f"q{i}", f"a{int(correct[i])}") for i in range(args.prompts)]
    reward = ExactMatch(correct=1.0, wrong=-1.0)  # the +1 / -1 reward of apple/ml-rlgrad
    results: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()}}
    init_tab = group_table(exact_stats(model, prompt_ids, correct_ids), groups)
    results["init"] = init_tab
    report = [fmt("after pre-training (before RFT)", init_tab)]

    def run(name: str, initial_sft: int) -> dict:
        model.load_state_dict(init_state)
        cfg = RFTConfig(
            steps=args.rft_steps,
            k=args.k,
            prompts_per_step=args.prompts_per_step,
            lr=args.lr,
            optimizer=args.optimizer,
            max_grad_norm=None,
            max_new_tokens=1,
            chat_template=False,
            eval_every=max(1, args.rft_steps // 4),
            initial_sft=initial_sft,
            sft_fraction=args.sft_fraction,
            sft_lr=args.sft_lr,
            sft_batch_size=args.prompts_per_step,
            std_threshold=0.1,
            seed=args.seed,
        )
        summary = train_rft(model, tok, rows, reward, cfg, out / name, overwrite=True)
        tab = group_table(exact_stats(model, prompt_ids, correct_ids), groups)
        import pandas as pd

        df = pd.read_parquet(out / name / "prompts.parquet")
        df = df[df["split"] == "eval"].copy()
        df["group"] = [groups[int(p)] for p in df["prompt_id"]]
        curve = df.groupby(["step", "group"])["reward_mean"].mean().unstack().round(3)
        return {"table": tab, "summary": summary, "curve": curve}

    rft_only = run("rft_only", 0)
    report.append(
        f"preflens estimates at step 0 (K={args.k}):\n" + sampled_table(out / "rft_only", groups, 0)
    )
    report.append(fmt(f"after {args.rft_steps} RFT steps (no SFT)", rft_only["table"]))
    report.append(
        f"sampled reward per group at the evaluations (K={args.k}), RFT only:\n" + md(rft_only["curve"])
    )
    with_sft = run("sft_then_rft", args.sft_steps)
    report.append(
        fmt(
            f"after {args.sft_steps} SFT steps ({args.sft_fraction:.0%} of prompts) + {args.rft_steps} RFT steps",
            with_sft["table"],
        )
    )
    report.append("sampled reward per group at the evaluations, SFT then RFT:\n" + md(with_sft["curve"]))
    eff = with_sft["summary"]["sft_effect"]
    report.append(
        f"initial SFT: frac small std {eff['frac_small_std_before']:.2f} -> {eff['frac_small_std_after']:.2f}, "
        f"small std & low reward {with_sft['summary']['frac_small_std_and_low_reward']['init']:.2f} -> "
        f"{with_sft['summary']['frac_small_std_and_low_reward']['after_sft']:.2f}, "
        f"sampled reward {eff['reward_mean_before']:+.3f} -> {eff['reward_mean_after']:+.3f}"
    )
    results["rft_only"] = {"table": rft_only["table"], "summary": rft_only["summary"]}
    results["sft_then_rft"] = {"table": with_sft["table"], "summary": with_sft["summary"]}
    results["seconds"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n\n".join(report))
    print(f"\n{time.time() - t0:.0f} s; run dirs and results.json in {out}")


if __name__ == "__main__":
    main()
