"""Bad steps: the data windows a rollback steps past (rank/dataskip.py), the --loss-spike limit
(rank/badstep.py) and its skip inside the real optimizer step."""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from helpers import TINY, cli, events

from mlx_train.config import ModelConfig, OptimConfig, TrainConfig
from mlx_train.rank import dataskip
from mlx_train.rank.badstep import LossSpike
from mlx_train.rank.model import build_model
from mlx_train.rank.step import Stepper, make_optimizer


def test_a_window_moves_the_data_of_its_steps_on_and_leaves_earlier_steps_alone():
    windows = [dataskip.window_for(25, 27)]
    assert windows == [[25, 3]]
    assert [dataskip.data_step(windows, s) for s in (0, 24, 25, 26)] == [0, 24, 28, 29]
    # A second rollback later on stacks on the first; nothing before it changes.
    windows.append(dataskip.window_for(40, 41))
    assert [dataskip.data_step(windows, s) for s in (24, 25, 39, 40)] == [24, 28, 42, 45]
    assert dataskip.data_step([], 7) == 7


def test_skip_data_round_trips_through_the_config_and_is_checked(tmp_path):
    cfg = TrainConfig(skip_data=[[25, 3]])
    cfg.to_yaml(tmp_path / "config.yaml")
    assert TrainConfig.from_yaml(tmp_path / "config.yaml", complete=True).skip_data == [[25, 3]]
    assert TrainConfig.trusted(cfg.to_dict()).skip_data == [[25, 3]]
    for bad in ([[25]], [[-1, 3]], [["a", 1]], "25:3"):
        try:
            TrainConfig(skip_data=bad)
        except ValueError as exc:
            assert "skip_data" in str(exc)
        else:
            raise AssertionError(f"skip_data={bad!r} was accepted")


def test_loss_spike_limit_follows_the_running_mean_after_warm_up():
    spike = LossSpike(3.0)
    for _ in range(LossSpike.WARMUP - 1):
        spike.observe(2.0, skipped=False)
    assert spike.limit() is None  # still warming up
    spike.observe(2.0, skipped=False)
    assert spike.limit() == 6.0
    spike.observe(100.0, skipped=True)  # a skipped step's loss never enters the mean
    spike.observe(float("nan"), skipped=False)
    assert spike.limit() == 6.0
    spike.observe(1.0, skipped=False)
    assert math.isclose(spike.limit(), 3.0 * (0.9 * 2.0 + 0.1 * 1.0))
    again = LossSpike(3.0)
    again.load(*spike.state())  # through a checkpoint's int64 gather: bit for bit
    assert (again.mean, again.seen) == (spike.mean, spike.seen)
    assert LossSpike(None).limit() is None


def _stepper():
    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=2, seq_len=16)
    mx.random.seed(0)
    model, loss = build_model(cfg)
    return Stepper(model, loss, make_optimizer(OptimConfig(warmup_steps=0), 10), "fp32", 1.0, None)


def test_a_loss_above_the_limit_skips_the_update_and_below_it_applies():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (4, 17)).astype(np.int32)
    batch = [(tokens[:, :-1], tokens[:, 1:])]
    s = _stepper()
    before = {k: np.array(v) for k, v in tree_flatten(s.params)}
    spiked = s.step(batch, loss_limit=0.5)  # a byte model's first loss is about ln(256) = 5.5
    assert spiked.skipped and math.isfinite(spiked.loss) and spiked.loss > 0.5
    assert all(np.array_equal(before[k], np.array(v)) for k, v in tree_flatten(s.params))
    assert int(s.optimizer.state["step"].item()) == 1  # the schedule still advances, as for a NaN
    fine = s.step(batch, loss_limit=1000.0)
    assert not fine.skipped
    assert any(not np.array_equal(before[k], np.array(v)) for k, v in tree_flatten(s.params))


@pytest.mark.multiproc
def test_loss_spike_run_resumes_bit_for_bit(tmp_path):
    """With a tight --loss-spike some steps are skipped; stopped and resumed in the middle, the run
    judges the same steps (the running means travel in the checkpoint) and ends on the same weights."""
    job = [*TINY, "--devices", "2", "--steps", "40", "--log-every", "10", "--checkpoint-every", "10",
           "--loss-spike", "1.05", "--max-restarts", "5", "--no-live"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    cli("train", *job, "--run-dir", str(straight), check=True)
    skipped = [e["step"] for e in events(straight, "bad_step")]
    assert skipped and all(e["loss_limit"] is not None for e in events(straight, "bad_step"))
    cli("train", *job, "--run-dir", str(broken), "--stop-after", "20", check=True)
    cli("train", "--resume", str(broken), check=True)
    assert [e["step"] for e in events(broken, "bad_step")] == skipped
    a = mx.load(str(straight / "checkpoints" / "step-000040" / "model.safetensors"))
    b = mx.load(str(broken / "checkpoints" / "step-000040" / "model.safetensors"))
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
