"""Test-only fault injection inside a rank: off unless an MLX_TRAIN_TEST_* variable is set. Not for
real runs. (tools/faults.py, the fault matrix, sets these from outside, beside the faults it makes
itself: signals, links down, full disks.)

The trainer meets it at two seams only: once per training step (`Faults.around_step`) and once
per checkpoint write (`Faults.before_write`, in rank 0's background writer); the worker at one, the
ranks' hosts (`hosts`).

MLX_TRAIN_TEST_POISON="STEP:RANK:COUNT" gives RANK NaN weights for COUNT steps from step STEP (as
a flipped bit would give it a non-finite loss and gradients), in the run's first attempt only: a
resumed attempt is the recovery being tested.

MLX_TRAIN_TEST_BAD_DATA="DATA_STEP:RANK:COUNT" does the same whenever RANK trains on data steps
DATA_STEP .. DATA_STEP+COUNT-1 (rank/dataskip.py), in every attempt: a bad stretch of data, met
again by a replay unless the rollback steps past it.

After each such step whose update was skipped, the real weights are put back.

MLX_TRAIN_TEST_PERTURB="STEP:RANK" adds 1e-3 to one weight of RANK before step STEP, in the run's
first attempt only: a silent divergence (a flipped bit, a faulty device) that leaves the loss
finite, which only the ranks' parameter checksums reveal (controller/divergence.py).

MLX_TRAIN_TEST_ULP="RANK" makes RANK's AdamW arithmetic differ by one ulp, in every step of every
attempt: the first element its own update computes is moved to the next representable value, after
the update and before the parameters are shared (Spread.nudge). A GPU of another generation rounding
a reduction or a square root otherwise: under data parallel (every rank updates every parameter) the
ranks' checksums then differ though nothing is wrong; under owner updates (--shard optimizer, the rule
on unequal hardware: docs/advanced_training.md) each element is computed once and gathered, so they
do not.

MLX_TRAIN_TEST_CORRUPT="STEP:RANK" adds 1e-3 to one weight of RANK right after the step that makes
STEP steps done (before that step's checksum is taken), in the first attempt only: the divergence the
comparison still sees under owner updates, where a weight perturbed before a step (PERTURB) is
overwritten by the step's gather.

MLX_TRAIN_TEST_SLOW_WRITE="SECONDS" makes every checkpoint write take SECONDS longer: a slow disk,
for the watchdog's checkpoint allowance.

MLX_TRAIN_TEST_HOSTS="H0,H1,..." puts rank r on host Hr as `--shares auto` sees it (rank/balance.py
re-shares between hosts, never among one host's ranks): ranks of one machine taken as hosts apart,
one of them slowed by a cgroup as the test fleet's unequal hosts are (tests/test_shares.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

POISON = "MLX_TRAIN_TEST_POISON"
BAD_DATA = "MLX_TRAIN_TEST_BAD_DATA"
PERTURB = "MLX_TRAIN_TEST_PERTURB"
ULP = "MLX_TRAIN_TEST_ULP"
CORRUPT = "MLX_TRAIN_TEST_CORRUPT"
SLOW_WRITE = "MLX_TRAIN_TEST_SLOW_WRITE"
HOSTS = "MLX_TRAIN_TEST_HOSTS"


def hosts(given: Optional[List[int]], env: Mapping[str, str] = os.environ) -> Optional[List[int]]:
    """Each rank's host: MLX_TRAIN_TEST_HOSTS's when set, else `given` (the launcher's)."""
    text = env.get(HOSTS)
    return [int(x) for x in text.split(",")] if text else given


def _spec(env: Mapping[str, str], name: str) -> Optional[Tuple[int, ...]]:
    text = env.get(name)
    return tuple(int(x) for x in text.split(":")) if text else None


def _within(spec: Optional[Tuple[int, ...]], at: int, rank: int) -> bool:
    """Whether a STEP:RANK:COUNT spec covers step `at` on `rank`."""
    if spec is None:
        return False
    start, who, count = spec
    return who == rank and start <= at < start + count


@dataclass(frozen=True)
class Faults:
    """The faults this rank was asked for, read once from the environment."""

    stepper: Any
    rank: int
    poison: Optional[Tuple[int, ...]] = None
    bad_data: Optional[Tuple[int, ...]] = None
    perturb: Optional[Tuple[int, ...]] = None
    slow_write_s: float = 0.0
    ulp: Optional[Tuple[int, ...]] = None
    corrupt: Optional[Tuple[int, ...]] = None

    @classmethod
    def from_env(cls, stepper: Any, rank: int, env: Mapping[str, str] = os.environ) -> "Faults":
        return cls(stepper, rank, _spec(env, POISON), _spec(env, BAD_DATA), _spec(env, PERTURB),
                   float(env.get(SLOW_WRITE) or 0), _spec(env, ULP), _spec(env, CORRUPT))

    def around_step(self, step: int, data_step: int, resumed: bool, run: Callable[[], Any]) -> Any:
        """Run one training step (`run`, returning the step's stats) with the faults due at it."""
        real = self._poison(step, data_step, resumed)
        if self.perturb is not None and not resumed and self.perturb == (step, self.rank):
            self._change_first(lambda value: value + mx.array(1e-3, dtype=value.dtype))
        stats = self._one_ulp_off(run) if self.ulp == (self.rank,) else run()
        if real is not None and stats.skipped:
            self.stepper.set_params(real)
        if self.corrupt is not None and not resumed and self.corrupt == (step + 1, self.rank):
            self._change_first(lambda value: value + mx.array(1e-3, dtype=value.dtype))
        return stats

    def _one_ulp_off(self, run: Callable[[], Any]) -> Any:
        """`run` with this rank's update nudged by one ulp between computing and sharing it."""
        spread = self.stepper.spread
        update = spread.update

        def nudged(held: Any, norm: mx.array) -> None:
            update(held, norm)
            spread.nudge(_next_up)

        spread.update = nudged  # this step only: the instance's attribute hides the class's method
        try:
            return run()
        finally:
            del spread.update

    def before_write(self) -> None:
        if self.slow_write_s > 0:
            time.sleep(self.slow_write_s)

    def _poison(self, step: int, data_step: int, resumed: bool) -> Optional[dict]:
        """NaN weights when due; returns the real ones (or None)."""
        if not ((_within(self.poison, step, self.rank) and not resumed)
                or _within(self.bad_data, data_step, self.rank)):
            return None
        real = tree_unflatten(tree_flatten(self.stepper.params))  # a new tree: set_params overwrites in place
        self._change_first(lambda value: mx.full(value.shape, float("nan"), value.dtype))
        return real

    def _change_first(self, change: Callable[[mx.array], mx.array]) -> None:
        flat = tree_flatten(self.stepper.params)
        key, value = flat[0]
        flat[0] = (key, change(value))
        self.stepper.set_params(tree_unflatten(flat))


def _next_up(value: mx.array) -> mx.array:
    """`value` with its first element one ulp away (its bit pattern plus one), whatever the float dtype."""
    flat = value.reshape(-1)
    bits = mx.view(flat, {2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[value.itemsize])
    bumped = mx.concatenate([bits[:1] + mx.array(1, dtype=bits.dtype), bits[1:]])
    return mx.view(bumped, value.dtype).reshape(value.shape)
