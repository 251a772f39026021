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
