"""`preflens displacement`: the single-token likelihood-displacement experiment (seed 003, Sec. 3).

DPO on one prompt whose preferred and dispreferred responses are single tokens ("Yes" vs "No"). The
paper finds pi(y+|x) often *falls* while the margin grows, the mass going to tokens z with a large
<W_z, W_y+ - W_y-> (Sec. 4): similar to y+ (benign) or opposite to it (catastrophic). This command
prints pi(y+), pi(y-) before/after, the largest fall of pi(y+) along the way, the tokens whose
probability rose the most, and next to each the unembedding-geometry prediction.

Defaults. The paper's reference setting is a post-SFT model, RMSprop, lr 1e-7, 100 full-batch steps,
beta 0.1 (princeton-nlp/unintentional-unalignment). Here: RMSprop, beta 0.1, full batch (one prompt),
lr 1e-6 and 30 steps, so a run on the embedded SmolLM2-135M-Instruct is short and moves visibly. Measured
(EXPERIMENTS.md, "Single-token displacement"): "No" vs "Never" on a Persona prompt, pi(No) 0.074 -> 0.88
after 10 steps and 0.985 at step 26, then falling (0.982 at step 30: the onset of displacement once y+
saturates); the tokens that gained most were " No", "no", " no" (benign), each with a large
<W_z, W_y+ - W_y->. Pass `--lr 1e-7 --steps 100` for the paper's values (meant for a post-SFT model that
already prefers y+).

`--persona FILE` runs the experiment for every row (jsonl: prompt, chosen, rejected), restoring the
model between rows, and reports the share of rows whose chosen probability decreased.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from preflens.commands import options as opt
from preflens.errors import DataError, PreflensError

__all__ = ["run_displacement", "register", "single_token_id"]

DEFAULT_LR = 1e-6
DEFAULT_STEPS = 30


def single_token_id(tokenizer: Any, text: str, what: str) -> tuple[int, str | None]:
    """The token id of `text` as a response (no special tokens) and a warning if it is not one token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PreflensError(f"{what} {text!r} encodes to no tokens")
    warning = None
    if len(ids) > 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        warning = (
            f"{what} {text!r} is {len(ids)} tokens {pieces}; the single-token analysis uses the first, "
            f"{pieces[0]!r} (pick a string that is one token, e.g. without a leading space)"
        )
    return int(ids[0]), warning


def prompt_ids(tokenizer: Any, prompt: str, chat_template: bool | None):
    """Prompt token ids [1, T]: the chat template with the assistant turn opened, if it has one."""
    import torch

    use_template = (
        getattr(tokenizer, "chat_template", None) is not None if chat_template is None else chat_template
    )
    if use_template:
        if getattr(tokenizer, "chat_template", None) is None:
            raise PreflensError("--chat-template was given but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def _result_dict(res: Any, prompt: str, chosen: str, rejected: str, warnings: list[str]) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "p_chosen_before": res.p_chosen[0],
        "p_chosen_after": res.p_chosen[-1],
        "p_rejected_before": res.p_rejected[0],
        "p_rejected_after": res.p_rejected[-1],
        "decrease": res.decrease,
        "chosen_fell": res.chosen_fell,
        "sign_agreement": res.sign_agreement,
        "rank_correlation": res.rank_correlation,
        "p_chosen_trajectory": res.p_chosen,
        "p_rejected_trajectory": res.p_rejected,
        "top_increase": [vars(t) for t in res.top_increase],
        "warnings": warnings,
    }


def run_displacement(
    *,
    model: str | None,
    prompt: str | None = None,
    chosen: str | None = None,
    rejected: str | None = None,
    persona: Path | None = None,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    beta: float = 0.1,
    optimizer: str = "rmsprop",
    mode: str = "model",
    top_k: int = 10,
    chat_template: bool | None = None,
    limit: int | None = None,
    device: str = "auto",
    _model_obj: Any = None,
) -> dict[str, Any]:
    """The command's work, callable from Python; returns {"runs": [...], summary fields}."""
    import torch

    from preflens.diagnostics.displacement import single_token_dpo, snapshot

    if persona is None:
        if prompt is None or chosen is None or rejected is None:
            raise PreflensError("give --prompt, --chosen and --rejected, or --persona FILE")
        rows = [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]
    else:
        rows = _read_persona(Path(persona))
        if limit is not None:
            rows = rows[:limit]
    if steps < 1:
        raise PreflensError(f"--steps must be at least 1, got {steps}")

    if _model_obj is not None:
        lm, tok = _model_obj
    else:
        from preflens.commands.ches import _load_model

        # float32: the displacement is a difference of small probabilities; a GPU if there is one
        lm, tok = _load_model(model, "float32", device)
    for p in lm.parameters():
        p.requires_grad_(True)
    start = snapshot(lm) if len(rows) > 1 and mode == "model" else None
    runs = []
    torch.manual_seed(0)
    for i, row in enumerate(rows):
        if start is not None and i > 0:
            lm.load_state_dict(start)
        warnings = []
        yp, w1 = single_token_id(tok, row["chosen"], "chosen")
        ym, w2 = single_token_id(tok, row["rejected"], "rejected")
        warnings += [w for w in (w1, w2) if w]
        ids = prompt_ids(tok, row["prompt"], chat_template).to(next(lm.parameters()).device)
        res = single_token_dpo(
            lm,
            ids,
            yp,
            ym,
            steps=steps,
            lr=lr,
            beta=beta,
            optimizer=optimizer,
            mode=mode,
            top_k=top_k,
            tokenizer=tok,
        )
        runs.append(_result_dict(res, row["prompt"], row["chosen"], row["rejected"], warnings))
    if start is not None:
        lm.load_state_dict(start)
    n = len(runs)
    return {
        "runs": runs,
        "settings": {"steps": steps, "lr": lr, "beta": beta, "optimizer": optimizer, "mode": mode},
        "frac_chosen_fell": sum(r["chosen_fell"] for r in runs) / n,
        "mean_decrease": sum(r["decrease"] for r in runs) / n,
        "mean_sign_agreement": sum(r["sign_agreement"] for r in runs) / n,
    }


