"""Unequal shares of the global batch (--shares): the row split, and runs that make the equal split's updates."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from helpers import TINY, cli, metrics, straight_and_resumed
from mlx_train.config import DistributedConfig
from mlx_train.errors import UserError
from mlx_train.rank.batcher import Batcher, Share, share_of, split_rows


@pytest.mark.parametrize("global_batch, weights", [
    (16, (3, 1)), (16, (1, 1)), (10, (1, 1, 1)), (7, (0.2, 5.0, 1.3)), (5, (1000, 1, 1)), (64, (2.5, 1, 0.5, 4)),
])
def test_rows_sum_to_the_batch_in_proportion(global_batch, weights):
    rows = split_rows(global_batch, weights)
    assert sum(rows) == global_batch and min(rows) >= 1
    spare, total = global_batch - len(weights), sum(weights)
    for r, w in enumerate(weights):
        # One row each, then the rest by weight: off by less than one row from the exact quota.
        assert abs(rows[r] - 1 - spare * w / total) < 1
    assert split_rows(global_batch, weights) == rows  # a pure function of its inputs


def test_rows_round_by_largest_remainder():
    assert split_rows(16, (3, 1)) == [12, 4]          # quotas 10.5 and 3.5: the tie goes to rank 0
    assert split_rows(12, (1, 1, 1, 1, 1)) == [3, 3, 2, 2, 2]
    assert split_rows(9, (2, 1)) == [6, 3]
    assert split_rows(4, (100, 1, 1, 1)) == [1, 1, 1, 1]  # every rank keeps a row
    with pytest.raises(UserError, match="cannot give each of 3 ranks a row"):
        split_rows(2, (1, 1, 1))


def test_a_rank_cuts_its_rows_into_micro_batches_of_at_most_the_batch_size():
    rows = [11, 3, 1]
    assert [share_of(r, rows, 4) for r in range(3)] == [
        Share(0, (4, 4, 3)),
        Share(11, (3,)),
        Share(14, (1,))]
    assert share_of(0, [5], 4).micro == (3, 2)


@pytest.mark.parametrize("weights", [(3, 1), (1, 2, 5)])
def test_the_windows_cover_the_equal_splits_samples_once(weights):
    b = Batcher(np.arange(40_000) % 251, 16, seed=3)
    dist = DistributedConfig(len(weights), 4, 2)
    G = dist.global_batch_size
    rows = split_rows(G, weights)
    for step in (0, 7, 300):  # 300 is past the first epoch
        equal = np.concatenate([b.window_ids(step, m, r, dist) for m in range(2) for r in range(len(weights))])
        unequal = []
        for r in range(len(weights)):
            share = share_of(r, rows, dist.batch_size_per_device)
            got = list(b.window(step, G, share))
            assert [len(x) for x, _ in got] == list(share.micro)
            unequal.extend(int(i) for m, size in enumerate(share.micro)
                           for i in b.ids_at(step, G, share.offset + sum(share.micro[:m]), size))
        assert sorted(unequal) == sorted(int(i) for i in equal) and len(set(unequal)) == G


def _run(tmp_path, name, *extra):
    run = tmp_path / name
    cli("train", *TINY, "--devices", "2", "--accumulation", "2", "--steps", "20", "--log-every", "1",
        "--eval-every", "20", "--run-dir", str(run), *extra, check=True)
    return metrics(run)


@pytest.mark.multiproc
def test_unequal_shares_make_the_equal_splits_updates(tmp_path):
    equal = _run(tmp_path, "equal", "--shares", "equal")
    unequal = _run(tmp_path, "unequal", "--shares", "3,1")  # rank 0: 12 rows in 3 micro-batches, rank 1: 4 in 1
    assert [m["step"] for m in equal] == [m["step"] for m in unequal] == list(range(1, 21))
    for a, b in zip(equal, unequal):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
    assert equal[-1]["loss"] < equal[0]["loss"] - 0.5  # it learned: the comparison is not of two idle runs
    # The replicas of the unequal run stay identical (each applies the same summed gradients).
    assert all(len(set(m["param_checksum"])) == 1 for m in unequal)
    assert unequal[-1]["rows"] == [12, 4] and equal[-1]["rows"] == [8, 8]
    # monitor --performance on the real run: each rank's rows, its own compute and wait time, its memory.
    spread = _spread_rows(tmp_path / "unequal")
    assert [row[:2] for row in spread] == [["0", "12"], ["1", "4"]]
    assert all(float(row[2]) > 0 and float(row[3]) >= 0 for row in spread), spread
    last = unequal[-1]  # rank 0's own times are the record's (its means, to the microsecond)
    assert abs(last["compute_time_s_by_rank"][0] - last["compute_time_s"]) <= 1e-6
    assert abs(last["comm_time_s_by_rank"][0] - last["comm_time_s"]) <= 1e-6


def _spread_rows(run_dir) -> list:
    """The body rows of `monitor --performance`'s per-rank spread table, split into cells."""
    from rich.console import Console

    from mlx_train.controller.monitor import spread_table, take_snapshot
    from mlx_train.rundir import RunDir

    console = Console(width=250, record=True)
    console.print(spread_table(take_snapshot(RunDir(run_dir))))
    cells = [line.replace("│", " ").split() for line in console.export_text().splitlines() if line.startswith("│")]
    return [c for c in cells if c and c[0].isdigit()]


@pytest.mark.multiproc
def test_resume_is_exact_under_unequal_shares(tmp_path):
    common = [*TINY, "--devices", "2", "--shares", "3,1", "--steps", "30", "--log-every", "10",
              "--eval-every", "30", "--checkpoint-every", "10"]
    straight, broken = straight_and_resumed(tmp_path, common, 20)
    a = mx.load(str(straight / "checkpoints" / "step-000030" / "model.safetensors"))
    b = mx.load(str(broken / "checkpoints" / "step-000030" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(np.array(a[k]), np.array(b[k])), f"{k} differs after resume"
    assert metrics(straight)[-1]["loss"] == metrics(broken)[-1]["loss"]


def test_monitor_shows_each_ranks_rows(tmp_path):
    from rich.console import Console

    from mlx_train.config import TrainConfig
    from mlx_train.controller.monitor import render, take_snapshot
    from mlx_train.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.prepare(TrainConfig(steps=30), resume=False)
    record = {"step": 10, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 100.0, "step_time_s": 0.1, "comm_time_s": 0.01,
              "compute_time_s": 0.09, "grad_norm": 1.0, "devices": 2, "grad_bytes": 4, "global_batch": 16,
              "peak_memory": [1 << 20, 1 << 20], "param_checksum": [7, 7], "rows": [12, 4], "time": 0.0, "attempt": 1}
    run.append(run.metrics_path, record)
    console = Console(width=200, record=True)
    console.print(render(take_snapshot(run), performance=True))
    lines = [line.replace("│", " ").replace("┃", " ").split() for line in console.export_text().splitlines()]
    assert ["rank", "peak", "memory", "param", "checksum", "rows"] in lines
    assert [(row[0], row[-1]) for row in lines if len(row) == 5 and row[3] == "00000007"] == [("0", "12"), ("1", "4")]
