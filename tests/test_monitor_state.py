"""What `monitor` makes of a run directory: state, restarts, the latest record of a step, the eta."""

import json

import pytest

from mlx_train.config import TrainConfig
from mlx_train.controller.monitor import take_snapshot
from mlx_train.events import ENDINGS
from mlx_train.rundir import RunDir


@pytest.fixture
def run(tmp_path):
    r = RunDir(tmp_path / "run")
    r.path.mkdir()
    cfg = TrainConfig(steps=100)
    cfg.to_yaml(r.config_path)
    return r


def metric(step, t, loss=3.0, **kw):
    return {"step": step, "loss": loss, "time": t, "tokens_per_s": 1000.0, "comm_time_s": 0.01, "devices": 2,
            "global_batch": 8, "peak_memory": [1, 1], "param_checksum": [7, 7], **kw}


def write(run, events=(), metrics=()):
    for e in events:
        run.append(run.events_path, e)
    for m in metrics:
        run.append(run.metrics_path, m)


def test_a_run_without_records_is_running(run):
    snap = take_snapshot(run)
    assert (snap.state, snap.total, snap.last, snap.restarts, snap.eta_s) == ("running", 100, None, 0, None)


@pytest.mark.parametrize("event, state", sorted(ENDINGS.items()))
def test_each_ending_event_sets_the_state(run, event, state):
    write(run, [{"event": "launch", "time": 1.0}, {"event": event, "time": 20.0}], [metric(10, 10.0)])
    assert take_snapshot(run).state == state


def test_a_launch_after_the_end_is_running_again(run):
    write(run, [{"event": "launch", "time": 1.0}, {"event": "interrupted", "time": 5.0},
                {"event": "launch", "time": 9.0}], [metric(10, 4.0)])
    assert take_snapshot(run).state == "running"


def test_metrics_newer_than_the_end_mean_running(run):
    write(run, [{"event": "stopped", "time": 5.0}], [metric(10, 4.0), metric(20, 8.0)])
    assert take_snapshot(run).state == "running"


def test_restarts_are_counted_and_a_re_logged_step_keeps_its_latest_record(run):
    write(run, [{"event": "launch", "time": 1.0}, {"event": "restart", "time": 3.0, "attempt": 1},
                {"event": "launch", "time": 3.5}, {"event": "restart", "time": 6.0, "attempt": 2}],
          [metric(10, 2.0, loss=4.0), metric(20, 2.5, loss=3.5), metric(10, 4.0, loss=3.9),
           metric(20, 5.0, loss=3.4, val_loss=3.3)])
    snap = take_snapshot(run)
    assert snap.restarts == 2
    assert [(m["step"], m["loss"]) for m in snap.metrics] == [(10, 3.9), (20, 3.4)]
    assert snap.val == [(20, 3.3)]


def test_eta_from_the_recent_pace(run):
    write(run, metrics=[metric(s, s / 10) for s in range(10, 70, 10)])  # 0.1 s per step
    snap = take_snapshot(run)
    assert snap.eta_s == pytest.approx(0.1 * (100 - 60))


def test_a_torn_last_line_is_skipped(run):
    write(run, metrics=[metric(10, 1.0)])
    with run.metrics_path.open("a") as fh:
        fh.write(json.dumps(metric(20, 2.0))[:25])
    assert [m["step"] for m in take_snapshot(run).metrics] == [10]


