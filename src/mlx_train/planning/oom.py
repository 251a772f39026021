"""The out-of-memory policy: was a rank's crash a lack of memory, and what to relaunch with.

The supervisor hands `OomPolicy.judge` the facts of one crash and gets a verdict (or None: not
memory); after an out-of-memory verdict, `next_config` walks the planner's recovery ladder (one
step smaller, same global batch) or says nothing smaller is left.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from typing import Optional

from mlx_train.config import TrainConfig
from mlx_train.protocol import EXIT_OUT_OF_MEMORY

# How a process dies when memory runs out: the OOM killer (SIGKILL), MLX under an address-space
# limit (SIGSEGV), Metal aborting a command buffer (SIGABRT); 128+n when ssh or mpirun relays it.
CRASH_SIGNALS = frozenset(int(s) for s in (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS))
ALLOC_FAILURE = re.compile(r"bad_alloc|[Uu]nable to allocate|[Oo]ut of memory|MemoryError|Cannot allocate memory|"
                           r"[Ff]ailed to allocate|Insufficient Memory")
# A crash counts as out of memory once the rank's memory (seen, or predicted for its step) had
# reached this fraction of its budget: a crash far below the budget is some other fault.
EVIDENCE_FRACTION = 0.5


@dataclass(frozen=True)
class CrashFacts:
    """What the supervisor knows of one rank's end."""
    rank: int
    code: int                       # as subprocess reports it: negative for a signal
    log: str = ""                   # this attempt's part of the rank's log
    peak: int = 0                   # the last peak memory the rank reported
    budget: int = 0                 # the budget it reported (0: unknown)
    reported: Optional[dict] = None  # the rank's own `oom` message, when it stopped itself


@dataclass(frozen=True)
class OomVerdict:
    reason: str   # the end of "rank 1 ..." in the restart line
    details: dict  # for the run's `oom` event


def signal_of(code: int) -> int:
    """The signal that ended a process: -code from wait(), or 128+n as shells, ssh and mpirun relay it."""
    return -code if code < 0 else code - 128 if code > 128 else 0


def _predicted(cfg: TrainConfig) -> int:
    """The planner's peak for `cfg`'s step (the built-in GPT or a pretrained model's config.json), or 0
    for a model whose shape it cannot know, or whose config.json is no longer readable here."""
    from mlx_train.errors import UserError
    from mlx_train.planning.planner import MemoryOptimizer

    if not cfg.model.kind.knows_shape:
        return 0
    try:
        if cfg.dist.pipeline_stages > 1:  # each rank holds its stage: the tightest stage's peak
            from mlx_train.planning.stages import peak

            return peak(cfg)
        return MemoryOptimizer.estimate(cfg)
    except (UserError, OSError, ValueError):
        return 0


class OomPolicy:
    """`recover=False` (the tuner's trials) still recognises out-of-memory but never reconfigures."""

    def __init__(self, recover: bool = True):
        self.recover = recover

    def judge(self, cfg: TrainConfig, facts: CrashFacts) -> Optional[OomVerdict]:
        if facts.code == EXIT_OUT_OF_MEMORY:
            return OomVerdict("passed its memory budget", dict(facts.reported or {"rank": facts.rank}))
        evidence = self._evidence(cfg, facts)
        if not evidence:
            return None
        what = f"killed by signal {-facts.code}" if facts.code < 0 else f"exit code {facts.code}"
        return OomVerdict(f"{what} {evidence}", {"rank": facts.rank, "code": facts.code, "evidence": evidence})

    def _evidence(self, cfg: TrainConfig, facts: CrashFacts) -> str:
        """Why this crash looks like running out of memory, or "" when it does not."""
        crashed = signal_of(facts.code) in CRASH_SIGNALS
        alloc_failed = bool(ALLOC_FAILURE.search(facts.log))
        if not (crashed or alloc_failed):
            return ""
        budget = facts.budget or cfg.memory_budget
        if not budget:
            return ""
        predicted = _predicted(cfg)
        if max(facts.peak, predicted) < EVIDENCE_FRACTION * budget:
            return ""
        what = "an allocation failure in its log" if alloc_failed else "a crash"
        return (f"({what} with memory at {max(facts.peak, predicted) / 2**20:.0f} MiB "
                f"{'predicted' if predicted > facts.peak else 'seen'} of a {budget / 2**20:.0f} MiB budget)")

    def next_config(self, cfg: TrainConfig) -> Optional[TrainConfig]:
        """One step down the ladder with the same global batch, or None when nothing smaller is left."""
        if not self.recover:
            return None
        from mlx_train.planning.planner import MemoryOptimizer

        return MemoryOptimizer.suggest_recovery_config(cfg)
