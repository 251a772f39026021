"""Interleaved A/B timing: machine noise (these hosts are shared) hits both sides alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict


def timed(fn: Callable[[], None], reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def interleaved(baseline: Callable[[], None], candidate: Callable[[], None], rounds: int, reps: int) -> Dict[str, float]:
    """Median seconds per call of each, and the median per-round ratio baseline / candidate."""
    timed(baseline, reps), timed(candidate, reps)  # warm up: allocator, kernels, connections
    base, cand, ratios = [], [], []
    for _ in range(rounds):
        b, c = timed(baseline, reps), timed(candidate, reps)
        base.append(b)
        cand.append(c)
        ratios.append(b / c)
    return {"baseline_s": statistics.median(base), "candidate_s": statistics.median(cand),
            "ratio": statistics.median(ratios)}
