"""The tests' fault injection inside a rank (rank/inject.py), at its one seam in the training loop,
on a real Stepper's step: which step each fault lands on, in which attempt, and what is put back."""

import math

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_train.config import ModelConfig, OptimConfig
from mlx_train.rank.inject import Faults
from mlx_train.rank.model import build_model
from mlx_train.rank.step import Stepper, make_optimizer

BATCH = [(np.arange(4 * 16).reshape(4, 16).astype(np.int32) % 256,) * 2]


def _stepper():
    mx.random.seed(0)
    model, loss = build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2, seq_len=16))
    return Stepper(model, loss, make_optimizer(OptimConfig(warmup_steps=0), 10), "fp32", 1.0, None)


def _weights(stepper) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(stepper.params)}


def _step(env: dict, step: int, data_step: int, resumed: bool, rank: int = 1):
    s = _stepper()
    before = _weights(s)
    stats = Faults.from_env(s, rank, env).around_step(step, data_step, resumed, lambda: s.step(BATCH))
    return stats, before, _weights(s)


def _same(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in a)


def test_poison_lands_on_its_steps_in_the_first_attempt_and_the_real_weights_come_back():
    env = {"MLX_TRAIN_TEST_POISON": "25:1:2"}
    for step, rank, resumed, poisoned in ((25, 1, False, True), (26, 1, False, True), (27, 1, False, False),
                                          (24, 1, False, False), (25, 0, False, False), (25, 1, True, False)):
        stats, before, after = _step(env, step, step, resumed, rank)
        assert stats.skipped == poisoned and math.isfinite(stats.loss) != poisoned, (step, rank, resumed)
        assert _same(before, after) == poisoned, (step, rank, resumed)  # skipped: the real weights, unchanged


def test_bad_data_lands_on_its_data_steps_in_every_attempt():
    env = {"MLX_TRAIN_TEST_BAD_DATA": "25:1:3"}
    assert _step(env, 40, 27, resumed=True)[0].skipped
    assert not _step(env, 27, 28, resumed=False)[0].skipped


def test_perturb_changes_one_weight_once_in_the_first_attempt():
    env = {"MLX_TRAIN_TEST_PERTURB": "23:1"}
    s = _stepper()
    before = _weights(s)
    faults = Faults.from_env(s, 1, env)
    seen = {}
    faults.around_step(23, 23, False, lambda: seen.update(_weights(s)))
    changed = [k for k in before if not np.array_equal(before[k], seen[k])]
    assert len(changed) == 1 and np.allclose(seen[changed[0]] - before[changed[0]], 1e-3, atol=1e-6)
    for step, resumed in ((22, False), (24, False), (23, True)):  # no other step, nor a resumed attempt
        now = _weights(s)
        faults.around_step(step, step, resumed, lambda: seen.update(_weights(s)))
        assert _same(now, seen), (step, resumed)
