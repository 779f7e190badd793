"""The CHES scan of a whole dataset: rank preference pairs by CHES score, drop the ones that displace
likelihood (Razin et al. 2024, arXiv 2410.08847, Sec. 5: pairs with a high CHES score make DPO lower
the chosen response's probability; removing the top-scoring pairs mitigates it).

`run_ches` scores every pair forward-only (`preflens.diagnostics.ches`) and writes one row per pair:

    pair_index, score, percentile, ches, ches_normalized, chosen_len, rejected_len, prompt_len,
    edit_similarity (token-level normalized Levenshtein similarity of the two responses, the baseline
    measure of Pal et al. 2024 that the paper compares against), dropped (with drop_top)

How it scales: the dataset is cut into chunks of `chunk_size` pairs. Each chunk is tokenized, sorted by
length (little padding), scored in batches and written to `OUTPUT.parts/` as soon as it is done, so an
interrupted scan resumes from the finished chunks. Under `accelerate launch` / torchrun every process
scores its own chunks; finished chunks are gathered to rank 0 (which alone writes files, so no shared
filesystem is needed) after each round. A chunk's numbers do not depend on which process scored it, so
N processes give the same output as one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from preflens import models  # models.load_model looked up per call: tests substitute the loader
from preflens.data.collate import collate_pairs, tokenize_pairs
from preflens.data.formats import DATA_SUFFIXES, load_pairs, write_pairs
from preflens.diagnostics.ches import ches_from_sums, get_decoder, response_hidden_sums
from preflens.errors import PreflensError, RunDirError
from preflens.grad.estimates import estimate_forward_memory
from preflens.grad.memory import plan_rows, resolve_budget

__all__ = [
    "run_ches",
    "edit_similarity",
    "top_indices",
    "top_fraction",
    "check_drop_options",
    "write_filtered",
    "SCHEMA_VERSION",
]

SCHEMA_VERSION = 1

_COLUMNS = [
    "pair_index",
    "ches",
    "ches_normalized",
    "chosen_len",
    "rejected_len",
    "prompt_len",
    "edit_similarity",
]


def edit_similarity(a: list[int], b: list[int]) -> float:
    """1 - Levenshtein(a, b) / max(|a|, |b|) over token ids (1.0 for identical, 0.0 for disjoint).

    Row-by-row dynamic programme, vectorised with numpy: the deletion/substitution candidates of a
    row are one vector op, and the insertion chain cur[j] = min(cur[j], cur[j-1] + 1) is a running
    minimum of cur[j] - j (plus j). O(|a|) numpy ops of length |b|.
    """
    n, m = len(a), len(b)
    if max(n, m) == 0:
        return 1.0
    if n == 0 or m == 0:
        return 0.0
    if n < m:  # iterate over the shorter sequence
        a, b, n, m = b, a, m, n
    bv = np.asarray(b, dtype=np.int64)
    ramp = np.arange(m + 1, dtype=np.int64)
    prev = ramp.copy()
    for i in range(1, n + 1):
        cur = np.empty(m + 1, dtype=np.int64)
        cur[0] = i
        cur[1:] = np.minimum(prev[1:] + 1, prev[:-1] + (bv != a[i - 1]))
        cur = np.minimum.accumulate(cur - ramp) + ramp
        prev = cur
    return 1.0 - float(prev[m]) / max(n, m)


# ---------------------------------------------------------------------------------------------
# scoring one chunk
# ---------------------------------------------------------------------------------------------


def _score_chunk(
    model: Any,
    tokenizer: Any,
    pairs: list[Any],
    *,
    batch_size: int,
    token_limits: dict[str, Any],
    device: Any,
    budget: int | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Score the pairs of one chunk; returns (rows, number of pairs dropped by tokenization). Under
    `budget` (bytes) the batches are cut to the pairs one forward may hold (`ches_pairs_per_batch`)."""
    # the same tokenization as training (chat template, EOS-terminated responses, truncation)
    tokenized, _ = tokenize_pairs(pairs, tokenizer, **token_limits)
    dropped = len(pairs) - len(tokenized)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # longest first: an out-of-memory error shows on the first batch, and batches pad little
    order = sorted(range(len(tokenized)), key=lambda i: (-tokenized[i].length, i))
    if budget is not None and tokenized:
        batch_size = ches_pairs_per_batch(model, tokenized[order[0]].length, batch_size, budget)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(order), batch_size):
        items = [tokenized[i] for i in order[start : start + batch_size]]
        batch = collate_pairs(items, pad)
        ids = batch["input_ids"].to(device)
        att = batch["attention_mask"].to(device)
        rm = batch["response_mask"].to(device).bool()
        sums, counts = response_hidden_sums(model, ids, att, rm)
        b = ids.shape[0] // 2
        raw = ches_from_sums(sums[:b], sums[b:], counts[:b], counts[b:], False)
        norm = ches_from_sums(sums[:b], sums[b:], counts[:b], counts[b:], True)
        ids_c, rm_c = ids.cpu(), rm.cpu()
        first_resp = rm_c.float().argmax(1)
        for j in range(b):
            yw = ids_c[j][rm_c[j]].tolist()
            yl = ids_c[b + j][rm_c[b + j]].tolist()
            rows.append(
                {
                    "pair_index": int(batch["pair_index"][j]),
                    "ches": float(raw[j]),
                    "ches_normalized": float(norm[j]),
                    "chosen_len": len(yw),
                    "rejected_len": len(yl),
                    "prompt_len": int(first_resp[j]),
                    "edit_similarity": edit_similarity(yw, yl),
                }
            )
    return rows, dropped


