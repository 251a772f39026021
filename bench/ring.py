"""Several ranks of one bench script on loopback under MLX's ring backend, as mlx.launch would start
them: a hostfile of free ports, MLX_RANK per process. Rank 0's last output line is its JSON result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent


def ring_hostfile(ranks: int) -> str:
    """A hostfile (JSON) of `ranks` free loopback ports, held open together so they are distinct."""
    socks = []
    for _ in range(ranks):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    hosts = [[f"127.0.0.1:{s.getsockname()[1]}"] for s in socks]
    for s in socks:
        s.close()
    fd, path = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(hosts, fh)
    return path


def rank_env(ranks: int) -> dict:
    """The environment of `ranks` ranks sharing a host: BLAS threads split between them, this checkout's
    package first."""
    from mlx_train.rank import blas

    return {**os.environ, **blas.rank_env(ranks_on_host=ranks), "PYTHONPATH": str(REPO / "src")}


def rank0_result(procs: List[subprocess.Popen], timeout: float, what: str):
    """Rank 0's JSON result (its last line); every wait bounded by `timeout` in all, and every rank's
    exit checked (a failure shows each rank's last stderr)."""
    deadline = time.monotonic() + timeout
    try:
        outs = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=10)
    if any(p.returncode for p in procs):
        raise SystemExit(f"{what} failed: exit codes {[p.returncode for p in procs]}\n"
                         + "\n".join(o[1][-1500:] for o in outs))
    return json.loads(outs[0][0].strip().splitlines()[-1])


def run_ranks(cmd: List[str], ranks: int, env: dict, what: str, timeout: float = 900) -> dict:
    """Start `cmd` as `ranks` ring ranks; rank 0's JSON result. Every wait is bounded by `timeout`."""
    hostfile = ring_hostfile(ranks)
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "MLX_RANK": str(r), "MLX_HOSTFILE": hostfile}) for r in range(ranks)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        os.unlink(hostfile)
    codes = [p.returncode for p in procs]
    if any(codes):
        raise SystemExit(f"{what} failed: exit codes {codes}\n{outs[0][1][-2000:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])


def command_line(argv: List[str], rank_main: Callable[[dict], None], main: Callable[..., dict],
                 table: Callable[[dict], str], results: Path) -> None:
    """A fleet bench's entry: `--rank JSON` runs one rank (the bench starts them), `--table` prints
    the README's table of its last results, else main(**JSON) and its result as JSON."""
    if len(argv) > 2 and argv[1] == "--rank":
        rank_main(json.loads(argv[2]))
    elif len(argv) > 1 and argv[1] == "--table":
        print(table(json.loads(results.read_text())))
    else:
        print(json.dumps(main(**json.loads(argv[1]) if len(argv) > 1 else {})))


def ranks_at(script: str, places: List[Tuple[Optional[str], str]], args: dict, timeout: float, what: str) -> dict:
    """`script --rank ARGS` as one rank per (network namespace or None, ip) in `places` (one place: a
    single process, no ring); rank 0's result."""
    base = 20000 + os.getpid() % 20000
    fd, hostfile = tempfile.mkstemp(prefix="mlx-train-bench-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump([[f"{ip}:{base + i}"] for i, (_, ip) in enumerate(places)], fh)
    env = {**rank_env(len(places)), **({"MLX_HOSTFILE": hostfile} if len(places) > 1 else {})}
    cmd = [sys.executable, script, "--rank", json.dumps(args)]
    try:
        procs = [subprocess.Popen((["ip", "netns", "exec", ns] if ns else []) + cmd, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env={**env, "MLX_RANK": str(r)})
                 for r, (ns, _) in enumerate(places)]
        return rank0_result(procs, timeout, what)
    finally:
        os.unlink(hostfile)
