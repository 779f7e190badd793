"""Shared timing and memory helpers for the benchmarks in this folder.

Why a shared module: every benchmark here reports ratios measured *side by side in one process*
(DESIGN.md, Performance). On a shared, noisy machine the only fair way to do that is to interleave
the contenders (A, B, A, B, ...) so a burst of someone else's load hits both, and to report medians.
These helpers do exactly that, and measure peak memory the same way for every contender:

* CPU: the kernel's own peak-RSS counter (``VmHWM`` in ``/proc/self/status``), reset before the
  measured call by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0). It sees every byte the
  process touches (torch's allocator, MKL/oneDNN scratch), which ``tracemalloc`` does not. Where the
  reset is not permitted we fall back to sampling RSS with psutil every millisecond in a thread (can
  miss a short spike; the result says which method was used).
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensor memory; the
  caching allocator's reserved memory is reported beside it).

Run from the repository root (``python benchmarks/X.py``) or import as ``from common import ...``
with ``benchmarks/`` on ``sys.path`` (a script in this folder gets that for free).
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MemoryPeak",
    "format_table",
    "machine_info",
    "peak_memory",
    "peak_rss_delta",
    "sync_fn",
    "time_fn",
    "time_interleaved",
    "trim_heap",
]


def sync_fn(device: str | Any = "cpu") -> Callable[[], None]:
    """A function that waits for queued device work (CUDA kernels run asynchronously)."""
    dev = str(device)
    if dev.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def time_fn(
    fn: Callable[[], Any], warmup: int = 1, repeats: int = 5, sync: Callable[[], None] | None = None
) -> float:
    """Median wall-clock seconds of `repeats` calls of `fn` after `warmup` unmeasured calls."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_interleaved_wall_cpu(
    fns: dict[str, Callable[[], Any]],
    warmup: int = 1,
    repeats: int = 5,
    sync: Callable[[], None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall seconds, process CPU seconds) of each call of each function, run round-robin
    (A, B, A, B, ...) after warm-up.

    Interleaving spreads load bursts from other processes over all contenders instead of
    penalizing whichever ran during the burst; CPU time is what that load does not inflate on a
    shared CPU. Take `statistics.median` of each list.
    """
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    warmup: int = 1,
    repeats: int = 5,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Wall seconds of each call of each function, run round-robin after warm-up (see
    `time_interleaved_wall_cpu`)."""
    return time_interleaved_wall_cpu(fns, warmup, repeats, sync)[0]


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


@dataclass
class MemoryPeak:
    """Peak memory of one call above what the process held just before it."""

    delta_bytes: int
    """peak during the call minus the baseline just before it."""
    baseline_bytes: int
    method: str
    """"VmHWM" (kernel peak RSS), "rss-sampling" (psutil, 1 ms), or "cuda-allocated"."""
    reserved_bytes: int | None = None
    """CUDA only: peak reserved by the caching allocator (absolute)."""


def trim_heap() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc `malloc_trim`), so memory a previous
    measurement freed but the allocator kept does not absorb (hide) the next measurement's peak."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_peak(fn: Callable[[], Any]) -> tuple[MemoryPeak, Any]:
    trim_heap()
    if _reset_hwm():
        base = (_status_kb("VmRSS") or 0) * 1024
        result = fn()
        peak = (_status_kb("VmHWM") or 0) * 1024
        return MemoryPeak(max(0, peak - base), base, "VmHWM"), result
    import psutil

    proc = psutil.Process(os.getpid())
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        result = fn()
    finally:
        stop.set()
        t.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return MemoryPeak(max(0, peak[0] - base), base, "rss-sampling"), result


def peak_memory(fn: Callable[[], Any], device: str | Any = "cpu") -> tuple[MemoryPeak, Any]:
    """(peak memory of `fn()` above the baseline just before it, fn's result) on `device`."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return (
            MemoryPeak(peak - base, base, "cuda-allocated", torch.cuda.max_memory_reserved()),
            result,
        )
    return _rss_peak(fn)


def peak_rss_delta(fn: Callable[[], Any]) -> int:
    """Bytes of peak resident memory during `fn()` above the resident memory just before it (CPU)."""
    return _rss_peak(fn)[0].delta_bytes


def machine_info(device: str = "cpu") -> dict[str, str]:
    """Versions and hardware, printed with every benchmark so its numbers can be reproduced."""
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "cpu": platform.processor() or platform.machine(),
        "cores": str(os.cpu_count()),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    for mod in ("transformers", "trl", "accelerate", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not reported
            pass
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = str(torch.version.cuda)
    return info


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of `rows` (floats to 4 significant digits), ready to paste into BENCHMARKS.md."""
    if not rows:
        return ""
    cols = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