def ches_pairs_per_batch(model: Any, longest: int, batch_size: int, budget: int) -> int:
    """The most pairs (<= batch_size) whose forward over rows of `longest` tokens fits `budget` bytes
    (`grad.estimates.estimate_forward_memory`: CHES keeps only the last hidden state); refuses in one line
    (layer, shape, bytes) when one pair cannot fit. Scores do not depend on the batch: a pair's rows are
    scored alone as well as with others (right padding, causal attention)."""
    every_layer = get_decoder(model) is None  # no backbone: output_hidden_states keeps every layer

    def est(k: int) -> Any:
        return estimate_forward_memory(model, [longest] * (2 * k), all_hidden_states=every_layer)

    what = f"ches: a forward over pairs of {longest} tokens (counted in pairs)"
    return plan_rows(est, batch_size, budget, min_rows=1, what=what)


# ---------------------------------------------------------------------------------------------
# chunks, resume, processes
# ---------------------------------------------------------------------------------------------


def _parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def _fingerprint(
    *,
    model: str | None,
    data: Path,
    n_pairs: int,
    chunk_size: int,
    token_limits: dict[str, Any],
    dtype: str,
    data_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a partial run's chunks depend on; a resume with other values would mix two scorings."""
    st = data.stat()
    return {
        "schema": SCHEMA_VERSION,
        "model": model,
        "data": str(data.resolve()),
        "data_size": st.st_size,
        "data_mtime_ns": st.st_mtime_ns,
        "n_pairs": n_pairs,
        "chunk_size": chunk_size,
        **token_limits,
        "dtype": dtype,
        # which rows of the source are pairs (split, column mapping, invalid rows dropped or not)
        **(data_options or {}),
    }


def _plan(output: Path, fp: dict[str, Any], n_chunks: int, overwrite: bool) -> dict[str, Any]:
    """Rank 0: which chunks remain (or the error to raise on every rank)."""
    parts = _parts_dir(output)
    if output.exists() and not overwrite:
        return {"error": f"{output} exists (a finished scoring); pass --overwrite to score again"}
    if overwrite and parts.exists():
        shutil.rmtree(parts)
    meta = parts / "meta.json"
    if meta.exists():
        old = json.loads(meta.read_text())
        if old != fp:
            diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
            return {
                "error": f"{parts} holds a partial scoring made with other settings ({', '.join(diff)} differ); "
                "pass --overwrite to discard it"
            }
    else:
        parts.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps(fp, indent=2))
    done = {int(p.stem.split("-")[1]) for p in parts.glob("chunk-*.parquet")}
    return {"error": None, "todo": [c for c in range(n_chunks) if c not in done], "resumed": len(done)}


