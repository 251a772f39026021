"""Fault injection for tests: off unless MLX_TRAIN_TEST_POISON or MLX_TRAIN_TEST_BAD_DATA is set.
Not for real runs.

MLX_TRAIN_TEST_POISON="STEP:RANK:COUNT" gives RANK NaN weights for COUNT steps from step STEP (as
a flipped bit would give it a non-finite loss and gradients), in the run's first attempt only: a
resumed attempt is the recovery being tested.

MLX_TRAIN_TEST_BAD_DATA="DATA_STEP:RANK:COUNT" does the same whenever RANK trains on data steps
DATA_STEP .. DATA_STEP+COUNT-1 (rank/dataskip.py), in every attempt: a bad stretch of data, met
again by a replay unless the rollback steps past it.

The trainer puts the real weights back after each such step whose update was skipped.

MLX_TRAIN_TEST_SLOW_WRITE="SECONDS" makes every checkpoint write (in rank 0's background writer)
take SECONDS longer: a slow disk, for the watchdog's checkpoint allowance.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

POISON = "MLX_TRAIN_TEST_POISON"
BAD_DATA = "MLX_TRAIN_TEST_BAD_DATA"
SLOW_WRITE = "MLX_TRAIN_TEST_SLOW_WRITE"


def delay_write() -> None:
    seconds = float(os.environ.get(SLOW_WRITE) or 0)
    if seconds > 0:
        time.sleep(seconds)


def _due(name: str, step: int, rank: int) -> bool:
    spec = os.environ.get(name)
    if not spec:
        return False
    at, who, count = (int(x) for x in spec.split(":"))
    return who == rank and at <= step < at + count


def poison_if_due(stepper, step: int, rank: int, resumed: bool, data_step: Optional[int] = None) -> Optional[dict]:
    """Poison `stepper`'s weights for this step when a hook says so; return the real ones (or None)."""
    first_attempt = _due(POISON, step, rank) and not resumed
    bad_data = data_step is not None and _due(BAD_DATA, data_step, rank)
    if not (first_attempt or bad_data):
        return None
    flat = tree_flatten(stepper.params)
    real = tree_unflatten(list(flat))  # the same arrays in a new tree: set_params overwrites in place
    key, value = flat[0]
    flat[0] = (key, mx.full(value.shape, float("nan"), value.dtype))
    stepper.set_params(tree_unflatten(flat))
    return real
