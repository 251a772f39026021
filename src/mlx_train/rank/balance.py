"""`--shares auto`: each rank's rows of the global batch from the ranks' measured speeds.

Every rank times its own forward and backward passes (the part of a step that grows with its rows)
and the rest of its compute (the update: the same work on every rank, but not the same time on
unequal hosts, where a slow host's update alone can cost what a few rows do). At steps that are
multiples of EVERY, one all_gather of a three-number vector per rank (seconds, rows, the rest's
seconds) tells every rank every rank's speed in rows per second and its fixed seconds per step; each
then computes the same new split from the same bytes (`fill`: each row to the rank that would finish
it first, so the slowest rank's fixed part plus its rows is as small as whole rows allow), so no rank
ever decides alone and no message besides that gather is needed. Hysteresis keeps the shares from flapping: a new
split is taken only when it predicts a step at least GAIN faster than the split in force, and
never more often than every EVERY steps. The first step after a start, a resume or a re-share is
not measured (it traces the graphs of new micro-batch shapes).

Which samples form global batch n stays a function of (seed, n): only the cut of each global batch
between the ranks moves, and the step's mathematics is the equal split's (rank/step.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

EVERY = 10       # steps between the gathers (and so the most often shares can change)
MIN_STEPS = 3    # measured steps a gather needs since the last one (or the start)
GAIN = 0.10      # a new split must predict a step this much faster than the one in force


def predicted_s(rows: Sequence[int], speeds: Sequence[float], fixed: Optional[Sequence[float]] = None) -> float:
    """The compute part of a synchronous step under `rows`: the slowest rank's (its fixed seconds and
    its rows at its speed), since all wait for it."""
    fixed = fixed or [0.0] * len(rows)
    return max(f + r / s for r, s, f in zip(rows, speeds, fixed))


def fill(global_batch: int, speeds: Sequence[float], fixed: Sequence[float]) -> List[int]:
    """The split of `global_batch` rows that makes the slowest rank's predicted time (its `fixed`
    seconds plus its rows over its speed) as small as whole rows allow: one row each, then each row to
    the rank that would finish it first (ties to the lower rank). Without fixed parts this is the split
    proportional to the speeds. Plain float arithmetic on the same gathered numbers: the same answer
    on every rank."""
    rows = [1] * len(speeds)
    for _ in range(global_batch - len(speeds)):
        r = min(range(len(speeds)), key=lambda i: (fixed[i] + (rows[i] + 1) / speeds[i], i))
        rows[r] += 1
    return rows


def propose(global_batch: int, rows: Sequence[int], speeds: Sequence[float], gain: float = GAIN,
            fixed: Optional[Sequence[float]] = None) -> Optional[List[int]]:
    """The split `fill` finds for `speeds` (rows per second, by rank) and `fixed` (seconds per step
    whatever the rows, by rank; none: zero) when it predicts a step more than `gain` faster than
    `rows`, else None. A pure function: every rank gets the same answer."""
    fixed = list(fixed) if fixed is not None else [0.0] * len(speeds)
    if len(speeds) != len(rows) or len(fixed) != len(rows) or not all(s > 0 for s in speeds) or \
            global_batch < len(rows):
        return None
    new = fill(global_batch, speeds, fixed)
    if new == list(rows) or predicted_s(new, speeds, fixed) >= (1 - gain) * predicted_s(rows, speeds, fixed):
        return None
    return new


@dataclass(frozen=True)
class Measured:
    """What one gather learnt: each rank's rows per second and fixed seconds per step, by rank, and the
    split it chose (None: kept)."""
    speeds: List[float]
    chosen: Optional[List[int]]
    fixed: Optional[List[float]] = None


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
        self.seconds, self.rows, self.fixed, self.steps, self.fresh = 0.0, 0, 0.0, 0, True

    def observe(self, seconds: float, rows: int, fixed: float = 0.0) -> None:
        """One step: `seconds` for its `rows` (forward and backward), `fixed` for the rest of its compute."""
        if self.fresh:
            self.fresh = False
            return
        self.seconds += seconds
        self.rows += rows
        self.fixed += max(fixed, 0.0)
        self.steps += 1

    def after(self, step: int, rows: Sequence[int]) -> Optional[Measured]:
        """At a gather step (every rank alike: `step` and the count of measured steps are the same on
        every rank): every rank's speed, and the new split if it is worth taking."""
        if step % self.every or self.steps < self.min_steps:
            return None
        everyone = self.gather([self.seconds, float(self.rows), self.fixed])
        speeds = [r / s if s > 0 else 0.0 for s, r, _ in everyone]
        fixed = [f / self.steps for _, _, f in everyone]  # every rank measured the same number of steps
        chosen = propose(self.global_batch, rows, speeds, self.gain, fixed)
        if chosen is None:  # keep measuring from here: the next gather sees the latest speeds only
            self.seconds, self.rows, self.fixed, self.steps = 0.0, 0, 0.0, 0
        else:
            self.restart()
        return Measured(speeds, chosen, fixed)