def _write_chunk(parts: Path, chunk: int, rows: list[dict[str, Any]], dropped: int) -> None:
    df = pd.DataFrame(rows, columns=_COLUMNS)
    df.attrs = {}
    tmp = parts / f"chunk-{chunk:06d}.tmp"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, parts / f"chunk-{chunk:06d}.parquet")
    (parts / f"chunk-{chunk:06d}.dropped").write_text(str(dropped))


def _merge(parts: Path, length_normalized: bool) -> tuple[pd.DataFrame, int]:
    files = sorted(parts.glob("chunk-*.parquet"))
    df = (
        pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        if files
        else pd.DataFrame(columns=_COLUMNS)
    )
    df = df.sort_values("pair_index", kind="stable").reset_index(drop=True)
    dropped = sum(int(p.read_text()) for p in parts.glob("chunk-*.dropped"))
    df.insert(1, "score", df["ches_normalized"] if length_normalized else df["ches"])
    # percentile of each score within the dataset, in (0, 100]; ties share their mean rank
    df.insert(2, "percentile", df["score"].rank(method="average", pct=True) * 100.0)
    return df, dropped


def top_fraction(table: pd.DataFrame, column: str, fraction: float, *, highest: bool) -> set[int]:
    """pair_index of the floor(fraction * n) pairs ranked first by `column` (highest or lowest first;
    ties: lower pair_index first). The one ranking rule of every `--drop-top` (ches, attribute)."""
    k = int(math.floor(fraction * len(table) + 1e-9))
    ranked = table.sort_values([column, "pair_index"], ascending=[not highest, True], kind="stable")
    return set(int(i) for i in ranked["pair_index"].iloc[:k])


def top_indices(scores: pd.DataFrame, fraction: float) -> set[int]:
    """pair_index of the floor(fraction * n) highest-scoring pairs (ties: lower pair_index first)."""
    return top_fraction(scores, "score", fraction, highest=True)


def check_drop_options(drop_top: float | None, filtered_output: Path | None) -> None:
    """`--drop-top` / `--filtered-output`, checked before any model is loaded (ches, attribute)."""
    if drop_top is not None:
        if not 0.0 <= drop_top < 1.0:
            raise PreflensError(f"--drop-top is a fraction in [0, 1), got {drop_top}")
        if filtered_output is None:
            raise PreflensError("--drop-top needs --filtered-output FILE (where the kept pairs go)")
    if filtered_output is not None and Path(filtered_output).suffix.lower() not in DATA_SUFFIXES:
        raise PreflensError(
            f"--filtered-output {filtered_output}: cannot write {Path(filtered_output).suffix!r} files; "
            f"expected one of {', '.join(DATA_SUFFIXES)}"
        )


def _check_options(
    *,
    data: Path,
    output: Path,
    drop_top: float | None,
    filtered_output: Path | None,
    batch_size: int,
    chunk_size: int,
) -> None:
    """Every option checked before the model is loaded, not after scoring the whole dataset."""
    check_drop_options(drop_top, filtered_output)
    if output.suffix.lower() != ".parquet":
        raise PreflensError(f"--output {output}: the scores are a parquet table; name it *.parquet")
    if batch_size < 1 or chunk_size < 1:
        raise PreflensError("--batch-size and --chunk-size must be at least 1")
    if not data.exists():
        raise PreflensError(f"{data}: no such file")


def _process_state() -> PartialState:
    """The process group when the caller passes none: a forward-only scan needs rank, world size and
    device, not an Accelerator's precision or trackers. Under torchrun on a machine without CUDA,
    accelerate only picks the gloo (MULTI_CPU) backend when told `cpu=True`; otherwise every process
    would think it is alone."""
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=multi and not torch.cuda.is_available())


