"""Real multi-process training runs: ranks are separate processes talking over MLX's ring (or MPI)."""

import json
import os
import re
import signal
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from helpers import TINY, cli, events, metrics, needs, pid_alive, popen, straight_and_resumed

pytestmark = pytest.mark.multiproc


def _wait_for(pred, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _launch_event(run):
    return _wait_for(lambda: (events(run, "launch") or [None])[-1] if (run / "events.jsonl").exists() else None,
                     what="launch event")


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("train") / "two"
    cli("train", *TINY, "--devices", "2", "--steps", "60", "--log-every", "10", "--eval-every", "30",
        "--checkpoint-every", "20", "--run-dir", str(run), check=True)
    return run


def test_loss_falls_and_ranks_agree(two_rank_run):
    ms = metrics(two_rank_run)
    assert [m["step"] for m in ms] == [10, 20, 30, 40, 50, 60]
    assert ms[-1]["loss"] < ms[0]["loss"] - 0.5, [m["loss"] for m in ms]
    for m in ms:
        assert m["devices"] == 2 and len(m["param_checksum"]) == 2
        assert m["param_checksum"][0] == m["param_checksum"][1], "ranks drifted apart"
    assert "val_loss" in ms[2] and "val_loss" in ms[5]


def test_metrics_and_events_schema(two_rank_run):
    for m in metrics(two_rank_run):
        for key, kind in (("step", int), ("loss", float), ("lr", float), ("tokens_per_s", float),
                          ("step_time_s", float), ("comm_time_s", float), ("devices", int), ("global_batch", int),
                          ("peak_memory", list), ("param_checksum", list)):
            assert isinstance(m[key], kind), (key, m[key])
        assert m["global_batch"] == 8 and all(isinstance(v, int) and v > 0 for v in m["peak_memory"])
    evs = events(two_rank_run)
    assert all("event" in e and isinstance(e["time"], float) for e in evs)
    launch = events(two_rank_run, "launch")[0]
    assert sorted(r["rank"] for r in launch["ranks"]) == [0, 1]
    assert all(isinstance(r["pid"], int) and r["host"] for r in launch["ranks"])
    assert evs[-1] == {**evs[-1], "event": "finish", "step": 60}
    assert {e["rank"] for e in events(two_rank_run, "rank_exit")} == {0, 1}
    logs = sorted(p.name for p in (two_rank_run / "logs").iterdir())
    assert logs == ["rank-0.log", "rank-1.log"]
    ckpts = sorted(p.name for p in (two_rank_run / "checkpoints").iterdir())
    assert ckpts == ["step-000020", "step-000040", "step-000060"]


def _fault_mid_run(run, rank, sig, at_step, *extra):
    """Start a 2-rank run, send `sig` to `rank` once step `at_step` is logged, wait for the end."""
    proc = popen("train", *TINY, "--devices", "2", "--log-every", "10", "--checkpoint-every", "20",
                 "--run-dir", str(run), "--no-live", *extra)
    try:
        launch = _launch_event(run)
        _wait_for(lambda: (run / "metrics.jsonl").exists() and metrics(run)[-1]["step"] >= at_step,
                  what=f"step {at_step}")
        victim = [r for r in launch["ranks"] if r["rank"] == rank][0]
        os.kill(victim["pid"], sig)
        out, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    return victim


def test_killed_rank_is_recovered(tmp_path):
    run = tmp_path / "killed"
    victim = _fault_mid_run(run, 1, signal.SIGKILL, 40, "--steps", "200")
    exits = events(run, "rank_exit")
    assert exits[0]["rank"] == 1 and exits[0]["signal"] == signal.SIGKILL
    restart = events(run, "restart")
    assert restart and restart[0]["attempt"] == 1
    resume = events(run, "resume")
    assert resume and resume[0]["step"] >= 20 and resume[0]["step"] % 20 == 0
    assert events(run)[-1]["event"] == "finish" and events(run)[-1]["step"] == 200
    assert len(events(run, "launch")) == 2
    assert not pid_alive(victim["pid"])
    last = metrics(run)[-1]
    assert last["param_checksum"][0] == last["param_checksum"][1]


def _final_params(run: Path, step: int) -> dict:
    return mx.load(str(run / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def test_resume_is_bitwise_exact(tmp_path):
    # Stopped past the warmup (20 steps), between checkpoints and after an evaluation, with one more
    # evaluation and checkpoints to go: the data order is a function of the step (batcher.py), so more
    # steps show nothing more.
    common = [*TINY, "--devices", "2", "--steps", "50", "--log-every", "5", "--eval-every", "25",
              "--checkpoint-every", "12"]
    straight, broken = straight_and_resumed(tmp_path, common, 30)
    a, b = _final_params(straight, 50), _final_params(broken, 50)
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(np.array(a[k]), np.array(b[k])), f"{k} differs after resume"
    assert metrics(straight)[-1]["param_checksum"] == metrics(broken)[-1]["param_checksum"]


def test_damaged_newest_checkpoint_falls_back(tmp_path):
    run = tmp_path / "damaged"
    cli("train", *TINY, "--steps", "30", "--checkpoint-every", "10", "--stop-after", "20", "--run-dir", str(run),
        check=True)
    blob = run / "checkpoints" / "step-000020" / "optimizer.safetensors"
    blob.write_bytes(blob.read_bytes()[:-16])
    proc = cli("train", "--resume", str(run), check=True)
    warn = events(run, "checkpoint_damaged")
    assert warn and warn[0]["path"].endswith("step-000020") and "checksum" in warn[0]["reason"]
    assert events(run, "resume")[-1]["step"] == 10
    assert events(run)[-1]["event"] == "finish"
    assert "checkpoint_damaged" in proc.stdout


def test_ctrl_c_stops_every_rank(tmp_path):
    run = tmp_path / "interrupted"
    proc = popen("train", *TINY, "--devices", "2", "--steps", "100000", "--run-dir", str(run), "--no-live")
    launch = _launch_event(run)
    _wait_for(lambda: (run / "metrics.jsonl").exists(), what="first metrics")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    for r in launch["ranks"]:
        _wait_for(lambda: not pid_alive(r["pid"]), timeout=10, what=f"rank {r['rank']} to exit")
    assert events(run)[-1]["event"] == "interrupted"


@needs("mpirun", "OpenMPI's mpirun is not installed")
def test_mpi_backend_runs_two_ranks(tmp_path):
    run = tmp_path / "mpi"
    cli("train", *TINY, "--devices", "2", "--backend", "mpi", "--steps", "20", "--log-every", "10",
        "--run-dir", str(run), check=True)
    ms = metrics(run)
    assert ms[-1]["devices"] == 2 and ms[-1]["param_checksum"][0] == ms[-1]["param_checksum"][1]
    assert ms[-1]["loss"] < ms[0]["loss"]
    launch = events(run, "launch")[0]
    assert launch["backend"] == "mpi" and sorted(r["rank"] for r in launch["ranks"]) == [0, 1]
    assert "rank 1/2" in (run / "logs" / "rank-1.log").read_text()


def test_monitor_snapshot_and_plot(two_rank_run, tmp_path):
    snap = cli("monitor", str(two_rank_run), "--once", check=True).stdout
    assert "60/60" in snap and "finished" in snap and "restarts" in snap
    png = tmp_path / "curves.png"
    cli("monitor", str(two_rank_run), "--plot", str(png), check=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    follow = cli("monitor", str(two_rank_run), check=True).stdout
    assert follow.strip().splitlines()[-1].startswith("finished at step 60")


def test_monitor_follows_a_live_run_until_it_ends(tmp_path):
    run = tmp_path / "live"
    trainer = popen("train", *TINY, "--devices", "2", "--steps", "80", "--log-every", "10", "--run-dir", str(run),
                    "--no-live")
    try:
        _wait_for(lambda: (run / "config.yaml").exists(), what="run dir")
        mon = cli("monitor", str(run), timeout=240, check=True).stdout
    finally:
        trainer.communicate(timeout=240)
    lines = mon.strip().splitlines()
    assert lines[-1].startswith("finished at step 80") and any(l.startswith("step 80/80") for l in lines)


def _status_row(out: str, run_id: str) -> dict:
    """The row of `status`'s "runs in progress here" table whose run column is `run_id`."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells[0] == run_id:
            return dict(zip(("run", "live ranks", "last step", "supervisor", "run dir"), cells))
    raise AssertionError(f"no row for {run_id} in:\n{out}")


def _status_fact(out: str, key: str) -> str:
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells[0] == key:
            return cells[1]
    raise AssertionError(f"no {key!r} line in:\n{out}")


def test_status_lists_a_run_in_progress(tmp_path):
    # A name that no other word of the output contains, so only the run's own row can match it.
    run = tmp_path / "status-probe-run-q7"
    trainer = popen("train", *TINY, "--devices", "2", "--steps", "100000", "--run-dir", str(run), "--no-live")
    try:
        _wait_for(lambda: (run / "metrics.jsonl").exists() and metrics(run), what="first metrics")
        before = metrics(run)[-1]["step"]
        # Wide enough for the whole run dir (under xdist the temporary paths are longer).
        out = cli("status", "--local", check=True, env={"COLUMNS": "2000"}).stdout
        after = metrics(run)[-1]["step"]
        row = _status_row(out, run.name)
        # status cuts a long run dir to a prefix and an ellipsis (xdist's temporary paths are long).
        shown = row["run dir"]
        assert row["live ranks"] == "0,1" and (shown == str(run) or (shown.endswith("…") and
                                                                       str(run).startswith(shown[:-1]))), row
        assert before <= int(row["last step"]) <= after, (before, row, after)
        assert row["supervisor"] == f"pid {trainer.pid}", row
        # The BLAS line names the library the run's own ranks reported using (not "unknown").
        blas = _status_fact(out, "BLAS (ranks)")
        reported = re.search(r"BLAS: (.+?)(?: \(|;)", (run / "logs" / "rank-0.log").read_text()).group(1)
        assert blas.split(" (")[0] == reported and not blas.startswith("unknown"), (blas, reported)
    finally:
        trainer.send_signal(signal.SIGINT)
        trainer.communicate(timeout=60)


def test_bring_your_own_model(tmp_path):
    """The factory shown in docs/model_development.md trains as documented."""
    doc = (Path(__file__).parents[1] / "docs" / "model_development.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(code)
    run = tmp_path / "byo"
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cli("train", "--model", "mypkg.models:build", "--width", "32", "--seq-len", "32", "--batch-size", "4",
        "--devices", "2", "--steps", "20", "--log-every", "10", "--run-dir", str(run), env=env, check=True)
    ms = metrics(run)
    assert ms[-1]["loss"] < ms[0]["loss"] and ms[-1]["param_checksum"][0] == ms[-1]["param_checksum"][1]


def _resumed_from_a_checkpoint(run, every=20):
    resume = events(run, "resume")
    assert resume and resume[0]["step"] >= every and resume[0]["step"] % every == 0, resume
    assert resume[0]["checkpoint"].endswith(f"step-{resume[0]['step']:06d}")


def test_stalled_rank_is_restarted(tmp_path):
    """A rank that stops making progress (SIGSTOP: alive, silent) is caught by the progress watchdog;
    --stall-timeout counts from the first step, so a slow start-up cannot trip it."""
    run = tmp_path / "stalled"
    victim = _fault_mid_run(run, 0, signal.SIGSTOP, 30, "--steps", "150", "--stall-timeout", "8")
    stall = events(run, "stall")
    assert stall and stall[0]["timeout_s"] == 8 and stall[0]["rank"] == 0 and stall[0]["host"] == "localhost"
    assert events(run, "restart")[0]["reason"].startswith("no progress from rank 0 on localhost")
    _resumed_from_a_checkpoint(run)
    assert events(run)[-1]["event"] == "finish" and not pid_alive(victim["pid"])


def test_stuck_rank_is_found_by_the_adaptive_watchdog(tmp_path):
    """Default settings: the allowance adapts to the run's step time (not the 120 s warm-up allowance),
    the stall names the frozen rank and its host, and the run resumes from a checkpoint."""
    from mlx_train.controller.watchdog import Allowances

    run = tmp_path / "stuck"
    victim = _fault_mid_run(run, 1, signal.SIGSTOP, 30, "--steps", "150", "--eval-every", "1000")
    stall = events(run, "stall")
    assert len(stall) == 1, stall
    assert stall[0]["rank"] == 1 and stall[0]["host"] == "localhost" and stall[0]["phase"] == "step"
    assert Allowances().floor_s <= stall[0]["timeout_s"] < Allowances().first_step_s
    assert stall[0]["step"] >= 30
    _resumed_from_a_checkpoint(run)
    assert events(run)[-1]["event"] == "finish" and not pid_alive(victim["pid"])


def test_exit_is_reported_while_a_child_holds_the_rank_pipe(tmp_path):
    """A rank's output pipe held open by a process it spawned (as an ssh ControlMaster does) must not
    hide the rank's exit: the supervisor learns it from wait(), restarts, and cleans up the child."""
    run, pids = tmp_path / "held", tmp_path / "holders"
    wrapper = f'sh -c \'sleep 600 & echo $! >> {pids}; exec "$@"\' sh'
    try:
        victim = _fault_mid_run(run, 1, signal.SIGKILL, 30, "--steps", "100", "--rank-wrapper", wrapper)
        exits = events(run, "rank_exit")
        assert exits[0]["rank"] == 1 and exits[0]["signal"] == signal.SIGKILL
        assert events(run, "restart") and len(events(run, "launch")) == 2
        _resumed_from_a_checkpoint(run)
        assert events(run)[-1]["event"] == "finish" and not pid_alive(victim["pid"])
    finally:
        holders = [int(p) for p in pids.read_text().split()] if pids.exists() else []
        left = [p for p in holders if pid_alive(p)]
        for p in left:
            os.kill(p, signal.SIGKILL)
    assert len(holders) == 4, holders  # one per rank per attempt
    assert not left, f"the supervisor left the pipe holders {left} running"


def test_second_supervisor_on_a_run_is_refused(tmp_path):
    run = tmp_path / "locked"
    first = popen("train", *TINY, "--devices", "2", "--steps", "100000", "--run-dir", str(run), "--no-live")
    try:
        _launch_event(run)
        second = cli("train", "--resume", str(run), "--no-live", timeout=120)
        assert second.returncode == 2, second
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and "already supervised by pid" in err[0] and str(first.pid) in err[0], err
        assert first.poll() is None and len(events(run, "launch")) == 1
    finally:
        first.send_signal(signal.SIGINT)
        out, _ = first.communicate(timeout=60)
    assert first.returncode == 130, out
    assert events(run)[-1]["event"] == "interrupted"


def test_a_rank_that_cannot_be_started_is_one_line_and_an_event(tmp_path):
    # A wrapper that is not on PATH is refused before launch (test_bad_input_campaign); one that is
    # there but cannot be executed fails at the spawn.
    run, wrapper = tmp_path / "nostart", tmp_path / "not-a-program"
    wrapper.write_text("not a program\n")
    wrapper.chmod(0o755)
    proc = cli("train", *TINY, "--steps", "2", "--rank-wrapper", str(wrapper), "--run-dir", str(run),
               "--no-live", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "not-a-program" in proc.stderr
    assert events(run)[-1]["event"] == "failed"


def test_monitor_performance_breakdown(two_rank_run, tmp_path):
    from mlx_train.config import TrainConfig
    from mlx_train.planning.perf import baseline_key

    cfg = TrainConfig.from_yaml(two_rank_run / "config.yaml")
    single = metrics(two_rank_run)[-1]["tokens_per_s"] / 2 / 0.8  # pretend 80% scaling
    (tmp_path / "baselines.json").write_text(json.dumps({baseline_key(cfg): single}))
    out = cli("monitor", str(two_rank_run), "--once", "--performance", env={"MLX_TRAIN_STATE": str(tmp_path)},
              check=True).stdout
    assert "busbw GB/s" in out and "comm s" in out
    row = [l for l in out.splitlines() if l.split("│")[1:2] == ["   60 "]]
    assert row and row[0].rstrip(" │").endswith("80%"), out
    from mlx_train.planning.perf import bus_bandwidth

    assert bus_bandwidth(2e9, 1.0, 4) == (2.0, 3.0)  # nccl-tests: busbw = algbw * 2(n-1)/n


def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path):
    """Sharding plus the rank average computes the one-process update (to float rounding)."""
    common = ["--layers", "2", "--width", "64", "--heads", "2", "--seq-len", "64", "--steps", "3", "--warmup", "0",
              "--log-every", "1", "--checkpoint-every", "3"]
    one, two = tmp_path / "one", tmp_path / "two"
    cli("train", *common, "--batch-size", "8", "--run-dir", str(one), check=True)
    cli("train", *common, "--devices", "2", "--batch-size", "4", "--run-dir", str(two), check=True)
    assert [round(m["loss"], 4) for m in metrics(one)] == [round(m["loss"], 4) for m in metrics(two)]
    a, b = _final_params(one, 3), _final_params(two, 3)
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-5, rtol=0, err_msg=k)
