"""Launch planning and host selection, without starting anything: the command lines and environments
each rank is started with (local ring, ring over ssh, local mpi, mpi on the first host), the ssh
options every remote command carries, and how --devices picks hosts and slots."""
from __future__ import annotations

import json
import shlex
import sys

import pytest

from helpers import needs
from mlx_train.config import DistributedConfig, TrainConfig
from mlx_train.controller import launch
from mlx_train.errors import UserError
from mlx_train.fleet import ssh
from mlx_train.fleet.hosts import LOCAL, Cluster, Host, configured, load_cluster, with_devices, write_cluster

REMOTE = [Host(f"h{i}", f"10.77.0.1{i}", iface="eth0", python="/opt/mlx-train/venv/bin/python", memory=2**33)
          for i in (1, 2, 3)]


def cfg(devices: int, backend: str = "ring", connections: int = 1) -> TrainConfig:
    return TrainConfig(dist=DistributedConfig(num_devices=devices, backend=backend, ring_connections=connections))


def plan(c: TrainConfig, hosts, **kw):
    return launch.plan(c, hosts, "/runs/r1", "r1", False, **kw)


def flag(argv, name):
    return argv[argv.index(name) + 1]


def assert_fresh_ssh(argv, dest):
    """Bounded (BatchMode, ConnectTimeout) and never multiplexed: no ControlMaster can hold the pipe."""
    assert argv[0] == "ssh" and "-T" in argv and argv[-2] == dest
    opts = [argv[i + 1] for i, a in enumerate(argv[:-2]) if a == "-o"]
    assert "BatchMode=yes" in opts and f"ConnectTimeout={ssh.CONNECT_TIMEOUT_S}" in opts
    assert f"ServerAliveInterval={ssh.ALIVE_INTERVAL_S}" in opts and f"ServerAliveCountMax={ssh.ALIVE_COUNT_MAX}" in opts
    assert "ControlMaster=no" in opts and "ControlPath=none" in opts


def test_local_ring_one_process_per_rank_on_loopback():
    procs = plan(cfg(3, connections=2), launch.local_hosts(3), wrapper=["taskset", "-c", "0"])
    assert [p.ranks for p in procs] == [[0], [1], [2]] and all(p.host == LOCAL and not p.tagged for p in procs)
    assert not any(p.remote for p in procs)  # stopped by their process groups here
    peers = json.loads(flag(procs[0].argv, "--ring-hosts"))
    assert all(flag(p.argv, "--ring-hosts") == flag(procs[0].argv, "--ring-hosts") for p in procs)
    assert [len(p) for p in peers] == [2, 2, 2] and all(a.startswith("127.0.0.1:") for p in peers for a in p)
    assert len({a for p in peers for a in p}) == 6  # every rank and connection its own port
    for rank, p in enumerate(procs):
        assert p.argv[:4] == ["taskset", "-c", "0", sys.executable]
        assert p.argv[4:6] == ["-m", "mlx_train.rank.worker"]
        assert flag(p.argv, "--rank") == str(rank) and flag(p.argv, "--ranks-on-host") == "3"
        assert flag(p.argv, "--rank-hosts") == "0,0,0"  # one host: --shares auto never re-shares
        assert p.env["PYTHONUNBUFFERED"] == "1"
        assert json.loads(flag(p.argv, "--config-json"))["dist"]["num_devices"] == 3


def test_one_local_rank_waits_for_no_peer():
    (p,) = plan(cfg(1), launch.local_hosts(1))
    assert "--rank" not in p.argv and "--ring-hosts" not in p.argv


def test_ring_over_ssh_one_fresh_bounded_ssh_per_rank_on_the_pinned_addresses():
    procs = plan(cfg(3), REMOTE)
    assert [p.host for p in procs] == ["h1", "h2", "h3"] and all(p.remote for p in procs)
    peers = json.loads(flag(shlex.split(procs[0].argv[-1]), "--ring-hosts"))
    assert [a.rsplit(":", 1)[0] for (a,) in peers] == ["10.77.0.11", "10.77.0.12", "10.77.0.13"]
    for rank, p in enumerate(procs):
        assert_fresh_ssh(p.argv, f"h{rank + 1}")
        remote = shlex.split(p.argv[-1])
        # Variables do not cross ssh: they are set on the remote command line, with an absolute python.
        assert remote[:3] == ["env", "PYTHONUNBUFFERED=1", "/opt/mlx-train/venv/bin/python"]
        assert remote[-3:] == [";", "exit", "$?"]  # a shell that waits: a rank's signal reaches ssh as 128+n
        assert remote[3:5] == ["-m", "mlx_train.rank.worker"] and flag(remote, "--rank") == str(rank)
        assert flag(remote, "--run-dir") == "/runs/r1" and flag(remote, "--run-id") == "r1"
        json.loads(flag(remote, "--config-json"))  # survives the quoting intact
        assert flag(remote, "--rank-hosts") == "0,1,2"  # every rank's host, the same list on every rank