def _agree_on_plan(
    acc: Any, output: Path, fp: dict[str, Any], n_chunks: int, overwrite: bool
) -> dict[str, Any]:
    """Rank 0 decides which chunks remain (it alone reads and writes files); every rank gets its plan."""
    plan: list[Any] = [None]
    if acc.is_main_process:
        output.parent.mkdir(parents=True, exist_ok=True)
        plan = [_plan(output, fp, n_chunks, overwrite)]
    if acc.num_processes > 1:
        broadcast_object_list(plan)
    if plan[0]["error"]:
        raise RunDirError(plan[0]["error"])
    return plan[0]


def _score_chunks(
    acc: Any,
    lm: Any,
    tok: Any,
    pairs: list[Any],
    todo: list[int],
    parts: Path,
    *,
    chunk_size: int,
    batch_size: int,
    token_limits: dict[str, Any],
    progress: bool,
    budget: int | None = None,
) -> None:
    """Score the remaining chunks, one per process and round; rank 0 writes each as it arrives."""
    n = len(pairs)
    bar = None
    if progress and acc.is_main_process:
        done_pairs = n - sum(len(range(c * chunk_size, min(n, (c + 1) * chunk_size))) for c in todo)
        bar = tqdm(total=n, initial=done_pairs, desc="CHES", unit="pair")
    world, rank = acc.num_processes, acc.process_index
    with torch.inference_mode():
        for r in range(math.ceil(len(todo) / world)):
            mine = r * world + rank
            result = []
            if mine < len(todo):
                c = todo[mine]
                rows, dropped = _score_chunk(
                    lm,
                    tok,
                    pairs[c * chunk_size : (c + 1) * chunk_size],
                    batch_size=batch_size,
                    token_limits=token_limits,
                    device=acc.device,
                    budget=budget,
                )
                result = [(c, rows, dropped)]
            gathered = gather_object(result) if world > 1 else result
            if acc.is_main_process:
                for c, rows, dropped in gathered:
                    _write_chunk(parts, c, rows, dropped)
                    if bar is not None:
                        bar.update(min(n, (c + 1) * chunk_size) - c * chunk_size)
    if bar is not None:
        bar.close()


def write_filtered(pairs: list[Any], top: set[int], filtered_output: Path) -> Path:
    """The input pairs minus the dropped ones, in the input's format, order kept."""
    kept = [p for p in pairs if p.pair_id not in top]
    filtered_output = Path(filtered_output)
    filtered_output.parent.mkdir(parents=True, exist_ok=True)
    write_pairs(kept, filtered_output)
    return filtered_output


def _spearman(a: Any, b: Any) -> float | None:
    """Rank correlation, None when undefined (fewer than 2 rows, or a constant column)."""
    if len(a) < 2:
        return None
    r = float(a.rank().corr(b.rank()))
    return None if math.isnan(r) else r


def _summary(
    df: pd.DataFrame, n: int, dropped_tok: int, length_normalized: bool, drop_top: float | None, resumed: int
) -> dict[str, Any]:
    s = df["score"]
    out: dict[str, Any] = {
        "pairs": n,
        "scored": int(len(df)),
        "skipped_by_tokenization": int(dropped_tok),
        "resumed_chunks": int(resumed),
        "length_normalized": length_normalized,
        "score_quantiles": {q: float(s.quantile(q / 100)) for q in (0, 25, 50, 75, 90, 100)}
        if len(df)
        else {},
        "spearman_score_vs_edit_similarity": _spearman(s, df["edit_similarity"]),
        "mean_chosen_len": float(df["chosen_len"].mean()) if len(df) else None,
        "mean_rejected_len": float(df["rejected_len"].mean()) if len(df) else None,
    }
    if drop_top is not None:
        out["drop_top"] = drop_top
        out["dropped"] = int(df["dropped"].sum())
        out["kept"] = n - out["dropped"]
    return out


