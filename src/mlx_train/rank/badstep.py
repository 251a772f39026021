"""Bad steps: counting the updates the step skipped because they were not finite.

The skip itself happens in Stepper.step, on every rank alike (a rank that skipped alone would
leave the group with different weights); this counts them in a row and reports each one, and the
supervisor rolls back to the last checkpoint after a few in a row.
"""

from __future__ import annotations

from mlx_train import protocol
from mlx_train.rank.step import StepStats


class BadSteps:
    def __init__(self):
        self.in_a_row = 0

    def after(self, step: int, stats: StepStats, rank: int) -> None:
        """Count skipped steps; rank 0 reports each one (the supervisor rolls back after a few in a row)."""
        self.in_a_row = self.in_a_row + 1 if stats.skipped else 0
        if stats.skipped and rank == 0:
            protocol.emit(protocol.BadStep(step=step, loss=stats.loss, grad_norm=stats.grad_norm,
                                           in_a_row=self.in_a_row))
