"""A run on the 3-host fleet survives losing a remote rank: the rank killed on its host, or its ssh
client killed while the host's link is down (with an ssh ControlMaster in the way)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

import fleet as fleet_tools
from helpers import assert_ranks_gone, events, rank_pids, train_on_fleet, wait_for

pytestmark = pytest.mark.fleet


def _kinds(run: Path) -> list:
    return [e["event"] for e in events(run)]


def _interrupt(proc) -> None:
    """Ctrl-C the run; SIGKILL it if that does not end it (a hung supervisor must not outlive the test)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=30)


def _ssh_client_of(run: Path, host: str) -> int:
    """The pid of the local ssh client carrying the rank on `host` (a mux master's title differs)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (Path(argv[0].decode(errors="replace")).name == "ssh" and host.encode() in argv
                and str(run).encode() in b" ".join(argv) and b"mlx_train.rank.worker" in b" ".join(argv)):
            return int(d.name)
    return 0


@contextlib.contextmanager
def at_first_checkpoint(fleet, cluster, corpus, run: Path, *extra: str):
    """A 60-step run on the fleet, yielded at its first checkpoint; Ctrl-C'd (or killed) if the test fails."""
    proc = train_on_fleet(fleet, cluster, corpus, run, "--steps", "60", "--checkpoint-every", "10", *extra, popen=True)
    try:
        wait_for(lambda: events(run, "checkpoint"), 120, "the run's first checkpoint")
        yield proc
    except BaseException:
        _interrupt(proc)
        raise


def finished(proc, run: Path) -> list:
    """The run's events once it has finished, successfully, with no rank left behind."""
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    kinds = _kinds(run)
    assert "rank_exit" in kinds and "restart" in kinds and kinds[-1] == "finish", kinds
    assert_ranks_gone(rank_pids(run), timeout=60)
    return kinds


def test_killed_remote_rank_is_recovered(fleet, cluster, corpus, tmp_path):
    run = tmp_path / "run"
    with at_first_checkpoint(fleet, cluster, corpus, run) as proc:
        first = events(run, "launch")[0]
        victim = first["ranks"][1]
        assert victim["host"] == "h2"
        fleet.run_in("h2", ["kill", "-9", str(victim["pid"])], check=True)
        # Every rank of the first attempt ends, not only the one killed: its peers are stopped.
        wait_for(lambda: "restart" in _kinds(run), 120, "the restart after the kill")
        assert_ranks_gone(rank_pids(run, first["attempt"]), what="a rank of the first attempt outlived it")
        kinds = finished(proc, run)
    assert kinds.index("restart") < kinds.index("resume") < kinds.index("finish")


def test_rank_whose_ssh_client_dies_behind_a_dead_link_is_restarted(fleet, cluster, corpus, tmp_path):
    """Issue 10's hang. The fleet's ssh_config has ControlMaster auto: a session multiplexed through
    a master is held by the master, which keeps the client's output pipe open after the client is
    gone for as long as the host cannot confirm the close. The attempt must still end and restart."""
    assert "ControlMaster auto" in fleet.ssh_config.read_text()
    assert fleet.ssh("h2", "true").returncode == 0  # a live master to h2, for any session to join
    run = tmp_path / "run"
    with at_first_checkpoint(fleet, cluster, corpus, run, "--max-restarts", "6") as proc:
        client = wait_for(lambda: _ssh_client_of(run, "h2"), 10, "the ssh client of h2's rank")
        fleet_tools.link_down("h2")
        try:
            os.kill(client, signal.SIGKILL)
            # Bounded: stopping the others takes seconds; a held pipe would keep this waiting for good.
            wait_for(lambda: "restart" in _kinds(run), 90, "the attempt's end and restart while h2 is cut off")
        finally:
            fleet_tools.link_up("h2")
        finished(proc, run)