def _finish(
    pairs: list[Any],
    parts: Path,
    output: Path,
    *,
    length_normalized: bool,
    drop_top: float | None,
    filtered_output: Path | None,
    resumed: int,
    invalid_rows: dict[str, int],
) -> dict[str, Any]:
    """Rank 0: merge the chunks into OUTPUT (atomically), write the filtered pairs, return the summary
    (`invalid_rows`: the rows `load_pairs` dropped, by reason)."""
    df, dropped = _merge(parts, length_normalized)
    kept_path = None
    if drop_top is not None:
        top = top_indices(df, drop_top)
        df["dropped"] = df["pair_index"].isin(top)
        kept_path = write_filtered(pairs, top, filtered_output)
    tmp = output.with_name(output.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, output)
    shutil.rmtree(parts, ignore_errors=True)
    summary = _summary(df, len(pairs), dropped, length_normalized, drop_top, resumed)
    summary["output"] = str(output)
    if invalid_rows:
        summary["invalid_rows_dropped"] = dict(invalid_rows)
    if kept_path is not None:
        summary["filtered_output"] = str(kept_path)
    return summary


def run_ches(
    *,
    model: str | None,
    data: Path,
    output: Path,
    length_normalized: bool = False,
    drop_top: float | None = None,
    filtered_output: Path | None = None,
    batch_size: int = 8,
    max_length: int | None = 512,
    max_prompt_length: int | None = 256,
    chunk_size: int = 512,
    dtype: str = "float32",
    chat_template: bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
    data_split: str = "train",
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    on_invalid: str = "error",
    accelerator: Any = None,
    max_memory: int | None = None,
    _model_obj: Any = None,
) -> dict[str, Any] | None:
    """Score every pair of `data` (`preflens ches`' work, callable from Python).

    Returns the summary dict on the main process, None on the others. `_model_obj` = (model,
    tokenizer) already loaded (tests, notebooks, the demo) instead of `model`. `data_split`, the
    `*_field` names and `on_invalid` are `load_pairs`'s (as `preflens train`'s flags of the same names).
    `accelerator`: the process group to score with (an `accelerate.Accelerator`, e.g.
    `preflens.training.runtime.make_accelerator()`); None takes accelerate's process state.
    `max_memory` (bytes; None: half the free memory): each forward is planned from the shapes before it
    runs and the batches cut to fit; with `max_length` set, one pair of that length is checked against it
    before any pair is scored (refused in one line, layer / shape / bytes, when it cannot fit).
    """
    output, data = Path(output), Path(data)
    _check_options(
        data=data,
        output=output,
        drop_top=drop_top,
        filtered_output=filtered_output,
        batch_size=batch_size,
        chunk_size=chunk_size,
    )
    acc = accelerator if accelerator is not None else _process_state()
    data_options = {
        "split": data_split,
        "prompt_field": prompt_field,
        "chosen_field": chosen_field,
        "rejected_field": rejected_field,
        "on_invalid": on_invalid,
    }
    pairs, load_report = load_pairs(data, **data_options)  # type: ignore[arg-type]
    n_chunks = math.ceil(len(pairs) / chunk_size)
    token_limits = {
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "chat_template": chat_template,
    }
    fp = _fingerprint(
        model=model,
        data=data,
        n_pairs=len(pairs),
        chunk_size=chunk_size,
        token_limits=token_limits,
        dtype=dtype,
        data_options=data_options,
    )
    plan = _agree_on_plan(acc, output, fp, n_chunks, overwrite)
    parts = _parts_dir(output)
    if plan["todo"]:
        lm, tok = (
            _model_obj
            if _model_obj is not None
            else models.load_model(model, dtype=dtype, device=str(acc.device))
        )
        lm.eval()
        lm.to(acc.device)
        budget = resolve_budget(max_memory, acc.device)
        if max_length:  # up front: the longest possible pair must fit before the first chunk starts
            ches_pairs_per_batch(lm, int(max_length), batch_size, budget)
        _score_chunks(
            acc,
            lm,
            tok,
            pairs,
            plan["todo"],
            parts,
            chunk_size=chunk_size,
            batch_size=batch_size,
            token_limits=token_limits,
            progress=progress,
            budget=budget,
        )
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return None
    summary = _finish(
        pairs,
        parts,
        output,
        length_normalized=length_normalized,
        drop_top=drop_top,
        filtered_output=filtered_output,
        resumed=plan.get("resumed", 0),
        invalid_rows=dict(load_report.dropped) if load_report.n_dropped else {},
    )
    return summary
