"""How ranks are started: the commands and environments for each process, nothing more.

Three shapes, all running the same `python -m mlx_train.rank.worker`:
- ring, local ranks: one child per rank with the ring's peer list on loopback;
- ring over ssh: one `ssh host ... worker` per rank with the hosts' pinned addresses;
- mpi: one `mpirun --tag-output` carrying every rank (local or `--host` list).
Each shape also says how its process is stopped and how its output is read (RankProc): the rank
group (group.py) starts and stops what these describe without knowing which shape it holds. A rank
on a remote host reads the model and data where ship.py put them on that host (`--placed`,
TrainConfig.placed_at).
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from mlx_train.config import TrainConfig
from mlx_train.controller import keepalive
from mlx_train.errors import UserError
from mlx_train.fleet import mpi, ssh
from mlx_train.fleet.hosts import LOCAL, Host


# mpirun --tag-output: "[job,rank]<stdout>: line".
_TAGGED = re.compile(r"^\[\d+,(\d+)\]<(?:stdout|stderr)>:\s?(.*)$")


@dataclass(frozen=True)
class RankProc:
    """One process to start, carrying one rank (ring) or all of them (mpirun), and how to stop it."""
    argv: List[str]
    env: Dict[str, str]
    host: str
    ranks: List[int]
    tagged: bool = False         # lines arrive as mpirun's "[job,rank]<stdout>:" tags
    rank_hosts: Optional[List[str]] = None  # mpirun across hosts: the ssh destination of each rank
    remote: bool = False         # started through ssh: the process here is only the ssh client

    @property
    def what(self) -> str:
        """How a message names this process."""
        return f"rank {self.ranks[0]}" if len(self.ranks) == 1 else "mpirun"

    @property
    def exit_ranks(self) -> List[Optional[int]]:
        """The ranks its exit is recorded for: mpirun's one exit stands for all of them (None)."""
        return [None] if self.tagged else list(self.ranks)

    def host_of(self, rank: int) -> str:
        return (self.rank_hosts or [self.host] * len(self.ranks))[self.ranks.index(rank)]

    def split(self, line: str) -> Tuple[int, str]:
        """Which of its ranks wrote `line`, and the line as that rank wrote it."""
        if self.tagged:
            m = _TAGGED.match(line)
            if m:
                return int(m.group(1)), m.group(2)
        return self.ranks[0], line

    def send_signal(self, pgid: int, sig: int, pids: Dict[int, int]) -> None:
        """Send `sig` to this process's group here (`pgid`) and, when it was started through ssh, to
        each of its ranks by the pid the rank reported (`pids`), on the rank's own host: the ssh
        client dying does not reliably end the remote rank."""
        if self.remote:
            kills = [(self.host_of(r), pids[r]) for r in self.ranks if r in pids]
            threads = [threading.Thread(target=_remote_kill, args=(h, pid, sig), daemon=True) for h, pid in kills]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=20)
        _killpg(pgid, sig)
        if sig == signal.SIGTERM:
            _killpg(pgid, signal.SIGCONT)  # a stopped rank handles SIGTERM only once continued

    def sweep(self, pgid: int) -> None:
        """SIGKILL what a local launch left in its process group (e.g. a child holding the pipe). A
        remote launch's group holds only ssh, whose ControlMaster may serve other sessions."""
        if not self.remote:
            _killpg(pgid, signal.SIGKILL)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _remote_kill(host: str, pid: int, sig: int) -> None:
    # Fresh (no ControlMaster): over a dead link a multiplexed session hangs past ConnectTimeout.
    try:
        subprocess.run(ssh.argv(host, f"kill -{int(sig)} {int(pid)}", fresh=True),
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=15)
    except subprocess.TimeoutExpired:
        pass  # an unreachable host: its rank fails on its own once the ring is gone


def local_hosts(n: int) -> List[Host]:
    return [Host(LOCAL, "127.0.0.1", python=sys.executable, slots=n)]


def rank_hosts(hosts: List[Host]) -> List[Host]:
    """Host of each rank, ranks in blocks so ring neighbours share a host where they can."""
    return [h for h in hosts for _ in range(h.slots)]


def worker_args(cfg: TrainConfig, run_dir: str, run_id: str, resume: bool, stop_after: Optional[int],
                placed: Optional[Dict[str, str]] = None) -> List[str]:
    # The rank gets the user's config and, apart, where its host holds the model and data: the run's
    # identity (checked on resume) and the adapters' "model" must not depend on which host rank 0 is on.
    args = ["-m", "mlx_train.rank.worker", "--config-json", json.dumps(cfg.to_dict(), separators=(",", ":")),
            "--run-dir", run_dir, "--run-id", run_id,
            "--lifeline", "--lifeline-timeout", f"{keepalive.TIMEOUT_S:g}"]  # the supervisor beats (keepalive.py)
    if placed:
        args += ["--placed", json.dumps(placed, separators=(",", ":"))]
    if resume:
        args.append("--resume")
    if stop_after is not None:
        args += ["--stop-after", str(stop_after)]
    return args


