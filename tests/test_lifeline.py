"""A rank ends when its supervisor is gone (rank/lifeline.py): its stdin reaching its end or its
launcher exiting ends it even while it is frozen, and so does the supervisor's beat
(controller/keepalive.py) no longer arriving, which is all a partition shows. The fleet tests
(remote ranks over ssh) are test_fleet_lifeline.py and test_fleet_cutoff.py."""

import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from mlx_train.config import TrainConfig
from mlx_train.controller import keepalive, launch
from mlx_train.rank import worker

from helpers import TINY, assert_ranks_gone, cli, events, is_worker, needs, pid_alive, popen, rank_pids, wait_for

pytestmark = pytest.mark.multiproc

HOLDER = "from mlx_train.rank import lifeline; import time; lifeline.start(); print('ready', flush=True); time.sleep(600)"


def _holder(stdin) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=stdin, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_end_of_stdin_ends_even_a_frozen_process():
    proc = _holder(subprocess.PIPE)
    try:
        proc.send_signal(signal.SIGSTOP)  # frozen: nothing in it can run, its guardian can
        proc.stdin.close()
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        proc.kill()


def test_no_pipe_on_stdin_is_not_an_end():
    """MPI ranks other than 0 get /dev/null: that is not the supervisor leaving."""
    proc = _holder(subprocess.DEVNULL)
    try:
        guardian = int(open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()[0])

        def waiting() -> bool:  # blocked in its select (a syscall number, not "running"): it has looked
            try:
                return open(f"/proc/{guardian}/syscall").read().split()[0].isdigit()
            except (OSError, IndexError):
                return False
        # Watching /dev/null, its first select would return at once and the holder be killed.
        wait_for(lambda: waiting() or proc.poll() is not None, 10, "the guardian waiting in select")
        assert proc.poll() is None and pid_alive(guardian), "end of file on /dev/null was taken for an end"
    finally:
        proc.kill()
        proc.wait(timeout=10)


@needs("mpirun", "OpenMPI's mpirun is not installed")
def test_mpi_ranks_end_with_a_killed_supervisor(tmp_path):
    """mpirun forwards stdin to rank 0 alone; the others see their launcher (mpirun) exit."""
    run = tmp_path / "mpi"
    sup = popen("train", *TINY, "--devices", "2", "--backend", "mpi", "--steps", "100000", "--run-dir", str(run),
                "--no-live")
    try:
        wait_for(lambda: events(run, "launch"), 120, "the launch")
        pids = rank_pids(run)
        assert all(is_worker(p) for p in pids)
        sup.send_signal(signal.SIGKILL)
        sup.communicate(timeout=30)
        assert_ranks_gone(pids, timeout=30, what="an MPI rank outlived its SIGKILLed supervisor")
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.communicate(timeout=30)
        for p in rank_pids(run):
            if pid_alive(p):
                subprocess.run(["kill", "-9", str(p)])


def test_status_shows_a_run_whose_supervisor_is_gone(tmp_path):
    run, state = tmp_path / "orphan", {"MLX_TRAIN_STATE": str(tmp_path / "state")}
    sup = popen("train", *TINY, "--devices", "2", "--steps", "100000", "--run-dir", str(run), "--no-live",
                env={**os.environ, **state})
    try:
        wait_for(lambda: events(run, "launch"), 120, "the launch")
        live = cli("status", "--local", env=state, check=True).stdout
        assert f"pid {sup.pid}" in live and "gone" not in live, live
        sup.send_signal(signal.SIGKILL)
        sup.communicate(timeout=30)
        assert_ranks_gone(rank_pids(run), timeout=30)
        out = " ".join(cli("status", "--local", env=state, check=True).stdout.split())
        assert run.name in out and f"gone (pid {sup.pid})" in out, out
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.communicate(timeout=30)


# A rank with a keepalive timeout: says "lived" only once it has outlived the timeout four times over.
CUT_OFF_S = 2.0
BEATING = ("import sys, time; from mlx_train.rank import lifeline; lifeline.start(float(sys.argv[1])); "
           "print('ready', flush=True); time.sleep(4 * float(sys.argv[1])); print('lived', flush=True); time.sleep(600)")


def _beaten(period: float) -> tuple:
    """A holder with a keepalive timeout of CUT_OFF_S whose stdin gets the supervisor's beat."""
    proc = subprocess.Popen([sys.executable, "-c", BEATING, str(CUT_OFF_S)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    beat = keepalive.Keepalive(period)
    beat.add(proc.stdin)
    assert proc.stdout.readline().strip() == "ready"
    return proc, beat


def test_a_rank_that_hears_the_beat_lives_on():
    proc, beat = _beaten(CUT_OFF_S / 4)
    try:
        assert proc.stdout.readline().strip() == "lived", f"the rank ended ({proc.wait()}) while the beat came"
    finally:
        beat.stop()
        proc.kill()
        proc.wait(timeout=10)


def test_a_rank_cut_off_from_its_supervisor_ends_itself():
    """The beat stops but the pipe stays open (a partition: no end of file ever comes)."""
    proc, beat = _beaten(CUT_OFF_S / 4)
    try:
        beat.stop()
        assert not proc.stdin.closed
        assert proc.stdout.readline() == "", "the rank outlived its timeout four times over"
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_the_beat_never_blocks_on_a_full_or_broken_pipe():
    full_r, full_w = os.pipe()
    os.set_blocking(full_w, False)
    try:
        while True:
            os.write(full_w, b"x" * 4096)
    except BlockingIOError:
        pass  # nobody reads: full
    broken_r, broken_w = os.pipe()
    os.close(broken_r)
    beat = keepalive.Keepalive(0.01)
    with os.fdopen(full_w, "wb", closefd=False) as full, os.fdopen(broken_w, "wb") as broken:
        beat.add(full)
        beat.add(broken)
        wait_for(lambda: beat.pipes == 1, 30, "the broken pipe forgotten")
    stopper = threading.Thread(target=beat.stop)
    stopper.start()
    stopper.join(timeout=30)
    assert not stopper.is_alive(), "a full pipe blocked the beat"
    os.close(full_r)
    os.close(full_w)


def test_launched_ranks_time_out_what_the_supervisor_beats():
    args = worker.parse_args(launch.worker_args(TrainConfig(), "run", "id", resume=False, stop_after=None)[2:])
    assert args.lifeline and args.lifeline_timeout == keepalive.TIMEOUT_S > keepalive.PERIOD_S
