"""A pipeline's failures (docs/pipeline.md, "Failure"): a stage's host lost for good re-plans the
stages over the devices left (elastic.restage), or says in one line what the run needs; a stalled
stage is found by the progress watchdog like any stalled rank, and no rank of it waits on in a recv."""

import os
import signal
from dataclasses import replace

import pytest

from helpers import TINY, assert_ranks_gone, cli, events, metrics, popen, wait_for
from mlx_train.config import DistributedConfig, ModelConfig, TrainConfig
from mlx_train.controller import elastic
from mlx_train.errors import UserError
from mlx_train.fleet.hosts import Host

MiB = 2**20


def _hosts(n):
    return [Host(f"h{i}", f"10.0.0.{i}", python="/usr/bin/python3", slots=1) for i in range(1, n + 1)]


def _pipeline(devices, stages, batch, accumulation, budget):
    return TrainConfig(dist=DistributedConfig(devices, batch, accumulation, pipeline_stages=stages),
                       memory_budget=budget)


@pytest.mark.parametrize("stages, left", [(2, 1), (3, 2)])
def test_a_lost_stage_host_unpipelines_when_one_device_holds_the_model(stages, left):
    # The global batch stays 4 x 4 rows: unpipelined over 2 devices that is 8 rows each, not 2 x 16
    # (a fleet run by hand resized 3 stages to 2 devices of 16 rows, then refused its own checkpoint).
    run = _pipeline(stages, stages, 4, 4, 4096 * MiB)
    new = elastic.resplit(run, _hosts(left))
    assert (new.dist.num_devices, new.dist.pipeline_stages, new.dist.global_batch_size) == (left, 1, 16)


def _budget_between(run, stages):
    """A budget (what split_for and restage compare with) that holds every stage of `run`'s model in
    `stages` stages, at its micro-batch, but not the whole model on one device at batch 1."""
    from mlx_train.planning.memory import RUNTIME_OVERHEAD, ModelShape
    from mlx_train.planning.planner import SPLIT_SAFETY, MemoryOptimizer
    from mlx_train.planning.stages import stage_memory

    def budget_for(total):
        return int(total / SPLIT_SAFETY) - RUNTIME_OVERHEAD + 1

    shape, d = ModelShape.from_config(run.model), run.dist
    micro = d.global_batch_size // d.batch_size_per_device
    stage = budget_for(max(stage_memory(shape, stages, s, d.batch_size_per_device, micro).total for s in range(stages)))
    whole = budget_for(MemoryOptimizer.breakdown(replace(run, dist=DistributedConfig(1, 1, 1))).total)
    assert stage < whole, "the test needs a model whose stages fit where the whole does not"
    return stage


def test_a_lost_stage_host_re_plans_the_layers_over_the_hosts_left():
    # 3 stages on 3 hosts, 8 x 1 rows a step; one host lost for good: 2 stages over the 2 left, the
    # same 8 rows a step, where the per-stage memory model fits them and one device holds no model.
    # (--shard none: with auto, ZeRO over the 2 hosts would hold this model unpipelined, which comes first.)
    run = replace(_pipeline(3, 3, 1, 8, None), model=ModelConfig(n_layers=12, d_model=768, n_heads=12, seq_len=32),
                  shard="none")
    run = replace(run, memory_budget=_budget_between(run, 2))
    d = elastic.resplit(run, _hosts(2)).dist
    assert (d.num_devices, d.pipeline_stages, d.batch_size_per_device, d.gradient_accumulation) == (2, 2, 1, 8)
    assert d.global_batch_size == run.dist.global_batch_size == 8


def test_a_model_the_stage_model_does_not_cover_keeps_its_stages_with_fewer_replicas():
    # 2 replicas of 2 stages, 4 x 2 rows each, in bf16 (the per-stage model covers fp32 only): with 2
    # devices left, one replica of the same stages takes the whole batch in more micro-batches.
    run = replace(_pipeline(4, 2, 4, 2, 1 * MiB), precision="bf16")
    d = elastic.resplit(run, _hosts(2)).dist
    assert (d.num_devices, d.pipeline_stages, d.batch_size_per_device, d.gradient_accumulation) == (2, 2, 4, 4)
    assert d.global_batch_size == run.dist.global_batch_size == 16


@pytest.mark.parametrize("left, precision, needs", [(1, "fp32", "no number of stages up to 1 fits"),
                                                     (3, "fp32", "no number of stages up to 3 fits"),
                                                     (3, "bf16", "a multiple of 2 devices")])
def test_stages_that_fit_nowhere_stop_with_what_they_need(left, precision, needs):
    with pytest.raises(UserError) as err:
        elastic.resplit(replace(_pipeline(4, 2, 4, 2, 1 * MiB), precision=precision), _hosts(left))
    msg = str(err.value)
    assert "\n" not in msg and needs in msg and "MiB per device to train unpipelined" in msg, msg


def test_a_stalled_stage_is_found_and_no_stage_waits_on_in_its_recv(tmp_path):
    """SIGSTOP on stage 0 (alive, silent): stage 1 waits in its recv of stage 0's activations and goes
    quiet too; the watchdog names the stopped stage, ends both, and the run resumes from its checkpoint.
    The same run's metrics carry each stage's idle time in the schedule, shown by monitor --performance."""
    run = tmp_path / "stalled-stage"
    proc = popen("train", *TINY, "--accumulation", "4", "--devices", "2", "--pipeline-stages", "2", "--steps", "16",
                 "--log-every", "4", "--checkpoint-every", "4", "--eval-every", "1000", "--stall-timeout", "5",
                 "--run-dir", str(run), "--no-live")
    try:
        wait_for(lambda: (run / "metrics.jsonl").exists() and metrics(run) and metrics(run)[-1]["step"] >= 6, 180,
                 "step 6")
        launch = events(run, "launch")[0]
        first = [r["pid"] for r in sorted(launch["ranks"], key=lambda r: r["rank"])]
        os.kill(first[0], signal.SIGSTOP)
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    stall = events(run, "stall")
    assert len(stall) == 1 and stall[0]["rank"] == 0 and sorted(stall[0]["quiet"]) == [0, 1], stall
    assert events(run, "restart")[0]["reason"].startswith("no progress from rank 0 on localhost")
    resumed = events(run, "resume")[0]
    assert resumed["step"] >= 4 and resumed["checkpoint"].endswith(f"step-{resumed['step']:06d}"), resumed
    assert events(run)[-1]["event"] == "finish"
    assert_ranks_gone(first)  # the stopped stage and the one waiting on it in a recv
    last = metrics(run)[-1]
    idle, comm = last["stage_idle_s"], last["rank_comm_s"]
    # Both stages wait inside 1F1B (stage 1 for activations, stage 0 for gradients); a wait is part of
    # the rank's time in transfers and collectives (to the microsecond each is logged in).
    assert len(idle) == 2 and all(0 < i <= c + 2e-6 for i, c in zip(idle, comm)), (idle, comm)
    shown = cli("monitor", str(run), "--once", "--performance", env={"COLUMNS": "200"}, check=True).stdout
    table = shown.split("pipeline stages (step 16): 2 stages x 4 micro-batches, bubble in theory 20% of a step")[1]
    cells = [[c.strip() for c in l.strip("│").split("│")] for l in table.splitlines() if l.startswith("│")]
    assert [c[:3] for c in cells] == [["0", "0", "0"], ["0", "1", "1"]], table
    assert [float(c[4]) for c in cells] == [round(i, 4) for i in idle], table
    assert cells[1][-1] == "20%" and cells[1][-2].endswith("%"), table  # the replica's bubble, on its last stage
