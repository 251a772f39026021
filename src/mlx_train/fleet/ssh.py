"""Every ssh command line, and running commands on fleet hosts over ssh, always bounded in time.

`argv` is the one builder of ssh command lines: used by launch (remote ranks, remote mpirun),
the supervisor's remote kill, configure, check-network, status and reset-distributed. A host
named "localhost" runs the command here instead (the one-machine inventory has no ssh).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Tuple, TypeVar

from mlx_train.fleet.hosts import LOCAL

CONNECT_TIMEOUT_S = 4
# The client gives up on a server silent for ALIVE_INTERVAL_S * ALIVE_COUNT_MAX seconds (a partition):
# the supervisor then sees a remote rank's ssh exit instead of waiting on it. The far side never
# learns from this; it has sshd's ClientAliveInterval (ansible ssh_mesh) and the supervisor's
# keepalive (controller/keepalive.py).
ALIVE_INTERVAL_S = 5
ALIVE_COUNT_MAX = 3
T = TypeVar("T")


@dataclass
class Result:
    code: int            # 255: ssh could not connect; 124: timed out
    out: str
    err: str
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.code == 0

    def last_json(self) -> Optional[dict]:
        """The JSON object a remote probe prints as its last line, or None."""
        try:
            value = json.loads(self.out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return None
        return value if isinstance(value, dict) else None

    def why(self) -> str:
        """The last line of stderr (or a timeout note), for one-line messages."""
        if self.code == 124:
            return "timed out"
        lines = [line for line in self.err.strip().splitlines() if line.strip()]
        return lines[-1].strip() if lines else f"exit code {self.code}"


def options(*, fresh: bool = False, connect_timeout: float = CONNECT_TIMEOUT_S) -> List[str]:
    """The ssh options every fleet command takes: never prompt, give up connecting in seconds, and
    give up on a connected server that stops answering in seconds too.

    `fresh` keeps ssh away from ControlMaster multiplexing, both ways: it neither joins a master
    nor becomes one. Over a dead link a multiplexed session hangs instead of failing within
    ConnectTimeout. And a master holds the output of every session it carries: after the client
    is killed it keeps the client's pipe open until the far host confirms the session closed (a
    downed link: for good), so whoever waits for that pipe's EOF never learns the client ended.
    Ranks, the remote kill, status, reset and the reachability probes use it.
    """
    opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout:g}",
            "-o", f"ServerAliveInterval={ALIVE_INTERVAL_S}", "-o", f"ServerAliveCountMax={ALIVE_COUNT_MAX}"]
    if fresh:
        opts += ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
    return opts


def argv(dest: str, command: str, *, fresh: bool = False) -> List[str]:
    """`ssh` running `command` (one shell string) on `dest`, without a terminal."""
    return ["ssh", "-T", *options(fresh=fresh), dest, command]


def run(dest: str, command: str, *, timeout: float = 20, input: Optional[str] = None,
        fresh: bool = False) -> Result:
    cmd = ["sh", "-c", command] if dest == LOCAL else argv(dest, command, fresh=fresh)
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout,
                           stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return Result(124, out, f"timed out after {timeout:.0f} s", time.monotonic() - t0)
    return Result(p.returncode, p.stdout, p.stderr, time.monotonic() - t0)


def run_python(dest: str, python: str, code: str, args: Iterable[str] = (), *, timeout: float = 30,
               fresh: bool = False) -> Result:
    """Run `code` with the host's interpreter, sent on stdin: it needs nothing installed but
    the interpreter (and whatever `code` imports), so it works across mlx-train versions."""
    command = shlex.join([python, "-", *args])
    return run(dest, f"exec {command}", timeout=timeout, input=code, fresh=fresh)


def probe(dest: str, python: str, code: str, args: Iterable[str] = (), *, timeout: float = 30) -> Tuple[Optional[dict], str]:
    """Run a probe that prints one JSON object last, over a fresh connection (a host behind a dead
    link fails within ConnectTimeout): (that object, "") or (None, why not)."""
    res = run_python(dest, python, code, args, timeout=timeout, fresh=True)
    if not res.ok:
        return None, res.why()
    value = res.last_json()
    if value is None:
        return None, f"unexpected output from {python}: {(res.err.strip() or res.out.strip())[-200:]}"
    return value, ""


def parallel(fn: Callable[..., T], items: List, workers: int = 16) -> List[T]:
    """fn(item) for every item at once (each is mostly waiting on ssh), results in order."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def host_part(dest: str) -> str:
    """`user@host` -> `host`."""
    return dest.rsplit("@", 1)[-1]
