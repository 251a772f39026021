"""Fault injection for tests: off unless MLX_TRAIN_TEST_PERTURB is set. Not for real runs.

MLX_TRAIN_TEST_PERTURB="STEP:RANK" adds 1e-3 to one weight of RANK before step STEP, in the run's
first attempt only: a silent divergence (a flipped bit, a faulty device) that leaves the loss
finite, which only the ranks' parameter checksums reveal (controller/divergence.py). A resumed
attempt is the recovery being tested, so it is left alone.
"""

from __future__ import annotations

import os

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

PERTURB = "MLX_TRAIN_TEST_PERTURB"


def perturb_if_due(stepper, step: int, rank: int, resumed: bool) -> bool:
    spec = os.environ.get(PERTURB)
    if not spec or resumed:
        return False
    at, who = (int(x) for x in spec.split(":"))
    if (at, who) != (step, rank):
        return False
    flat = tree_flatten(stepper.params)
    key, value = flat[0]
    flat[0] = (key, value + mx.array(1e-3, dtype=value.dtype))
    stepper.set_params(tree_unflatten(flat))
    return True
