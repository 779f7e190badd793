"""How long `preflens train/probe/ches --data <broken jsonl>` takes to report the broken line (issue 18:
under 2 s on an idle machine). The data is read and checked before torch/transformers are imported.

    .venv/bin/python benchmarks/fail_fast.py [--repeats 3]

Prints, per command, the median wall time of the whole process (interpreter start-up included), whether
the error named the line, and the load average (timings on a busy machine are not idle numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    bad = tmp / "broken.jsonl"
    rows = [json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) for i in range(2000)]
    rows[1234] = rows[1234][:-5]  # a line cut short
    bad.write_text("\n".join(rows) + "\n")
    exe = [sys.executable, "-m", "preflens.cli"]
    commands = {
        "train": ["train", "--data", str(bad), "--output-dir", str(tmp / "run")],
        "probe": ["probe", "--data", str(bad), "-o", str(tmp / "p.parquet"), "--max-pairs", "0"],
        "ches": ["ches", "--data", str(bad), "-o", str(tmp / "c.parquet")],
    }
    print(f"load average before: {os.getloadavg()}")
    for name, cmd in commands.items():
        times, named = [], True
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = subprocess.run(exe + cmd, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            named &= res.returncode == 2 and "line 1235" in res.stderr
        print(f"{name}: median {statistics.median(times):.2f} s over {args.repeats}, names the line: {named}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
