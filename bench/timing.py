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



def fastest_baseline(baselines: Dict[str, Callable[[], None]], candidate: Callable[[], None], rounds: int,
                     reps: int) -> Dict[str, object]:
    """`interleaved` against the fastest of several baselines (ways to do the same work): all are
    timed in every round, in an order that rotates so none always follows the same one; the
    baseline with the least median time is the floor, and the ratio is the median per-round
    floor_time / candidate_time. Also returns every baseline's median, by name."""
    fns = {**baselines, None: candidate}
    names = list(fns)
    for name in names:
        timed(fns[name], reps)  # warm up: allocator, kernels, connections
    times: Dict[object, list] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(fns[name], reps))
    medians = {name: statistics.median(times[name]) for name in baselines}
    best = min(medians, key=medians.get)
    return {"baseline": best, "baseline_s": medians[best], "candidate_s": statistics.median(times[None]),
            "ratio": statistics.median(b / c for b, c in zip(times[best], times[None])), "baselines_s": medians}


# -- trainers' logging windows ----------------------------------------------------------------------
# Each trainer's own tokens/s leaves something out: mlx-lm's the time it spends batching data and
# reporting, ours the time logging. The side-by-side benches compare wall-clock windows instead:
# the tokens between two reports over the time between them. The first report closes the window
# holding the compile; the last window also validates; both are left out.

def mlx_train_windows(metrics_rows: list) -> dict:
    """Wall-clock and own tokens/s windows of an mlx-train run (its metrics.jsonl rows)."""
    rows = metrics_rows[:-1]
    tokens = lambda r, prev: r["tokens_per_s"] * r["step_time_s"] * (r["step"] - prev["step"])  # noqa: E731
    return {"own": [r["tokens_per_s"] for r in rows[1:]],
            "wall": [tokens(b, a) / (b["time"] - a["time"]) for a, b in zip(rows, rows[1:])]}


def mlx_lm_windows(reports: list) -> dict:
    """The same from mlx-lm's loss reports, each (perf_counter at the report, its info dict)."""
    reports = reports[:-1]
    return {"own": [info["tokens_per_second"] for _, info in reports[1:]],
            "wall": [(b["trained_tokens"] - a["trained_tokens"]) / (tb - ta)
                     for (ta, a), (tb, b) in zip(reports, reports[1:])]}
