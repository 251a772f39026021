"""A pipeline's failures (docs/pipeline.md, "Failure"): a stage's host lost for good re-plans the
stages over the devices left (elastic.restage), or says in one line what the run needs; a stalled
stage is found by the progress watchdog like any stalled rank, and no rank of it waits on in a recv."""

from dataclasses import replace

import pytest

from mlx_train.config import DistributedConfig, TrainConfig
from mlx_train.controller import elastic
from mlx_train.errors import UserError
from mlx_train.fleet.hosts import Host

MiB = 2**20


def _hosts(n):
    return [Host(f"h{i}", f"10.0.0.{i}", python="/usr/bin/python3", slots=1) for i in range(1, n + 1)]


def _pipeline(devices, stages, batch, accumulation, budget):
    return TrainConfig(dist=DistributedConfig(devices, batch, accumulation, pipeline_stages=stages),
                       memory_budget=budget)


def test_a_lost_stage_host_unpipelines_when_one_device_holds_the_model():
    run = _pipeline(2, 2, 4, 4, 4096 * MiB)
    new = elastic.resplit(run, _hosts(1))
    assert (new.dist.num_devices, new.dist.pipeline_stages, new.dist.global_batch_size) == (1, 1, 16)


def test_a_lost_replica_host_keeps_the_stages_when_the_model_fits_no_device():
    # 2 replicas of 2 stages, 4 x 2 rows each: with 2 devices left, one replica of the same stages
    # takes the whole global batch in more micro-batches of the same size.
    run = _pipeline(4, 2, 4, 2, 1 * MiB)
    new = elastic.resplit(run, _hosts(2))
    d = new.dist
    assert (d.num_devices, d.pipeline_stages, d.batch_size_per_device, d.gradient_accumulation) == (2, 2, 4, 4)
    assert d.global_batch_size == run.dist.global_batch_size == 16


@pytest.mark.parametrize("left", [1, 3])
def test_stages_that_fit_nowhere_stop_with_what_they_need(left):
    with pytest.raises(UserError) as err:
        elastic.resplit(_pipeline(4, 2, 4, 2, 1 * MiB), _hosts(left))
    msg = str(err.value)
    assert "\n" not in msg and "a multiple of 2 devices" in msg and "MiB per device to train unpipelined" in msg, msg
