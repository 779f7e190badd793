"""`preflens displacement`: the single-token likelihood-displacement experiment (Razin et al. 2024,
arXiv 2410.08847, Sec. 3).

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

The experiment is `preflens.diagnostics.displacement.run_displacement`; this command parses the flags,
calls it and prints the result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from preflens.commands import options as opt

__all__ = ["run_displacement", "register"]

# the library's defaults, repeated so that `preflens --help` does not import torch to show them
DEFAULT_LR = 1e-6
DEFAULT_STEPS = 30


def run_displacement(**kwargs: Any) -> dict[str, Any]:
    """`preflens.diagnostics.displacement.run_displacement` (imported on first use, so that listing the
    commands stays fast)."""
    from preflens.diagnostics import displacement

    return displacement.run_displacement(**kwargs)


def __getattr__(name: str) -> Any:
    """Names that lived here before the experiment moved to the library still import from here."""
    if name in ("single_token_id", "prompt_ids"):
        from preflens.diagnostics import displacement

        return getattr(displacement, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        """Single-token likelihood displacement (Razin et al. 2024, arXiv 2410.08847, Sec. 3): does DPO
        lower the preferred token?"""
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
