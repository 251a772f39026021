"""Shared by the tests: run the real CLI in a subprocess, read a run directory, check pids, and the
facts of the test fleet (its size, its hosts' names, how to reach it)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple, TypeVar, Union

import pytest

from mlx_train import procs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from corpus import write as write_corpus  # noqa: E402,F401  (tools/corpus.py: text that never changes)
from fleet import wait_for  # noqa: E402,F401  (tools/fleet.py: one bounded wait for tests and tools)

T = TypeVar("T")
# The console script, as a user runs it (the fleet tests); `cli` below runs the module.
MLX_TRAIN = str(Path(sys.executable).parent / "mlx-train")
# A model small enough that a 2-rank step takes a few milliseconds on 2 CPU cores.
TINY = ["--layers", "2", "--width", "64", "--heads", "2", "--seq-len", "64", "--batch-size", "4"]

# The test fleet (tools/fleet.py, brought up by conftest.py): its one size, and what provisioning
# puts on every node.
FLEET_SIZE = 3
FLEET_HOSTS = [f"h{i}" for i in range(1, FLEET_SIZE + 1)]
NODE_PYTHON = "/opt/mlx-train/venv/bin/python"


def required() -> bool:
    """Under CI (or MLX_TRAIN_REQUIRE_FLEET=1, which .ci/run sets) what the fleet and guide tests
    need must be there: a test that cannot run is an error, never a quiet skip."""
    return bool(os.environ.get("CI")) or os.environ.get("MLX_TRAIN_REQUIRE_FLEET") == "1"


def unavailable(reason: str) -> None:
    """Skip for want of `reason`, or fail when required()."""
    if required():
        pytest.fail(f"{reason} (required here: CI or MLX_TRAIN_REQUIRE_FLEET=1 is set)", pytrace=False)
    pytest.skip(reason)


def needs(what: Union[str, Callable[[], bool]], reason: str):
    """Decorate a test that needs a program on PATH (`what` a name) or a condition (`what` a
    callable): without it the test goes through unavailable(), so under CI it fails, not skips."""
    present = (lambda: shutil.which(what) is not None) if isinstance(what, str) else what

    def wrap(test):
        @functools.wraps(test)  # pytest reads the fixtures from the wrapped signature
        def checked(*args, **kw):
            if not present():
                unavailable(reason)
            return test(*args, **kw)
        return checked
    return wrap


def fleet_env(fleet, **extra: str) -> dict:
    """The environment for mlx-train against the fleet (tools/fleet.py Fleet.client_env)."""
    return fleet.client_env(**extra)


def train_on_fleet(fleet, cluster: Path, corpus: Path, run: Path, *extra: str, popen: bool = False):
    """`mlx-train train` on the fleet's hosts with TINY; with popen, started and returned running."""
    argv = [MLX_TRAIN, "train", "--cluster", str(cluster), *TINY, "--data", str(corpus), "--run-dir", str(run), *extra]
    if popen:
        return subprocess.Popen(argv, env=fleet_env(fleet), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(argv, env=fleet_env(fleet), capture_output=True, text=True, timeout=240)


def cli(*args: str, timeout: float = 300, check: bool = False, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kw.pop("env", {})}
    proc = subprocess.run([sys.executable, "-m", "mlx_train.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"mlx-train {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def straight_and_resumed(tmp_path: Path, args: List[str], stop_after: int) -> Tuple[Path, Path]:
    """The same training run twice: straight through, and stopped after `stop_after` then resumed.
    Returns their run directories."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    cli("train", *args, "--run-dir", str(straight), check=True)
    cli("train", *args, "--run-dir", str(broken), "--stop-after", str(stop_after), check=True)
    assert events(broken)[-1]["event"] == "stopped" and events(broken)[-1]["step"] == stop_after
    cli("train", "--resume", str(broken), check=True)
    assert events(broken, "resume")[-1]["step"] == stop_after
    return straight, broken


def popen(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mlx_train.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def jsonl(path: Path) -> List[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def events(run_dir: Path, name: str = None) -> List[dict]:
    """The run's events (of one kind if `name`); [] before the run wrote any."""
    path = Path(run_dir) / "events.jsonl"
    evs = jsonl(path) if path.exists() else []
    return [e for e in evs if name is None or e["event"] == name]


def metrics(run_dir: Path) -> List[dict]:
    return jsonl(Path(run_dir) / "metrics.jsonl")


pid_alive = procs.alive


def is_worker(pid: int) -> bool:
    """A live rank process (the fleet shares this machine's pid namespace, so remote ranks count)."""
    try:
        return pid_alive(pid) and b"mlx_train.rank.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def rank_pids(run_dir: Path, attempt: Optional[int] = None) -> List[int]:
    """The pids the ranks reported at launch, of every attempt or of one."""
    return [r["pid"] for e in events(run_dir, "launch") if attempt is None or e.get("attempt") == attempt
            for r in e["ranks"]]


def assert_ranks_gone(pids: List[int], timeout: float = 15, what: str = "a rank outlived its run") -> None:
    """Every pid in `pids` ends (as a rank) within `timeout` seconds."""
    try:
        wait_for(lambda: not any(is_worker(p) for p in pids), timeout, what)
    except TimeoutError:
        raise AssertionError(f"{what}: pids {[p for p in pids if is_worker(p)]} still running") from None


@contextlib.contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    """A real filesystem of `size` (a tmpfs, root only) mounted at `where`: a disk that fills up
    or can be remounted read-only under a running program."""
    if os.geteuid() != 0:
        unavailable("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True,
                   capture_output=True, timeout=30)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def src_env() -> dict:
    """The environment for a process of our own that imports this checkout's package."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1"}


def free_ports(n: int) -> List[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_ring_ranks(n: int, module: str, args: tuple, out_dir: Path, timeout: float) -> List[dict]:
    """`n` ranks of MLX's ring on loopback, each running tests/<module>.py's rank_main(*args), which writes
    out_dir/report-<rank>.json; every rank must exit 0 within `timeout`. The reports in rank order."""
    hostfile = out_dir / "hostfile.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); import {module} as t; "
            f"t.rank_main(*{tuple(str(a) for a in args)!r})")
    env = {**src_env(), "MLX_HOSTFILE": str(hostfile)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**env, "MLX_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(n)]
    outs = []
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=10)
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    return sorted((json.loads(p.read_text()) for p in out_dir.glob("report-*.json")), key=lambda rep: rep["rank"])


def record_reads(trainer) -> List[list]:
    """What `trainer` (rank/trainer.py) reads from now on: [data step, a digest of the step's
    micro-batches in order] per step, appended as it trains: two runs read the same rows in the
    same order when their lists are equal."""
    import hashlib

    read: List[list] = []
    micro_batches = trainer.train.micro_batches

    def recorded(step, rank, dist):
        batches = list(micro_batches(step, rank, dist))
        read.append([step, hashlib.sha1(b"".join(x.tobytes() + y.tobytes() for x, y in batches)).hexdigest()])
        return iter(batches)

    trainer.train.micro_batches = recorded
    return read


def train_in_process(cfg, group, run_dir: str, resume: bool = False, stop_after: Optional[int] = None,
                     record: bool = False) -> Tuple[list, Optional[List[list]]]:
    """This rank's Trainer (rank/trainer.py) on `run_dir` with `cfg`, inside a rank of a test's
    launch: the protocol.Metrics it emitted, and with `record` what it read (`record_reads`)."""
    from mlx_train import protocol
    from mlx_train.rank.trainer import Trainer

    seen: list = []
    real = protocol.emit
    protocol.emit = seen.append
    try:
        trainer = Trainer(cfg, group, run_dir, 1 << 40)
        read = record_reads(trainer) if record else None
        trainer.run(resume=resume, stop_after=stop_after)
    finally:
        protocol.emit = real
    return [m for m in seen if isinstance(m, protocol.Metrics)], read
