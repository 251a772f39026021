"""Silent divergence: ranks whose parameters are no longer identical to the others'.

Data-parallel ranks apply the same averaged gradient to the same weights, so their parameter
checksums (sent with every metrics report and every checkpoint) are equal bit for bit. A rank
whose checksum differs (a flipped bit, a faulty device, a perturbed weight) poisons every later
step without making the loss non-finite. The supervisor rolls the run back to the newest
checkpoint written while all ranks agreed (checkpoints record it; rank/checkpoint.py skips the
others on resume).
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional, Sequence


def odd_ranks(checksums: Sequence[int]) -> List[int]:
    """The ranks whose checksum differs from the majority's ([] when all agree). On a tie (two
    ranks) rank 0's value is taken as the reference: the other one is named."""
    if len(set(checksums)) <= 1:
        return []
    counts = Counter(checksums)
    top = max(counts.values())
    reference = checksums[0] if counts[checksums[0]] == top else counts.most_common(1)[0][0]
    return [r for r, c in enumerate(checksums) if c != reference]


class Reports:
    """Each rank's own checksum reports, gathered into one step's complete set.

    Divergence is judged only on such a set: one step, every rank of the attempt, each value as
    that rank itself reported it. The lists rank 0 gathers for metrics and checkpoints can be
    stale: a ring all_gather during which a peer dies may return without an error with that
    peer's slot still holding its previous value (seen in the soak, docs/reliability.md), which
    would name a healthy rank as diverged. A rank that dies never completes its step's set, so no
    verdict is given on it; its exit ends the attempt instead.
    """

    def __init__(self, ranks: Sequence[int]) -> None:
        self.ranks = sorted(ranks)
        self.pending: Dict[int, Dict[int, int]] = {}
        self.judged = -1  # the newest step judged: a second report of it (a log and a checkpoint) is not

    def add(self, step: int, rank: int, value: int) -> Optional[List[int]]:
        """Record `rank`'s checksum after `step`; return the step's checksums in rank order once
        every rank has reported it (None until then, and for a step already judged)."""
        if step <= self.judged:
            return None
        self.pending.setdefault(step, {})[rank] = value
        if not set(self.ranks) <= set(self.pending[step]):
            return None
        got = self.pending.pop(step)
        self.judged = step
        for old in [s for s in self.pending if s < step]:
            del self.pending[old]  # a step some rank never reported: never to be judged
        return [got[r] for r in self.ranks]


class Agreement:
    """Which checkpoints were written while every rank agreed (the rollback targets)."""

    def __init__(self) -> None:
        self.agreed_steps: List[int] = []

    def checkpoint(self, step: int, agreed: Optional[bool]) -> None:
        if agreed is not False:
            self.agreed_steps.append(step)

    def rollback_step(self) -> Optional[int]:
        """The step of the newest checkpoint written while all ranks agreed, this session (None: none yet)."""
        return max(self.agreed_steps, default=None)
