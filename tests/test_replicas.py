"""Replicas that stay identical on unequal hardware (docs/advanced_training.md, "Unequal hardware: owner
updates"): one rank's AdamW arithmetic one ulp off (MLX_TRAIN_TEST_ULP, as a GPU of another generation
may round) is a divergence under data parallel and none under owner updates (--shard optimizer), where a
real one (a weight corrupted before the comparison) is still caught. Two loopback ranks, a few steps."""

import mlx.core as mx
import numpy as np
import pytest

from helpers import TINY, cli, events, metrics
from mlx_train.rank.inject import _next_up

# No restarts: the first divergence ends the run, so each case is one short launch.
COMMON = [*TINY, "--devices", "2", "--steps", "6", "--log-every", "2", "--eval-every", "100",
          "--checkpoint-every", "100", "--max-restarts", "0", "--no-live"]


def test_next_up_moves_the_first_element_by_one_ulp_in_any_float_dtype():
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        value = mx.array([[1.0, 2.0], [3.0, 4.0]], dtype=dtype)
        up = _next_up(value)
        assert up.dtype == dtype and up.shape == value.shape
        assert np.array_equal(np.array(up.astype(mx.float32))[0, 1:], [2.0]) and np.array_equal(
            np.array(up.astype(mx.float32))[1], [3.0, 4.0])
        first = float(up[0, 0].astype(mx.float32).item())
        assert first > 1.0 and first - 1.0 == float(mx.finfo(dtype).eps)


@pytest.mark.multiproc
def test_an_ulp_of_arithmetic_is_a_divergence_under_data_parallel(tmp_path):
    out = cli("train", *COMMON, "--shard", "none", "--run-dir", str(tmp_path), env={"MLX_TRAIN_TEST_ULP": "1"})
    assert out.returncode != 0, out.stdout + out.stderr
    diverged = events(tmp_path, "diverged")
    # The first comparison already differs: every update of rank 1 is its own.
    assert diverged and diverged[0]["rank"] == 1 and diverged[0]["step"] == 2, out.stdout + out.stderr


@pytest.mark.multiproc
def test_owner_updates_keep_unequal_arithmetic_identical_and_still_catch_a_corrupted_weight(tmp_path):
    env = {"MLX_TRAIN_TEST_ULP": "1", "MLX_TRAIN_TEST_CORRUPT": "6:1"}
    out = cli("train", *COMMON, "--shard", "optimizer", "--run-dir", str(tmp_path), env=env)
    assert out.returncode != 0, out.stdout + out.stderr
    diverged = events(tmp_path, "diverged")
    assert diverged and diverged[0]["rank"] == 1 and diverged[0]["step"] == 6, out.stdout + out.stderr
    # Steps 2 and 4: rank 1 computed its slice one ulp off, and both ranks hold that same slice.
    agreed = [m for m in metrics(tmp_path) if m["step"] < 6]
    assert [m["step"] for m in agreed] == [2, 4]
    assert all(m["param_checksum"][0] == m["param_checksum"][1] for m in agreed)
