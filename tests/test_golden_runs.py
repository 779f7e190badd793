"""Behaviour is kept across refactors: three tiny runs' `metrics.jsonl`, `pairs.parquet` and `probes.parquet`
equal the files recorded before the layout refactor (`tests/golden/record.py` says how they were made).

Floats are compared to 1e-6 relative (1e-9 absolute) so that a CPU with other vector kernels still passes;
`PREFLENS_GOLDEN_EXACT=1` demands bit-for-bit equality (what the refactor showed on the recording machine).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("golden_record", HERE / "golden" / "record.py")
record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record)

EXACT = os.environ.get("PREFLENS_GOLDEN_EXACT") == "1"

pytestmark = pytest.mark.usefixtures("one_thread")


def same(a, b, where: str) -> None:
    if isinstance(a, float) or isinstance(b, float):
        fa, fb = float(a), float(b)
        if math.isnan(fa) or math.isnan(fb):
            assert math.isnan(fa) and math.isnan(fb), f"{where}: {a!r} != {b!r}"
        elif EXACT:
            assert fa == fb, f"{where}: {a!r} != {b!r}"
        else:
            assert fa == pytest.approx(fb, rel=1e-6, abs=1e-9), f"{where}: {a!r} != {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("name", sorted(record.RUNS))
def test_run_outputs_equal_the_recorded_ones(tmp_path, name):
    out = record.run(name, tmp_path)
    gold = HERE / "golden" / name
    recorded = sorted(p.name for p in gold.iterdir())
    assert recorded == sorted(record.FILES)
    for f in record.FILES:
        assert (out / f).is_file(), f"{name}: the run wrote no {f}"

    got = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (gold / "metrics.jsonl").read_text().splitlines()]
    assert len(got) == len(want), f"{name}: {len(got)} metrics rows, recorded {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert sorted(g) == sorted(w), f"{name} metrics row {i}: keys {sorted(set(g) ^ set(w))} differ"
        for k in w:
            same(g[k], w[k], f"{name} metrics row {i} {k}")

    for f in ("pairs.parquet", "probes.parquet"):
        g, w = pd.read_parquet(out / f), pd.read_parquet(gold / f)
        assert list(g.columns) == list(w.columns), f"{name} {f}: columns differ"
        assert len(g) == len(w), f"{name} {f}: {len(g)} rows, recorded {len(w)}"
        for col in w.columns:
            for i, (a, b) in enumerate(zip(g[col].tolist(), w[col].tolist())):
                same(a, b, f"{name} {f} row {i} {col}")
