"""A rank ends when its supervisor is gone (rank/lifeline.py): its stdin reaching its end, or its
launcher exiting, ends it even while it is frozen. The fleet test (remote ranks over ssh) is in
test_fleet_lifeline.py."""

import os
import shutil
import signal
import subprocess
import sys

import pytest

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