def _free_ports(n: int) -> List[int]:
    """n ports free on loopback now (held open together so they are distinct)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _remote_ports(n: int) -> List[int]:
    # Remote hosts cannot be probed from here; a fresh random base per attempt steps around
    # sockets still in TIME_WAIT from the previous attempt.
    base = random.randrange(20000, 60000 - n)
    return list(range(base, base + n))


def _ssh(dest: str, command: str) -> List[str]:
    # Fresh: the supervisor learns a rank ended from its pipe's EOF, and an ssh ControlMaster
    # (users' configs and the test fleet's have one) would hold that pipe open past the client.
    return ssh.argv(dest, command, fresh=True)


def _remote_command(env: Dict[str, str], argv: List[str]) -> str:
    # Environment variables do not cross ssh, so they go on the remote command line. A login
    # shell is not used: the interpreter path is absolute. Not `exec`: a rank killed by a signal
    # (the OOM killer) would make ssh exit 255, as a lost connection does; a shell that waits exits
    # 128+n, which ssh relays, and the supervisor reads the signal (planning/oom.py).
    return " ".join(["env", *(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(argv)]) + " ; exit $?"


def test_hooks() -> Dict[str, str]:
    """The fault-injection switches of the tests (MLX_TRAIN_TEST_*, off unless set), which must
    reach remote ranks too: ssh does not forward the environment."""
    return {k: v for k, v in os.environ.items() if k.startswith("MLX_TRAIN_TEST_")}


def plan_ring(cfg: TrainConfig, hosts: List[Host], args_for: Callable[[Host], List[str]],
              wrapper: List[str]) -> List[RankProc]:
    per_rank = rank_hosts(hosts)
    n = len(per_rank)
    k = cfg.dist.ring_connections
    ports = _free_ports(n * k) if all(h.local for h in hosts) else _remote_ports(n * k)
    peers = json.dumps([[f"{h.addr}:{p}" for p in ports[r * k:(r + 1) * k]] for r, h in enumerate(per_rank)])
    procs = []
    for rank, host in enumerate(per_rank):
        argv = [host.python, *args_for(host), "--ranks-on-host", str(host.slots)]
        if n > 1:  # a ring of one would wait for a peer that never comes
            argv += ["--rank", str(rank), "--ring-hosts", peers]
        env = {"PYTHONUNBUFFERED": "1", **test_hooks()}
        if host.local:
            procs.append(RankProc([*wrapper, *argv], {**os.environ, **env}, host.name, [rank]))
        else:
            procs.append(RankProc(_ssh(host.name, _remote_command(env, argv)), dict(os.environ), host.name, [rank],
                                  remote=True))
    return procs


def plan_mpi(cfg: TrainConfig, hosts: List[Host], base_args: List[str]) -> List[RankProc]:
    if not all(h.local for h in hosts):
        return plan_mpi_remote(hosts, base_args)
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise UserError("--backend mpi needs OpenMPI's mpirun on PATH: run `make install` (Debian: apt-get install "
                        "openmpi-bin libopenmpi-dev; macOS: brew install open-mpi), or use --backend ring")
    per_rank = rank_hosts(hosts)
    env = mpi.env_here()
    argv = [mpirun, "-np", str(len(per_rank)), "--tag-output", "--oversubscribe", *mpi.forward(env)]
    python = hosts[0].python
    argv += [python, *base_args, "--ranks-on-host", str(max(h.slots for h in hosts))]
    return [RankProc(argv, {**os.environ, **env}, hosts[0].name if len(hosts) == 1 else "mpirun",
                     list(range(len(per_rank))), tagged=True)]


def plan_mpi_remote(hosts: List[Host], base_args: List[str]) -> List[RankProc]:
    """mpirun runs on the first host, over ssh: from there it reaches the others through the nodes'
    own key mesh, and every node's MCA params file and login environment apply."""
    per_rank = rank_hosts(hosts)
    program = [hosts[0].python, *base_args, "--ranks-on-host", str(max(h.slots for h in hosts))]
    command = mpi.on_node([(h.name, h.slots) for h in hosts], program, ["--tag-output"], {"PYTHONUNBUFFERED": "1"})
    return [RankProc(_ssh(hosts[0].name, command), dict(os.environ), hosts[0].name,
                     list(range(len(per_rank))), tagged=True, rank_hosts=[h.name for h in per_rank], remote=True)]


def plan(cfg: TrainConfig, hosts: List[Host], run_dir: str, run_id: str, resume: bool,
         stop_after: Optional[int] = None, wrapper: Optional[List[str]] = None) -> List[RankProc]:
    """The processes to start. `wrapper` prefixes each local rank's command (e.g. taskset, prlimit)."""
    total = sum(h.slots for h in hosts)
    if total != cfg.dist.num_devices:
        raise UserError(f"{cfg.dist.num_devices} devices asked for but the hosts provide {total} slots: "
                        "change --devices or the cluster file")
    # Every rank learns every rank's host (--shares auto re-shares between hosts, never among one
    # host's ranks: rank/balance.py), the same list on every rank.
    on = ",".join(str(i) for i, h in enumerate(hosts) for _ in range(h.slots))

    def args_for(host: Host) -> List[str]:
        return [*worker_args(cfg, run_dir, run_id, resume, stop_after, host.placed), "--rank-hosts", on]

    if cfg.dist.backend == "mpi":
        # One command line carries every rank: the model and data must lie at one path on all hosts.
        first = args_for(hosts[0])
        if any(args_for(h) != first for h in hosts[1:]):
            raise UserError("--backend mpi starts every rank with one command line, but the model or data lie at "
                            "different paths on the hosts: set --ship-cache to one absolute path, or use --backend ring")
        return plan_mpi(cfg, hosts, first)
    return plan_ring(cfg, hosts, args_for, wrapper or [])
