"""Fault injection for tests: off unless MLX_TRAIN_TEST_POISON is set. Not for real runs.

MLX_TRAIN_TEST_POISON="STEP:RANK:COUNT" gives RANK NaN weights for COUNT steps from step STEP (as
a bad batch or a flipped bit would give it a non-finite loss and gradients), in the run's first
attempt only: a resumed attempt is the recovery being tested. The trainer puts the real weights
back after each such step whose update was skipped.
"""

from __future__ import annotations

import os
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

POISON = "MLX_TRAIN_TEST_POISON"


def poison_if_due(stepper, step: int, rank: int, resumed: bool) -> Optional[dict]:
    """Poison `stepper`'s weights for this step when the hook says so; return the real ones (or None)."""
    spec = os.environ.get(POISON)
    if not spec or resumed:
        return None
    at, who, count = (int(x) for x in spec.split(":"))
    if who != rank or not at <= step < at + count:
        return None
    flat = tree_flatten(stepper.params)
    real = tree_unflatten(list(flat))  # the same arrays in a new tree: set_params overwrites in place
    key, value = flat[0]
    flat[0] = (key, mx.full(value.shape, float("nan"), value.dtype))
    stepper.set_params(tree_unflatten(flat))
    return real
