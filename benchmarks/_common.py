"""Shared benchmark plumbing: medians after warm-up, side-by-side repeats, a results file with context."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def setup(threads: int = 2) -> None:
    torch.set_num_threads(threads)


def time_side_by_side(candidates: dict, repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Run every candidate ``warmup`` times, then ``repeats`` rounds interleaved (so drift hits all alike).

    Returns per candidate the median, min and all times in seconds.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "times_s": ts}
            for name, ts in times.items()}


def time_each(candidates: dict, repeats: int, warmup: int = 2) -> dict[str, dict]:
    """Time every candidate in its own block: ``warmup`` calls, then ``repeats`` timed calls, before the next
    candidate starts. A cheap call interleaved with memory-heavy ones runs several times slower than alone, which
    flatters every ratio against it; blocks keep each candidate's caches and allocator state its own.

    Returns per candidate the median, min and all times in seconds.
    """
    out = {}
    for name, fn in candidates.items():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}
    return out


def time_passes(candidates: dict, repeats: int, rounds: int) -> dict[str, dict]:
    """``rounds`` passes of :func:`time_each` (every candidate in its own block after its own warm-up), summarised
    by :func:`summarize_passes`."""
    return summarize_passes([time_each(candidates, repeats=repeats) for _ in range(rounds)])


def summarize_passes(passes: list[dict]) -> dict[str, dict]:
    """Per candidate the smallest min and the smallest median over passes of :func:`time_each`, so that a pass in
    which another process held the cores does not decide a ratio on a shared machine, and every pass's min."""
    return {name: {"min_s": min(p[name]["min_s"] for p in passes),
                   "median_s": min(p[name]["median_s"] for p in passes),
                   "pass_min_s": [p[name]["min_s"] for p in passes]} for name in passes[0]}


def context() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(dist):
        try:
            return version(dist)
        except PackageNotFoundError:
            return "unknown"

    return {"threads": torch.get_num_threads(), "python": sys.version.split()[0], "torch": torch.__version__,
            "torchdiffeq": v("torchdiffeq"), "riemannian-flows": v("riemannian-flows"),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_results(name: str, payload: dict) -> Path:
    from flows._io import write_text

    path = RESULTS / f"{name}.json"
    write_text(path, json.dumps({"benchmark": name, "context": context(), **payload}, indent=2) + "\n")
    return path