def test_performance_shows_the_shard_level_bytes_and_memory_against_data_parallel(tmp_path):
    """monitor --performance: the run's level, each rank's bytes reduce-scattered and gathered, its rows,
    compute and wait time, and its peak against the memory model's data-parallel need."""
    from dataclasses import replace

    from rich.console import Console

    from mlx_train.config import DistributedConfig, ModelConfig
    from mlx_train.controller.monitor import spread_table
    from mlx_train.planning.planner import MemoryOptimizer

    r = RunDir(tmp_path / "run")
    r.path.mkdir()
    cfg = TrainConfig(steps=10, model=ModelConfig(n_layers=2, d_model=64, n_heads=2, seq_len=64),
                      dist=DistributedConfig(2, 4, 1), shard="auto", shard_level="gradients")
    cfg.to_yaml(r.config_path)
    dp = MemoryOptimizer.estimate(replace(cfg, shard="none", shard_level=None))
    assert MemoryOptimizer.estimate(cfg) < dp
    write(r, metrics=[metric(4, 1.0, rows=[5, 3], peak_memory=[dp // 2, dp // 4], scattered_bytes=1000,
                             gathered_bytes=2000, rank_compute_s=[0.25, 0.125],
                             rank_wait_s=[0.0625, 0.1875])])
    console = Console(width=250, record=True)
    console.print(spread_table(take_snapshot(r)))
    text = console.export_text()
    assert "shard level gradients" in text and "data parallel" in text
    cells = [line.replace("│", " ").split() for line in text.splitlines() if line.startswith("│")]
    assert [c[:6] for c in cells] == [["0", "5", "0.2500", "0.0625", "1,000", "2,000"],
                                      ["1", "3", "0.1250", "0.1875", "1,000", "2,000"]]
    assert [c[-1] for c in cells] == ["0.50x", "0.25x"]


@pytest.mark.parametrize("level", ["gradients", "full"])
def test_performance_shows_no_bandwidth_where_the_collectives_are_inside_compute(tmp_path, level):
    """At `full` the gathers and reduce-scatters run in the forward and backward ("compute s"): comm s
    is only what is left outside, so bytes over it would be a bandwidth no link has (it showed 19.5
    GB/s on loopback)."""
    from rich.console import Console

    from mlx_train.config import DistributedConfig
    from mlx_train.controller.monitor import performance_table

    r = RunDir(tmp_path / "run")
    r.path.mkdir()
    TrainConfig(steps=10, dist=DistributedConfig(2, 4, 1), shard=level, shard_level=level).to_yaml(r.config_path)
    write(r, metrics=[metric(4, 1.0, grad_bytes=562_176, comm_time_s=0.00003)])
    console = Console(width=250, record=True)
    console.print(performance_table(take_snapshot(r)))
    text = console.export_text()
    row = next(line for line in text.splitlines() if line.startswith("│")).replace("│", " ").split()
    if level == "full":
        assert "collectives inside compute s" in text and "all-reduced" not in text
        assert row[3:5] == ["-", "-"], row
    else:
        assert "all-reduced per step 562,176 B" in text and row[3] != "-", row


def test_a_pipelines_stages_are_rows_per_replica_with_the_bubble_against_theory(run, tmp_path):
    """2 replicas of 2 stages (ranks 0,1 and 2,3), 4 micro-batches: each stage's compute, idle and sync
    (its collectives after the schedule: rank_comm_s less its idle), the replica's bubble (its stages'
    mean idle share of the step) beside (S-1)/(M+S-1) = 20% on each replica's last stage; the trackers
    get the stages' mean idle share as perf/bubble."""
    from rich.console import Console

    from mlx_train.config import DistributedConfig
    from mlx_train.controller.monitor import stage_table
    from mlx_train.controller.reporting import scalars

    r = RunDir(tmp_path / "pipe")
    r.path.mkdir()
    TrainConfig(steps=10, dist=DistributedConfig(4, 2, 4, pipeline_stages=2)).to_yaml(r.config_path)
    record = metric(10, 1.0, devices=4, peak_memory=[1] * 4, param_checksum=[7] * 4, step_time_s=1.0,
                    rank_compute_s=[0.8, 0.7, 0.6, 0.5], rank_comm_s=[0.2, 0.3, 0.4, 0.5],
                    stage_idle_s=[0.1, 0.3, 0.2, 0.4])
    write(r, metrics=[record])
    console = Console(width=200, record=True)
    console.print(stage_table(take_snapshot(r)))
    text = console.export_text()
    assert "2 stages x 4 micro-batches, bubble in theory 20% of a step" in text, text
    cells = [[c.strip() for c in l.strip("│").split("│")] for l in text.splitlines() if l.startswith("│")]
    assert cells == [["0", "0", "0", "0.8000", "0.1000", "0.1000", "10%", "", ""],
                     ["0", "1", "1", "0.7000", "0.3000", "0.0000", "30%", "20%", "20%"],
                     ["1", "0", "2", "0.6000", "0.2000", "0.2000", "20%", "", ""],
                     ["1", "1", "3", "0.5000", "0.4000", "0.1000", "40%", "30%", "20%"]], text
    assert scalars(record)["perf/bubble"] == pytest.approx(0.25)
    write(run, metrics=[metric(10, 1.0)])
    assert stage_table(take_snapshot(run)) is None and "perf/bubble" not in scalars(metric(10, 1.0))
