"""The split of a global batch (config.Split) and the one per-rank budget (rank/device.rank_budget_for):
the invariant holds at construction, a config reads and takes a split, one wording, one event record."""

from dataclasses import replace

import pytest

from mlx_train.config import DistributedConfig, Split, TrainConfig
from mlx_train.controller.launch import local_hosts
from mlx_train.fleet.hosts import Host
from mlx_train.planning.tuner import Tuner
from mlx_train.rank.device import BUDGET_FRACTION, ThisHost, device_memory, rank_budget_for

GiB = 2**30


def test_a_split_that_changes_the_global_batch_cannot_be_built():
    assert Split(16, 2, 4, 2).accumulation == 2
    with pytest.raises(ValueError, match="2 devices x 4 per device x 1 accumulation is 8, not the global batch 16"):
        Split(16, 2, 4, 1)
    with pytest.raises(ValueError, match="not the global batch"):
        replace(Split(16, 2, 4, 2), batch=8)  # a change must make up the rest in accumulation
    assert replace(Split(16, 2, 4, 2), batch=8, accumulation=1).global_batch == 16
    with pytest.raises(ValueError, match="precision"):
        Split(8, 1, 8, 1, precision="fp16")


def test_a_config_reads_and_takes_a_split_and_keeps_the_rest():
    cfg = TrainConfig(dist=DistributedConfig(num_devices=4, batch_size_per_device=2, gradient_accumulation=3,
                                             backend="mpi", ring_connections=2), precision="bf16")
    split = Split.of(cfg)
    assert split == Split(24, 4, 2, 3, False, "bf16")
    new = Split(24, 2, 4, 3, True, "fp32").apply(cfg)
    assert Split.of(new) == Split(24, 2, 4, 3, True, "fp32")
    assert (new.dist.backend, new.dist.ring_connections, new.steps) == ("mpi", 2, cfg.steps)


def test_a_split_prints_and_records_itself_one_way():
    split = Split(16, 2, 4, 2, True, "bf16")
    assert str(split) == "4 per device x 2 accumulation, checkpointing on, bf16"
    assert split.event() == {"devices": 2, "global_batch": 16, "batch_size_per_device": 4,
                             "gradient_accumulation": 2, "grad_checkpoint": True, "precision": "bf16"}


def test_the_tuners_candidates_are_splits_of_the_same_global_batch():
    base = TrainConfig(dist=DistributedConfig(num_devices=2, batch_size_per_device=8))
    trials = Tuner(base, GiB, 3, False, measure=None).candidates()
    assert {t.split.batch for t in trials} == {1, 2, 4, 8}
    assert all(t.split.global_batch == 16 and Split.of(t.apply(base)) == t.split for t in trials)


def test_one_budget_per_rank_for_planner_and_rank():
    given = TrainConfig(memory_budget=3 * GiB)
    hosts = [Host("a", "10.0.0.1", slots=1, memory=16 * GiB), Host("b", "10.0.0.2", slots=2, memory=16 * GiB)]
    assert rank_budget_for(given, hosts) == 3 * GiB
    # The tightest host's share: b splits its memory between two ranks.
    assert rank_budget_for(TrainConfig(), hosts) == int(16 * GiB * BUDGET_FRACTION / 2)
    # A local rank measures the budget the controller planned its split with.
    assert rank_budget_for(TrainConfig(), [ThisHost(2)]) == rank_budget_for(TrainConfig(), local_hosts(2)) \
        == int(device_memory()[0] * BUDGET_FRACTION / 2)


def test_the_planner_splits_a_runs_global_batch_over_its_hosts_or_says_why_not():
    from mlx_train.errors import UserError
    from mlx_train.planning.planner import split_for

    cfg = TrainConfig(dist=DistributedConfig(num_devices=4, batch_size_per_device=6), memory_budget=GiB)
    hosts = [Host(f"h{i}", f"10.0.0.{i}", slots=1) for i in (1, 2, 3)]
    plan = split_for(cfg, hosts)
    assert plan.fits and plan.split.devices == 3 and plan.split.global_batch == 24
    with pytest.raises(UserError, match="cannot be split evenly over 5 devices"):
        split_for(cfg, [Host("h4", "10.0.0.4", slots=5)])
    with pytest.raises(UserError, match="no split of the global batch 24 over 3 devices fits"):
        split_for(replace(cfg, memory_budget=2**20), hosts)
