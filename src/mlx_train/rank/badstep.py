"""Bad steps: counting the updates the step skipped because they were not finite (or, with
--loss-spike, because the loss jumped far above its running mean).

The skip itself happens in Stepper.step, on every rank alike (a rank that skipped alone would
leave the group with different weights); this counts them in a row and reports each one, and the
supervisor rolls back to the last checkpoint after a few in a row and steps past their data
(rank/dataskip.py).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

from mlx_train import protocol
from mlx_train.rank.step import StepStats


class BadSteps:
    def __init__(self):
        self.in_a_row = 0

    def after(self, step: int, stats: StepStats, rank: int, data_step: Optional[int] = None,
              loss_limit: Optional[float] = None) -> None:
        """Count skipped steps; rank 0 reports each one (the supervisor rolls back after a few in a row)."""
        self.in_a_row = self.in_a_row + 1 if stats.skipped else 0
        if stats.skipped and rank == 0:
            protocol.emit(protocol.BadStep(step=step, loss=stats.loss, grad_norm=stats.grad_norm,
                                           in_a_row=self.in_a_row, data_step=data_step, loss_limit=loss_limit))


class LossSpike:
    """--loss-spike X: the limit above which this rank's loss makes a step bad, X times the running
    mean (an exponential moving average) of its losses in good steps, once WARMUP of them were seen.

    Each rank judges the loss of its own micro-batches (a bad batch lands on one rank, where it
    stands out most); its verdict reaches every rank through the gradient sum (Stepper.step), as a
    non-finite loss does, so all skip together without another collective. The running mean is
    part of the checkpoint (state/load), so a resumed run judges exactly as the first one did.
    """

    WARMUP = 10
    DECAY = 0.9

    def __init__(self, factor: Optional[float]):
        self.factor, self.mean, self.seen = factor, 0.0, 0

    def limit(self) -> Optional[float]:
        if self.factor is None or self.seen < self.WARMUP:
            return None
        return self.factor * self.mean

    def observe(self, loss: float, skipped: bool) -> None:
        if skipped or not math.isfinite(loss):
            return
        self.mean = loss if self.seen == 0 else self.DECAY * self.mean + (1 - self.DECAY) * loss
        self.seen += 1

    def state(self) -> Tuple[int, int]:
        """(the mean's float64 bits, the count) as integers, to travel in an int64 all_gather."""
        return int(np.array(self.mean, dtype=np.float64).view(np.int64)), self.seen

    def load(self, bits: int, seen: int) -> None:
        self.mean, self.seen = float(np.array(bits, dtype=np.int64).view(np.float64)), int(seen)