@needs("mpirun", "no mpirun on PATH (Open MPI)")
def test_local_mpi_one_mpirun_with_tagged_output_and_the_mpi_environment():
    (p,) = plan(cfg(2, "mpi"), launch.local_hosts(2))
    assert p.tagged and p.ranks == [0, 1] and p.host == LOCAL and not p.remote
    assert p.split("[1,1]<stderr>: a line") == (1, "a line") and p.split("[1,1] untagged") == (0, "[1,1] untagged")
    assert p.argv[0].endswith("mpirun") and flag(p.argv, "-np") == "2" and "--tag-output" in p.argv
    forwarded = {p.argv[i + 1] for i, a in enumerate(p.argv) if a == "-x"}
    assert "PYTHONUNBUFFERED" in forwarded and forwarded <= set(p.env)
    assert p.argv[p.argv.index(sys.executable) + 1:][:2] == ["-m", "mlx_train.rank.worker"]


def test_remote_mpi_runs_mpirun_on_the_first_host_over_a_fresh_ssh():
    (p,) = plan(cfg(3, "mpi"), REMOTE)
    assert_fresh_ssh(p.argv, "h1")
    assert p.tagged and p.ranks == [0, 1, 2] and p.rank_hosts == ["h1", "h2", "h3"]
    assert p.remote and p.host_of(2) == "h3" and p.split("[7,2]<stdout>:x") == (2, "x")  # each rank killed on its host
    command = p.argv[-1]
    assert "$lib" in command and "libmpi.so.40" in command  # the node probes its own libmpi
    mpirun = shlex.split(command.split("exec env ", 1)[1])
    assert "OMPI_ALLOW_RUN_AS_ROOT=1" in mpirun
    mpirun = mpirun[mpirun.index("mpirun"):]
    assert flag(mpirun, "-np") == "3" and flag(mpirun, "--host") == "h1:1,h2:1,h3:1" and "--tag-output" in mpirun
    assert {mpirun[i + 1] for i, a in enumerate(mpirun) if a == "-x"} >= {"PYTHONUNBUFFERED", "OMPI_ALLOW_RUN_AS_ROOT"}
    assert "/opt/mlx-train/venv/bin/python -m mlx_train.rank.worker" in command


def test_every_fleet_ssh_command_is_bounded():
    assert f"ConnectTimeout={ssh.CONNECT_TIMEOUT_S}" in ssh.argv("h1", "true")
    assert "ControlPath=none" not in ssh.argv("h1", "true")  # may share a master where a timeout bounds the wait
    assert_fresh_ssh(ssh.argv("h1", "true", fresh=True), "h1")


def test_slots_must_match_devices():
    with pytest.raises(UserError, match="3 devices asked for but the hosts provide 2 slots"):
        plan(cfg(3), REMOTE[:2])


def test_with_devices_picks_hosts_and_spreads_ranks_in_blocks():
    assert with_devices(REMOTE, None) is REMOTE  # the cluster file's slots
    assert [(h.name, h.slots) for h in with_devices(REMOTE, 2)] == [("h1", 1), ("h2", 1)]
    assert [(h.name, h.slots) for h in with_devices(REMOTE, 3)] == [("h1", 1), ("h2", 1), ("h3", 1)]
    spread = with_devices(REMOTE, 7)
    assert [(h.name, h.slots) for h in spread] == [("h1", 3), ("h2", 2), ("h3", 2)]
    assert [(h.addr, h.iface, h.python, h.memory) for h in spread] == [(h.addr, h.iface, h.python, h.memory)
                                                                      for h in REMOTE]
    assert [h.name for h in launch.rank_hosts(spread)] == ["h1"] * 3 + ["h2"] * 2 + ["h3"] * 2


def test_cluster_file_round_trip_and_errors(tmp_path, monkeypatch):
    path = tmp_path / "cluster.yaml"
    write_cluster(path, REMOTE, "mpi")
    assert load_cluster(str(path)) == Cluster(path, REMOTE, "mpi")
    path.write_text("hosts:\n  - {name: h1, addr: 10.0.0.1, python: /p}\n")  # a file from before: no backend
    assert load_cluster(str(path)) == Cluster(path, [Host("h1", "10.0.0.1", python="/p")], None)
    path.write_text("hosts:\n  - {name: h1}\n")
    with pytest.raises(UserError, match="is not a valid cluster file"):
        load_cluster(str(path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mlx_train.fleet.hosts.DEFAULT_PATHS", (tmp_path / "cluster.yaml", tmp_path / "none.yaml"))
    assert configured() == tmp_path / "cluster.yaml"
    path.unlink()
    assert configured() is None
    with pytest.raises(UserError, match="no cluster file"):
        load_cluster()
