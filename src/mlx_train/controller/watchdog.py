"""The progress watchdog: which rank went quiet for longer than the run's own pace allows.

Every rank reports each step (`hb`) and announces what takes longer than a step (start-up, the
first step, evaluation, a checkpoint write). A rank blocked in a collective cannot report either,
so when one rank freezes its peers go quiet too: the allowance is therefore group-wide, the
longest that any rank's announced phase earns, and the quietest rank is the suspect. For the same
reason a rank's quiet time counts from the end of the last announced phase at the latest: its
peers were waiting on that phase in their next collective and report only once it is over.

Allowances adapt: after warm-up a step may take `multiple` x the median step seen, never less than
`floor_s`; an evaluation or a checkpoint `multiple` x its own last durations once one was seen.
`override` (--stall-timeout) replaces all of these once a rank has finished its first step;
start-up and the first step keep their own allowances (imports, data, restore, compilation) or the
override where it is longer: a step slower than the first step's allowance (a large model fully
sharded over Ethernet gathers its weights 1.5 times a step) would otherwise end every attempt in
its first step, whatever the user asked for.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Iterable, List, Optional


@dataclass(frozen=True)
class Allowances:
    floor_s: float = 10.0
    multiple: float = 5.0
    warmup_steps: int = 3          # step times seen before the step allowance adapts
    startup_s: float = 300.0       # launch to the rank's `start`: imports, data, model, ring, restore
    first_step_s: float = 120.0    # `start` to the first `hb` (and the step allowance during warm-up)
    eval_s: float = 120.0          # until one evaluation was timed
    checkpoint_s: float = 120.0    # until one checkpoint write was timed


STARTUP, FIRST_STEP, STEP, EVAL, CHECKPOINT = "startup", "first step", "step", "eval", "checkpoint"


@dataclass
class _Rank:
    last: float                     # monotonic time of its last message
    phase: str = STARTUP
    step: int = 0
    began: float = 0.0              # when the current eval/checkpoint phase began
    stepped: bool = False           # has finished a step in this attempt


@dataclass(frozen=True)
class Stall:
    rank: int
    step: int
    phase: str                      # the phase that set the allowance
    quiet_s: float
    timeout_s: float
    quiet: List[int] = field(default_factory=list)  # every rank past the allowance, quietest first


class Watchdog:
    def __init__(self, ranks: Iterable[int], override: Optional[float] = None, allow: Allowances = Allowances(),
                 clock: Callable[[], float] = time.monotonic):
        self.override, self.allow, self.clock = override, allow, clock
        now = clock()
        self.ranks: Dict[int, _Rank] = {r: _Rank(now) for r in ranks}
        self.durations: Dict[str, Deque[float]] = {STEP: deque(maxlen=64), EVAL: deque(maxlen=8),
                                                   CHECKPOINT: deque(maxlen=8)}
        self.phase_ended = float("-inf")  # when the last announced eval/checkpoint phase ended

    # -- what the ranks say ------------------------------------------------------------------------
    def heard(self, rank: int) -> None:
        """Any message from `rank` is a sign of life."""
        if rank in self.ranks:
            self.ranks[rank].last = self.clock()

    def started(self, rank: int, step: int) -> None:
        r = self._touch(rank)
        r.phase, r.step = FIRST_STEP, step

    def stepped(self, rank: int, step: int, step_s: Optional[float]) -> None:
        r = self._touch(rank)
        if r.stepped and step_s is not None:  # the first step of an attempt compiles and warms caches
            self.durations[STEP].append(step_s)
        r.phase, r.step, r.stepped = STEP, step, True

    def phase(self, rank: int, name: str, step: int, done: bool) -> None:
        r = self._touch(rank)
        if name not in (EVAL, CHECKPOINT):
            return
        if not done:
            r.phase, r.began, r.step = name, r.last, step
        elif r.phase == name:
            self.durations[name].append(r.last - r.began)
            r.phase = STEP if r.stepped else FIRST_STEP
            self.phase_ended = r.last

    def _touch(self, rank: int) -> _Rank:
        r = self.ranks.setdefault(rank, _Rank(self.clock()))
        r.last = self.clock()
        return r

    # -- the judgement -----------------------------------------------------------------------------
    def allowance(self, phase: str) -> float:
        a = self.allow
        if phase == STARTUP:
            return max(a.startup_s, self.override or 0.0)
        if phase == FIRST_STEP:
            return max(a.first_step_s, self.override or 0.0)
        if self.override is not None:
            return self.override
        seen = self.durations[phase]
        if phase == STEP and len(seen) < a.warmup_steps:
            return a.first_step_s
        if not seen:
            return a.eval_s if phase == EVAL else a.checkpoint_s
        typical = statistics.median(seen) if phase == STEP else max(seen)
        return max(a.floor_s, a.multiple * typical)

    def timeout(self) -> tuple:
        """(seconds, phase): the longest allowance any rank's phase earns, for the whole group."""
        return max(((self.allowance(r.phase), r.phase) for r in self.ranks.values()), default=(self.allow.startup_s,
                                                                                               STARTUP))

    def check(self) -> Optional[Stall]:
        """The stall, when some rank has been quiet for longer than the group's allowance."""
        limit, phase = self.timeout()
        now = self.clock()
        since = {rank: max(r.last, self.phase_ended) for rank, r in self.ranks.items()}
        quiet = sorted((since[rank], rank) for rank in self.ranks if now - since[rank] > limit)
        if not quiet:
            return None
        last, rank = quiet[0]
        return Stall(rank, self.ranks[rank].step, phase, now - last, limit, [q for _, q in quiet])
