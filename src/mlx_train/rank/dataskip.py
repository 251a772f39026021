"""Stepping past bad data: which data step each optimizer step trains on.

The data of a step is a pure function of (seed, data step) (data.py). Without skips the data step is
the optimizer step. After a run of bad steps (non-finite or spiking losses) the supervisor rolls
the group back to its last checkpoint; replaying the same batches would meet the same bad data
again, so it records a window `[step, count]` (TrainConfig.skip_data, in the run's config.yaml and
passed to every rank with the config): from optimizer step `step` on, the data is taken `count`
steps further along. The map is a pure function of the windows, so every rank agrees, a resume is
exact, and steps before a window keep their data (a replay up to the bad steps trains on what the
first pass did).
"""

from __future__ import annotations

from typing import List, Sequence


def data_step(windows: Sequence[Sequence[int]], step: int) -> int:
    """The data step that optimizer step `step` (counted from 0) trains on."""
    return step + sum(count for at, count in windows if at <= step)


def window_for(first: int, last: int) -> List[int]:
    """The window that steps past the data of the bad optimizer steps `first`..`last` (from 0).

    Resumed from a checkpoint at or before `first`, step `first` trains on the data after the bad
    run's. (From a checkpoint inside the bad run, a few good batches after it are passed over too.)"""
    return [first, last - first + 1]