def _read_persona(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    rows = []
    for ln, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{ln}: not a JSON object ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{ln}: expected a JSON object with prompt/chosen/rejected")
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise DataError(f"{path}:{ln}: field {key!r} must be a non-empty string")
        rows.append({k: row[k] for k in ("prompt", "chosen", "rejected")})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _p(x: float) -> str:
    """A probability: 4 decimals, or 2 significant digits below 1e-3 (where 4 decimals read 0.0000)."""
    return f"{x:.4f}" if x == 0 or x >= 1e-3 else f"{x:.2g}"


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    s = result["settings"]
    for r in result["runs"]:
        for w in r["warnings"]:
            console.print(f"[yellow]warning:[/yellow] {w}")
    if len(result["runs"]) == 1:
        r = result["runs"][0]
        console.print(
            f"DPO on one prompt, y+ = {r['chosen']!r}, y- = {r['rejected']!r} "
            f"({s['steps']} steps, {s['optimizer']} lr {s['lr']:g}, beta {s['beta']:g}, {s['mode']})"
        )
        console.print(
            f"pi(y+|x): {_p(r['p_chosen_before'])} -> {_p(r['p_chosen_after'])}   "
            f"(largest fall along the way: {_p(r['decrease'])})"
        )
        console.print(f"pi(y-|x): {_p(r['p_rejected_before'])} -> {_p(r['p_rejected_after'])}")
        t = Table(title="tokens whose probability rose the most")
        for col in ("token", "p before", "p after", "d log p", "<W_z, W_y+ - W_y->"):
            t.add_column(col, justify="right" if col != "token" else "left")
        for c in r["top_increase"]:
            t.add_row(
                repr(c["token"]),
                _p(c["p_before"]),
                _p(c["p_after"]),
                f"{c['logp_change']:+.3f}",
                f"{c['prediction']:+.4g}",
            )
        console.print(t)
        console.print(
            f"prediction vs observed change over the vocabulary: sign agreement {r['sign_agreement']:.1%} "
            f"(centred), Spearman {r['rank_correlation']:.3f}"
        )
        if r["chosen_fell"]:
            console.print(
                "[bold red]likelihood displacement:[/bold red] the preferred token's probability fell."
            )
    else:
        t = Table(title=f"{len(result['runs'])} statements")
        for col in ("prompt", "y+", "y-", "pi(y+) before -> after", "decrease"):
            t.add_column(col)
        for r in result["runs"][:20]:
            t.add_row(
                r["prompt"][:50],
                r["chosen"],
                r["rejected"],
                f"{r['p_chosen_before']:.3f} -> {r['p_chosen_after']:.3f}",
                f"{r['decrease']:.3f}",
            )
        console.print(t)
        console.print(
            f"chosen probability fell in {result['frac_chosen_fell']:.0%} of statements; "
            f"mean largest fall {result['mean_decrease']:.4f}"
        )


def register(app: typer.Typer) -> None:
    @app.command("displacement")
    def displacement(
        model: str = opt.MODEL,
        prompt: str = typer.Option(
            None, "--prompt", help="the prompt (the chat template is applied if the tokenizer has one)"
        ),
        chosen: str = typer.Option(None, "--chosen", help="preferred response, one token (e.g. Yes)"),
        rejected: str = typer.Option(None, "--rejected", help="dispreferred response, one token (e.g. No)"),
        persona: Path = typer.Option(
            None, "--persona", help="jsonl of prompt/chosen/rejected rows: run each"
        ),
        steps: int = typer.Option(DEFAULT_STEPS, "--steps", help="full-batch DPO steps (paper: 100)"),
        lr: float = typer.Option(
            DEFAULT_LR, "--lr", help="learning rate (paper: 1e-7 on 1B-8B post-SFT models)"
        ),
        beta: float = typer.Option(0.1, "--beta", help="DPO beta (paper: 0.1)"),
        optimizer: str = typer.Option("rmsprop", "--optimizer", help="rmsprop (paper) | adam | sgd"),
        mode: str = typer.Option(
            "model", "--mode", help="model: train the model | features: the theorem's free h and W"
        ),
        top_k: int = typer.Option(10, "--top-k", help="tokens to list"),
        chat_template: bool = opt.CHAT_TEMPLATE,
        limit: int = typer.Option(None, "--limit", help="with --persona: only the first N rows"),
        output: Path = typer.Option(None, "--output", "-o", help="also write the full result as JSON"),
        device: str = typer.Option("auto", "--device", help="auto (a GPU if there is one) | cpu | cuda[:N]"),
    ) -> None:
        """Single-token likelihood displacement (seed 003): does DPO lower the preferred token?"""
        result = run_displacement(
            model=model,
            prompt=prompt,
            chosen=chosen,
            rejected=rejected,
            persona=persona,
            steps=steps,
            lr=lr,
            beta=beta,
            optimizer=optimizer,
            mode=mode,
            top_k=top_k,
            chat_template=chat_template,
            limit=limit,
            device=device,
        )
        _print(result)
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(result, indent=2))
