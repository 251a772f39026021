"""Lanes: a CPU rank's micro-batch split across threads, each with its own MLX stream
(rank/lanes.py). The split changes float rounding only: the same update as one thread to 1e-6,
the same bits run after run, fresh dropout masks every step, and errors come back to the caller."""

import subprocess
import sys
import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_train.config import DistributedConfig, ModelConfig, OptimConfig
from mlx_train.rank import lanes
from mlx_train.rank.model import build_model
from mlx_train.rank.step import Stepper, make_optimizer

CFG = ModelConfig(n_layers=2, d_model=32, n_heads=2, seq_len=16)


def _stepper(n, model=None, loss=None, precision="fp32", checkpoint=False):
    mx.random.seed(0)
    if model is None:
        model, loss = build_model(CFG, grad_checkpoint=checkpoint)
    return Stepper(model, loss, make_optimizer(OptimConfig(warmup_steps=0), 10), precision, 1.0, None, lanes=n)


def _batches(rows, steps, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        t = rng.integers(0, 256, (rows, CFG.seq_len + 1)).astype(np.int32)
        out.append((t[:, :-1], t[:, 1:]))
    return out


def _train(s, batches, accumulation=1):
    losses = []
    for i, (x, y) in enumerate(batches):
        mx.random.seed(100 + i)  # the trainer seeds every step
        rows = x.shape[0] // accumulation
        losses.append(s.step([(x[j * rows:(j + 1) * rows], y[j * rows:(j + 1) * rows])
                              for j in range(accumulation)]).loss)
    return losses, {k: np.array(v) for k, v in tree_flatten(s.params)}


@pytest.mark.parametrize("n, rows, accumulation", [(2, 8, 1), (3, 5, 1), (2, 6, 2)])
def test_lanes_give_the_one_thread_update(n, rows, accumulation):
    batches = _batches(rows * accumulation, 3)
    one_losses, one = _train(_stepper(1), batches, accumulation)
    lane_losses, split = _train(_stepper(n), batches, accumulation)
    np.testing.assert_allclose(lane_losses, one_losses, rtol=1e-5)
    for k in one:
        np.testing.assert_allclose(split[k], one[k], atol=1e-6, rtol=0, err_msg=k)


@pytest.mark.parametrize("precision, checkpoint", [("bf16", False), ("fp32", True)])
def test_lanes_keep_bf16_and_gradient_checkpointing(precision, checkpoint):
    batches = _batches(8, 2)
    one_losses, one = _train(_stepper(1, precision=precision, checkpoint=checkpoint), batches)
    lane_losses, split = _train(_stepper(2, precision=precision, checkpoint=checkpoint), batches)
    np.testing.assert_allclose(lane_losses, one_losses, rtol=1e-2 if precision == "bf16" else 1e-5)
    assert all(v.dtype == np.float32 for v in split.values())  # fp32 master weights either way
    # bf16 rounds the two shards' activations differently; AdamW's first steps move a weight by up
    # to lr (3e-3) each whatever its gradient's size, so a near-zero gradient of the other sign
    # moves it 2 x lr the other way: 2 steps bound the difference by 1.2e-2.
    for k in one:
        np.testing.assert_allclose(split[k], one[k], atol=1.3e-2 if precision == "bf16" else 1e-6, rtol=0, err_msg=k)


@pytest.mark.multiproc
def test_a_rank_with_lanes_resumes_bit_for_bit(tmp_path):
    from helpers import TINY, metrics, straight_and_resumed

    straight, broken = straight_and_resumed(tmp_path, [*TINY, "--cpu-threads", "2", "--steps", "40", "--log-every",
                                                       "10", "--eval-every", "20", "--checkpoint-every", "10"], 20)
    assert "2 threads per micro-batch" in (straight / "logs" / "rank-0.log").read_text()
    assert metrics(straight)[-1]["param_checksum"] == metrics(broken)[-1]["param_checksum"]


def test_lanes_give_the_same_bits_every_run():
    batches = _batches(8, 3)
    first, second = _train(_stepper(2), batches), _train(_stepper(2), batches)
    assert first[0] == second[0]
    assert all(np.array_equal(first[1][k], second[1][k]) for k in first[1])


class _Dropped(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 16)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(16, 256)

    def __call__(self, x):
        return self.out(self.drop(self.emb(x)))


def _dropout_stepper():
    mx.random.seed(0)
    model = _Dropped()
    return _stepper(2, model, lambda m, x, y: nn.losses.cross_entropy(m(x), y, reduction="mean"))


def test_dropout_in_lanes_draws_fresh_masks_that_a_replay_repeats():
    x, y = _batches(8, 1)[0]
    s = _dropout_stepper()
    mx.random.seed(1)
    a = s.step([(x, y)]).loss
    s2 = _dropout_stepper()
    mx.random.seed(1)
    assert s2.step([(x, y)]).loss == a  # the same step seed: the same masks, bit for bit
    mx.random.seed(2)
    s3 = _dropout_stepper()
    assert s3.step([(x, y)]).loss != a  # another seed: other masks


def test_a_lane_error_reaches_the_caller_and_the_lanes_go_on():
    pool = lanes.Lanes(2)

    def boom():
        raise RuntimeError("lane failed")

    with pytest.raises(RuntimeError, match="lane failed"):
        pool.run([lambda: 1, boom])
    assert pool.run([lambda: threading.current_thread().name, lambda: 2]) == ["mlx-train-lane-0", 2]


def test_a_process_that_used_lanes_exits_cleanly():
    # MLX 0.32 aborts at exit ("terminate called without an active exception") when a thread that
    # ran graphs has ended: lane threads live as long as the process.
    code = ("import sys; sys.path.insert(0, 'tests'); import test_lanes as t; "
            "s = t._stepper(2); t._train(s, t._batches(4, 2)); print('done')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "done", res.stderr[-2000:]
    assert "terminate called" not in res.stderr


def test_the_lane_count_rule():
    gib = 1 << 30
    assert lanes.count(0, True, cores=2, rows=8, grad_bytes=1 << 20, memory_budget=gib) == 2
    assert lanes.count(0, True, cores=32, rows=64, grad_bytes=1 << 20, memory_budget=gib) == lanes.MAX_LANES
    assert lanes.count(0, True, cores=16, rows=4, grad_bytes=1 << 20, memory_budget=gib) == 4  # rows cap it
    assert lanes.count(0, False, cores=16, rows=8, grad_bytes=1 << 20, memory_budget=gib) == 1  # GPU
    assert lanes.count(3, True, cores=2, rows=8, grad_bytes=1 << 20, memory_budget=gib) == 3  # asked for
    assert lanes.count(1, True, cores=8, rows=8, grad_bytes=1 << 20, memory_budget=gib) == 1  # off
    # Each extra lane holds a copy of the gradients: at most a tenth of the budget for them.
    assert lanes.count(0, True, cores=8, rows=8, grad_bytes=gib // 25, memory_budget=gib) == 3


def test_shards_cover_the_rows_once():
    assert lanes.shards(5, 3) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert lanes.shards(8, 2) == [slice(0, 4), slice(4, 8)]


def test_cpu_threads_is_validated_at_the_edge():
    with pytest.raises(ValueError, match="cpu_threads must be 0"):
        DistributedConfig(cpu_threads=-1)
    assert DistributedConfig(cpu_threads=4).cpu_threads == 4


def test_lanes_weigh_masked_targets_by_tokens_not_rows():
    # Chat data masks prompts: here the first rows count 1 target each, the last rows all of
    # theirs. A lane's share by rows would weigh the sparse rows' few tokens as much as the rest.
    from mlx_train.rank.hf import masked_lm_loss

    batches = _batches(8, 2)
    for _, y in batches:
        y[:4, 1:] = -100
    one_losses, one = _train(_stepper(1, *_masked(masked_lm_loss)), batches)
    lane_losses, split = _train(_stepper(2, *_masked(masked_lm_loss)), batches)
    np.testing.assert_allclose(lane_losses, one_losses, rtol=1e-5)
    for k in one:
        np.testing.assert_allclose(split[k], one[k], atol=1e-6, rtol=0, err_msg=k)


def _masked(loss):
    mx.random.seed(0)
    model, _ = build_model(CFG)
    return model, loss
