"""`--shares auto` (the default): each host's rows of the global batch from its measured speed.

Every rank times its own forward and backward passes (the part of a step that grows with its rows)
and the rest of its compute (the update: the same work on every rank, but not the same time on
unequal hosts, where a slow host's update alone can cost what a few rows do). At steps that are
multiples of EVERY, one all_gather of a three-number vector per rank (seconds, rows, the rest's
seconds) tells every rank every rank's numbers; each then computes the same new split from the same
bytes, so no rank ever decides alone and no message besides that gather is needed.

Hosts, not ranks, are measured and re-shared. Ranks on one host share its cores, its memory and
its memory bandwidth, so the differences between their measured speeds are contention and noise,
not hardware: splitting rows among them by those numbers would move rows back and forth on a
loaded machine for no gain, and make two runs of one config differ in their last bits. So each
host's speed is its ranks' summed rows over their summed seconds (the rate each of its ranks
works at, side by side), its fixed seconds per step the largest of its ranks' (all wait for the
last), and `fill` splits the global batch between the hosts: each host starts with a row per rank,
then each row goes to the host that would finish it first (its fixed part plus its most loaded
rank's rows over its speed; ties to the lower host), so the slowest host's step is as short as
whole rows allow. `spread` then gives every rank of a host an equal part of the host's rows, the
remainder one row each to its lowest ranks (not rows in units of a host's rank count: two hosts
of 3 ranks could then never split a global batch of 8): a pure function of the gathered bytes and
of which host each rank is on (launch.py tells every rank every rank's host, the same list
everywhere; a resume whose saved rows one host's ranks would not share equally starts equal).
Hence a run whose ranks are all on one host (every local run) keeps the equal split for good
under `auto`, bit for bit the `--shares equal` run (the trainer does not even gather there).

Hysteresis keeps the shares from flapping: a new split is taken only when it predicts a step at
least GAIN faster than the split in force, and never more often than every EVERY steps. The first
step after a start, a resume or a re-share is not measured (it traces the graphs of new
micro-batch shapes).

Which samples form global batch n stays a function of (seed, n): only the cut of each global batch
between the ranks moves, and the step's mathematics is the equal split's (rank/step.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

EVERY = 10       # steps between the gathers (and so the most often shares can change)
MIN_STEPS = 3    # measured steps a gather needs since the last one (or the start)
GAIN = 0.10      # a new split must predict a step this much faster than the one in force


def groups_of(hosts: Sequence[int]) -> List[List[int]]:
    """Each host's ranks, from `hosts` (each rank's host, by any id): hosts in the order of their
    lowest rank, ranks in order."""
    order: dict = {}
    for rank, host in enumerate(hosts):
        order.setdefault(host, []).append(rank)
    return list(order.values())


def each_rank_a_host(size: int) -> List[int]:
    """`hosts` for ranks that each have a host of their own."""
    return list(range(size))


def by_host(everyone: Sequence[Sequence[float]], hosts: Sequence[int], steps: int) -> Tuple[List[float], List[float]]:
    """From each rank's gathered (seconds, rows, fixed seconds) over `steps` measured steps: each
    host's speed (its ranks' rows over their seconds: rows per second per rank) and fixed seconds
    per step (its slowest rank's), hosts as `groups_of` orders them."""
    speeds, fixed = [], []
    for ranks in groups_of(hosts):
        seconds, rows = sum(everyone[r][0] for r in ranks), sum(everyone[r][1] for r in ranks)
        speeds.append(rows / seconds if seconds > 0 else 0.0)
        fixed.append(max(everyone[r][2] for r in ranks) / max(steps, 1))
    return speeds, fixed


def spread(host_rows: Sequence[int], hosts: Sequence[int]) -> List[int]:
    """Each rank's rows when each host's `host_rows` are split equally among its ranks, the
    remainder one row each to its lowest ranks."""
    rows = [0] * len(hosts)
    for total, ranks in zip(host_rows, groups_of(hosts)):
        q, extra = divmod(total, len(ranks))
        for i, r in enumerate(ranks):
            rows[r] = q + (1 if i < extra else 0)
    return rows


def predicted_s(rows: Sequence[int], speeds: Sequence[float], fixed: Optional[Sequence[float]] = None,
                hosts: Optional[Sequence[int]] = None) -> float:
    """The compute part of a synchronous step under each rank's `rows`: the slowest rank's (its
    host's fixed seconds and its rows at its host's speed), since all wait for it. `speeds` and
    `fixed` are by host (`groups_of(hosts)`; no hosts: each rank its own)."""
    hosts = each_rank_a_host(len(rows)) if hosts is None else hosts
    fixed = fixed or [0.0] * len(speeds)
    host = {r: h for h, ranks in enumerate(groups_of(hosts)) for r in ranks}
    return max(fixed[host[r]] + n / speeds[host[r]] for r, n in enumerate(rows))


def fill(global_batch: int, speeds: Sequence[float], fixed: Sequence[float],
         ranks: Optional[Sequence[int]] = None) -> List[int]:
    """Each host's rows of `global_batch` (hosts of `ranks` ranks each; none: one each) that make the
    slowest host's predicted time (its `fixed` seconds plus its most loaded rank's rows over its
    speed) as small as whole rows allow: a row per rank, then each row to the host that would
    finish it first (ties to the lower host). For hosts of one rank without fixed parts this is the
    split proportional to the speeds. Plain float arithmetic on the same gathered numbers: the same
    answer on every rank."""
    ranks = list(ranks) if ranks is not None else [1] * len(speeds)
    rows = list(ranks)

    def done(h: int, n: int) -> float:
        return fixed[h] + -(-n // ranks[h]) / speeds[h]

    for _ in range(global_batch - sum(ranks)):
        h = min(range(len(speeds)), key=lambda i: (done(i, rows[i] + 1), i))
        rows[h] += 1
    return rows


def propose(global_batch: int, rows: Sequence[int], speeds: Sequence[float], gain: float = GAIN,
            fixed: Optional[Sequence[float]] = None, hosts: Optional[Sequence[int]] = None) -> Optional[List[int]]:
    """Each rank's rows under the split `fill` finds for the hosts' `speeds` (rows per second per
    rank) and `fixed` (seconds per step whatever the rows; none: zero), by host of `hosts` (each
    rank's host; none: each rank its own), when it predicts a step more than `gain` faster than
    `rows` (each rank's, in force); else None. A pure function: every rank gets the same answer."""
    hosts = each_rank_a_host(len(rows)) if hosts is None else list(hosts)
    groups = groups_of(hosts)
    fixed = list(fixed) if fixed is not None else [0.0] * len(speeds)
    if len(hosts) != len(rows) or len(speeds) != len(groups) or len(fixed) != len(groups) or \
            not all(s > 0 for s in speeds) or global_batch < len(rows):
        return None
    new = spread(fill(global_batch, speeds, fixed, [len(g) for g in groups]), hosts)
    if new == list(rows) or \
            predicted_s(new, speeds, fixed, hosts) >= (1 - gain) * predicted_s(rows, speeds, fixed, hosts):
        return None
    return new


@dataclass(frozen=True)
class Measured:
    """What one gather learnt: each host's rows per second (per rank) and fixed seconds per step,
    hosts in the order of their lowest rank, and the split it chose, by rank (None: kept)."""
    speeds: List[float]
    chosen: Optional[List[int]]
    fixed: Optional[List[float]] = None


class Balancer:
    """One rank's side of `--shares auto`. `observe` after every step, `after` at the end of every
    step: every rank calls both at the same steps, so the gather in `after` meets on every rank.
    `hosts`: each rank's host (the same list on every rank); none: each rank its own."""

    def __init__(self, global_batch: int, gather: Callable[[List[float]], List[List[float]]],
                 every: int = EVERY, min_steps: int = MIN_STEPS, gain: float = GAIN,
                 hosts: Optional[Sequence[int]] = None):
        self.global_batch, self.gather = global_batch, gather
        self.every, self.min_steps, self.gain = every, min_steps, gain
        self.hosts = list(hosts) if hosts is not None else None
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
        every rank): every host's speed, and the new split if it is worth taking."""
        if step % self.every or self.steps < self.min_steps:
            return None
        everyone = self.gather([self.seconds, float(self.rows), self.fixed])
        hosts = self.hosts if self.hosts is not None else each_rank_a_host(len(everyone))
        speeds, fixed = by_host(everyone, hosts, self.steps)  # every rank measured the same number of steps
        chosen = propose(self.global_batch, rows, speeds, self.gain, fixed, hosts)
        if chosen is None:  # keep measuring from here: the next gather sees the latest speeds only
            self.seconds, self.rows, self.fixed, self.steps = 0.0, 0, 0.0, 0
        else:
            self.restart()
        return Measured(speeds, chosen, fixed)
