"""More shared tokens between chosen and rejected -> larger gradient inner product (Yuan et al. 2024, arXiv 2410.13828, Sec. 4).

Yuan et al. ("A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement",
arXiv 2410.13828) show that <grad log pi(y_w), grad log pi(y_l)> grows as the chosen and rejected
responses share more tokens, which makes the entanglement conditions of Sec. 3
(<g_w, g_l> < |g_w|^2 for chosen to rise under DPO, <g_w, g_l> < |g_l|^2 for rejected to fall) harder
to meet. This script varies only that: `preflens.data.synthetic.sentiment_pairs(shared_tokens=k)` gives
responses of 8 words that agree at exactly k positions (a shared prefix, or random positions), and for
each k it measures, on a small Llama (2 layers, hidden 64, all parameters):

- the per-pair gradient statistics from `preflens.diagnostics.gram.sequence_gram` (one backward for all
  sequences) via `preflens.diagnostics.entanglement.pair_entanglement`: inner product, cosine, the share
  of pairs violating condition 1 / condition 2 under DPO;
- what DPO then does: 20 full-batch SGD steps on the pairs (lr 0.5, beta 0.1) and the mean change of
  the chosen and rejected log-probs.

Two settings: the random initialisation (where every token's gradient is of similar size, so the
mechanism is clean: a shared token with the same context contributes the same per-token gradient to
both sequences) and after a brief SFT on prompt + chosen (30 Adam steps, as the paper runs SFT before
preference training on its sentiment task; the shared tokens are then well predicted and their
gradients small, so the effect is diluted).

Run: `.venv/bin/python experiments/shared_tokens.py` (CPU, about a minute).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from preflens.data import synthetic
from preflens.data.collate import collate_pairs, tokenize_pairs
from preflens.data.formats import load_pairs
from preflens.diagnostics.entanglement import pair_entanglement
from preflens.logprobs import sequence_logps
from preflens.losses import PairLogps, get_loss

RESPONSE_LENGTH = 8


def tiny(seed: int):
    """A 2-layer Llama with a word-level tokenizer covering the synthetic vocabulary
    (`preflens.models.tiny_model`; built here the same way where that module is absent)."""
    try:
        from preflens.models import tiny_model
    except ImportError:
        return _tiny_fallback(seed)
    return tiny_model(hidden_size=64, num_layers=2, seed=seed)


def _tiny_fallback(seed: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *synthetic.SYNTHETIC_VOCAB])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval(), tok


def batch_for(rows: list[dict], tok) -> dict[str, torch.Tensor]:
    pairs, _ = load_pairs(rows)
    items, _ = tokenize_pairs(pairs, tok, max_length=None, max_prompt_length=None)
    return collate_pairs(items, tok.pad_token_id)


def sft(model, batch: dict[str, torch.Tensor], steps: int, lr: float) -> None:
    """Maximum likelihood on the chosen responses (the paper's SFT phase before preference training)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    b = batch["input_ids"].shape[0] // 2
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        lp = sequence_logps(
            model, batch["input_ids"][:b], batch["attention_mask"][:b], batch["response_mask"][:b]
        )
        (-(lp.logps / lp.lengths).mean()).backward()
        opt.step()
    model.eval()


def dpo_steps(model, batch, steps: int, lr: float) -> tuple[float, float]:
    """Full-batch SGD on DPO; returns the mean change of chosen and rejected summed log-probs."""
    loss_fn = get_loss("dpo", beta=0.1)
    ids, att, rm = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    with torch.no_grad():
        ref = sequence_logps(model, ids, att, rm)
    b = ids.shape[0] // 2
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        lp = sequence_logps(model, ids, att, rm)
        p = PairLogps(
            chosen=lp.logps[:b],
            rejected=lp.logps[b:],
            ref_chosen=ref.logps[:b],
            ref_rejected=ref.logps[b:],
            chosen_len=lp.lengths[:b],
            rejected_len=lp.lengths[b:],
        )
        loss_fn(p).mean().backward()
        opt.step()
    with torch.no_grad():
        end = sequence_logps(model, ids, att, rm).logps
    d = end - ref.logps
    return float(d[:b].mean()), float(d[b:].mean())


def measure(model, batch) -> dict[str, float]:
    ids, att, rm = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    with torch.no_grad():
        ref = sequence_logps(model, ids, att, rm).logps
    b = ids.shape[0] // 2
    st = pair_entanglement(model, batch, get_loss("dpo", beta=0.1), ref=(ref[:b], ref[b:]))
    return {
        "inner": float(st.inner.mean()),
        "norm_w2": float((st.norm_w**2).mean()),
        "cosine": float(st.cosine.mean()),
        "cond1": float(st.cond1_violated.float().mean()),
        "cond2": float(st.cond2_violated.float().mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--dpo-steps", type=int, default=20)
    ap.add_argument("--sft-steps", default="0,30", help="SFT steps before measuring; one table per value")
    ap.add_argument("--positions", default="prefix,random")
    args = ap.parse_args()
    # one thread: these matrices are tiny, and extra threads only spin-wait on a shared CPU
    torch.set_num_threads(1)
    t0 = time.time()
    print(
        f"sentiment pairs, responses of {RESPONSE_LENGTH} words, {args.pairs} pairs per set; 2-layer Llama "
        f"(hidden 64), all parameters; mean over {args.seeds} model/data seeds; DPO beta 0.1, "
        f"{args.dpo_steps} SGD steps (lr 0.5)"
    )
    for sft_steps in [int(x) for x in args.sft_steps.split(",")]:
        what = (
            "random initialisation"
            if sft_steps == 0
            else f"after {sft_steps} SFT steps on the chosen responses"
        )
        print(f"\n{what}")
        print(
            "| shared positions | shared tokens | <g_w,g_l> | |g_w|^2 | cosine | cond. 1 violated | "
            "cond. 2 violated | Δ chosen after DPO | Δ rejected after DPO |"
        )
        print("|" + "---|" * 9)
        for positions in args.positions.split(","):
            for k in range(RESPONSE_LENGTH):
                acc: dict[str, list[float]] = {}
                for seed in range(args.seeds):
                    model, tok = tiny(seed)
                    rows = synthetic.sentiment_pairs(
                        args.pairs,
                        seed=seed,
                        shared_tokens=k,
                        response_length=RESPONSE_LENGTH,
                        shared_positions=positions,
                    )
                    batch = batch_for(rows, tok)
                    if sft_steps:
                        sft(model, batch, steps=sft_steps, lr=3e-3)
                    m = measure(model, batch)
                    dc, dr = dpo_steps(copy.deepcopy(model), batch, steps=args.dpo_steps, lr=0.5)
                    m.update(dc=dc, dr=dr)
                    for key, v in m.items():
                        acc.setdefault(key, []).append(v)
                a = {key: sum(v) / len(v) for key, v in acc.items()}
                print(
                    f"| {positions} | {k} | {a['inner']:.1f} | {a['norm_w2']:.1f} | {a['cosine']:.3f} | "
                    f"{100 * a['cond1']:.0f}% | {100 * a['cond2']:.0f}% | {a['dc']:+.2f} | {a['dr']:+.2f} |"
                )
    print(f"\nwall time {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
