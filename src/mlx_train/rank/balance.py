"""`--shares auto`: each rank's rows of the global batch from the ranks' measured speeds.

Every rank times its own forward and backward passes (the part of a step that grows with its rows).
At steps that are multiples of EVERY, one all_gather of a two-number vector per rank (seconds,
rows) tells every rank every rank's speed in rows per second; each then computes the same new
split from the same bytes (`propose`, exact arithmetic: split_rows), so no rank ever decides alone
and no message besides that gather is needed. Hysteresis keeps the shares from flapping: a new
split is taken only when it predicts a step at least GAIN faster than the split in force, and
never more often than every EVERY steps. The first step after a start, a resume or a re-share is
not measured (it traces the graphs of new micro-batch shapes).

Which samples form global batch n stays a function of (seed, n): only the cut of each global batch
between the ranks moves, and the step's mathematics is the equal split's (rank/step.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from mlx_train.rank.batcher import split_rows

EVERY = 10       # steps between the gathers (and so the most often shares can change)
MIN_STEPS = 3    # measured steps a gather needs since the last one (or the start)
GAIN = 0.10      # a new split must predict a step this much faster than the one in force


def predicted_s(rows: Sequence[int], speeds: Sequence[float]) -> float:
    """The compute part of a synchronous step under `rows`: the slowest rank's, since all wait for it."""
    return max(r / s for r, s in zip(rows, speeds))


def propose(global_batch: int, rows: Sequence[int], speeds: Sequence[float], gain: float = GAIN) -> Optional[List[int]]:
    """The split proportional to `speeds` (rows per second, by rank) when it predicts a step more
    than `gain` faster than `rows`, else None. A pure function: every rank gets the same answer."""
    if len(speeds) != len(rows) or not all(s > 0 for s in speeds):
        return None
    new = split_rows(global_batch, speeds)
    if new == list(rows) or predicted_s(new, speeds) >= (1 - gain) * predicted_s(rows, speeds):
        return None
    return new


@dataclass(frozen=True)
class Measured:
    """What one gather learnt: each rank's rows per second, by rank, and the split it chose (None: kept)."""
    speeds: List[float]
    chosen: Optional[List[int]]


class Balancer:
    """One rank's side of `--shares auto`. `observe` after every step, `after` at the end of every
    step: every rank calls both at the same steps, so the gather in `after` meets on every rank."""

    def __init__(self, global_batch: int, gather: Callable[[List[float]], List[List[float]]],
                 every: int = EVERY, min_steps: int = MIN_STEPS, gain: float = GAIN):
        self.global_batch, self.gather = global_batch, gather
        self.every, self.min_steps, self.gain = every, min_steps, gain
        self.restart()

    def restart(self) -> None:
        """Forget the window: the next step traces new shapes and is not measured."""
        self.seconds, self.rows, self.steps, self.fresh = 0.0, 0, 0, True

    def observe(self, seconds: float, rows: int) -> None:
        if self.fresh:
            self.fresh = False
            return
        self.seconds += seconds
        self.rows += rows
        self.steps += 1

    def after(self, step: int, rows: Sequence[int]) -> Optional[Measured]:
        """At a gather step (every rank alike: `step` and the count of measured steps are the same on
        every rank): every rank's speed, and the new split if it is worth taking."""
        if step % self.every or self.steps < self.min_steps:
            return None
        everyone = self.gather([self.seconds, float(self.rows)])
        speeds = [r / s if s > 0 else 0.0 for s, r in everyone]
        chosen = propose(self.global_batch, rows, speeds, self.gain)
        if chosen is None:  # keep measuring from here: the next gather sees the latest speeds only
            self.seconds, self.rows, self.steps = 0.0, 0, 0
        else:
            self.restart()
        return Measured(speeds, chosen)
