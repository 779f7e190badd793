"""`preflens make-data KIND`: write a synthetic preference dataset (sentiment, persona, grid)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

KINDS = ("sentiment", "persona", "grid")


def register(app: typer.Typer) -> None:
    @app.command("make-data")
    def make_data(
        kind: str = typer.Argument(..., help="sentiment | persona | grid"),
        output: Path = typer.Option(
            ..., "--output", "-o", help="file to write (.jsonl/.json/.parquet/.csv; grid: .json)"
        ),
        n: int = typer.Option(
            None, "--n", help="pairs to generate (default: 200; grid: n_prompts * n_responses)"
        ),
        seed: int = typer.Option(0, "--seed", help="the same seed gives the same data"),
        shared_tokens: int = typer.Option(
            0, "--shared-tokens", help="sentiment: positions where chosen and rejected share a word"
        ),
        response_length: int = typer.Option(8, "--response-length", help="sentiment: words per response"),
        n_prompts: int = typer.Option(20, "--n-prompts", help="grid: prompts"),
        n_responses: int = typer.Option(20, "--n-responses", help="grid: responses per prompt"),
        mask_rate: float = typer.Option(
            0.0, "--mask-rate", help="grid: fraction of responses hidden from the pairs"
        ),
    ) -> None:
        """Write synthetic preference data (reproducible, offline).

        The same --seed gives the same data. sentiment: review openings with a positive chosen and a
        negative rejected continuation; --shared-tokens sets how many words the two share (gradient
        entanglement). persona: single-token yes/no answers (likelihood displacement). grid: the 20x20
        utility grid of Ma et al. 2025, arXiv 2502.20847 (JSON).
        """
        from preflens.data import synthetic
        from preflens.data.formats import load_pairs, write_pairs
        from preflens.errors import PreflensError

        if kind not in KINDS:
            raise PreflensError(f"unknown KIND {kind!r}; expected one of {', '.join(KINDS)}")
        if kind == "grid":
            if output.suffix.lower() != ".json":
                raise PreflensError(f"{output}: the grid is written as one JSON object; use a .json output")
            grid = synthetic.grid_preferences(n_prompts, n_responses, mask_rate, seed, n_pairs=n)
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(grid.to_dict()) + "\n", encoding="utf-8")
            typer.echo(
                f"wrote {output}: {n_prompts}x{n_responses} utility grid, {len(grid.pairs)} pairs, "
                f"{int((~grid.observed).sum())} hidden responses"
            )
            return
        count = 200 if n is None else n
        if count < 1:
            raise PreflensError(f"--n must be at least 1, got {count}")
        if kind == "sentiment":
            rows = synthetic.sentiment_pairs(
                count, seed, shared_tokens=shared_tokens, response_length=response_length
            )
        else:
            rows = synthetic.persona_statements(count, seed)
        pairs, _ = load_pairs(rows)
        write_pairs(pairs, output)
        note = ""
        distinct = len({p.prompt for p in pairs}) if isinstance(pairs[0].prompt, str) else len(pairs)
        if distinct < len(pairs):  # persona: a fixed list of statements, reused once all were drawn
            note = f"; {distinct} distinct prompts, so {len(pairs) - distinct} pairs repeat one"
        typer.echo(f"wrote {output}: {len(pairs)} {kind} pairs (seed {seed}{note})")
