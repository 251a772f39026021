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
from typing import List, Optional, Sequence


def odd_ranks(checksums: Sequence[int]) -> List[int]:
    """The ranks whose checksum differs from the majority's ([] when all agree). On a tie (two
    ranks) rank 0's value is taken as the reference: the other one is named."""
    if len(set(checksums)) <= 1:
        return []
    counts = Counter(checksums)
    top = max(counts.values())
    reference = checksums[0] if counts[checksums[0]] == top else counts.most_common(1)[0][0]
    return [r for r, c in enumerate(checksums) if c != reference]


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
