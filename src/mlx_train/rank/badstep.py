"""Bad steps: an update whose loss or gradient norm is not finite is skipped, on every rank alike.

The gradient norm is computed after the gradients are summed, so it is the same on every rank;
the loss is each rank's own, so one tiny all_sum of a flag makes the ranks agree. A rank that
skipped alone would leave the group with different weights.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from mlx_train import protocol
from mlx_train.rank.step import StepStats


class BadSteps:
    def __init__(self, group: Optional[mx.distributed.Group]):
        self.group = group
        self.in_a_row = 0

    def guard(self, loss: mx.array, norm: mx.array) -> bool:
        """Stepper.guard: True to apply this update."""
        bad = mx.logical_not(mx.logical_and(mx.isfinite(loss), mx.isfinite(norm))).astype(mx.int32)
        if self.group is not None and self.group.size() > 1:
            bad = mx.distributed.all_sum(bad, group=self.group)
        return int(bad.item()) == 0

    def after(self, step: int, stats: StepStats, rank: int) -> None:
        """Count skipped steps; rank 0 reports each one (the supervisor rolls back after a few in a row)."""
        self.in_a_row = self.in_a_row + 1 if stats.skipped else 0
        if stats.skipped and rank == 0:
            protocol.emit(protocol.BadStep(step=step, loss=stats.loss, grad_norm=stats.grad_norm,
                                           in_a_row=self.in_a_row))
