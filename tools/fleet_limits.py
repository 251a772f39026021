"""Unequal hosts on the test fleet: a CPU quota (CFS) and a memory limit per host, through cgroups.

A limited host's processes (its sshd, and so every session and rank it starts: children stay in
their parent's group) live in the group `mlxfleet/<host>` of the machine's cgroup hierarchy:

- v1 (separate `cpu` and `memory` hierarchies): `cpu.cfs_quota_us` of `cpu.cfs_period_us`, and
  `memory.limit_in_bytes` (plus `memory.memsw.limit_in_bytes` where swap is accounted, so the
  limit cannot be dodged by swapping);
- v2 (one unified hierarchy): `cpu.max` and `memory.max` (and `memory.swap.max` 0), with the cpu
  and memory controllers enabled down to the group.

Whichever the machine has; the kernel's OOM killer then acts inside the group. Standard library
only: `fleet.py down` removes the groups from a bare python3.
"""
from __future__ import annotations

import errno
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
GROUP = "mlxfleet"  # one name for the machine, like the fleet's netns names: one fleet at a time
PERIOD_US = 100_000
MIN_MEMORY = 32 * 2**20  # below this an sshd and a shell do not start
MAX_CPU = 1024.0
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_UNLIMITED = ("none", "-", "")


class LimitsUnavailable(RuntimeError):
    """This machine cannot limit a host (no cgroup hierarchy with cpu and memory, or not root)."""


@dataclass(frozen=True)
class Limits:
    cpu: float | None = None     # cores' worth of CPU time per wall second; None: unlimited
    memory: int | None = None    # bytes; None: unlimited

    @property
    def unlimited(self) -> bool:
        return self.cpu is None and self.memory is None


# ---------------------------------------------------------------- parsing (--cpu, --memory)

def parse_cpu_value(text: str, flag: str = "--cpu") -> float | None:
    t = text.strip().lower()
    if t in _UNLIMITED:
        return None
    try:
        value = float(t)
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a number of cores (e.g. 0.5, 2) or 'none'") from None
    if not 0.001 <= value <= MAX_CPU:  # also refuses nan and inf
        raise ValueError(f"{flag}: {text!r} is not from 0.001 to {MAX_CPU:g} cores")
    return value


def parse_memory_value(text: str, flag: str = "--memory") -> int | None:
    t = text.strip().upper()
    if t.lower() in _UNLIMITED:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?", t)
    if not m:
        raise ValueError(f"{flag}: {text!r} is not a size (e.g. 512M, 6G: powers of 1024) or 'none'")
    value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value < MIN_MEMORY:
        raise ValueError(f"{flag}: {text!r} is below {MIN_MEMORY >> 20}M, too little for a host's sshd and shell")
    return value


def _per_host(text: str | None, n: int, flag: str, parse) -> list:
    if text is None:
        return [None] * n
    parts = text.split(",")
    if len(parts) not in (1, n):
        raise ValueError(f"{flag}: {len(parts)} values for {n} hosts: give one per host or one for all")
    values = [parse(p, flag) for p in parts]
    return values * n if len(values) == 1 else values


def parse_limits(cpu: str | None, memory: str | None, n: int) -> list[Limits]:
    """Per-host limits from `--cpu a,b,c` and `--memory x,y,z` (or one value for all hosts);
    ValueError with a one-line message naming the flag."""
    cpus = _per_host(cpu, n, "--cpu", parse_cpu_value)
    mems = _per_host(memory, n, "--memory", parse_memory_value)
    return [Limits(c, m) for c, m in zip(cpus, mems)]


def describe(limits: Limits) -> str:
    cpu = "unlimited" if limits.cpu is None else f"{limits.cpu:g}"
    mem = "unlimited" if limits.memory is None else _size(limits.memory)
    return f"cpu={cpu} memory={mem}"


def _size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


# ---------------------------------------------------------------- the machine's cgroups

def _write(path: Path, value: str) -> None:
    # One write per open: cgroup files take one value per write(2).
    with open(path, "w") as f:
        f.write(value)


def _read(path: Path) -> str:
    return path.read_text().strip()


class _Cgroups:
    version = ""

    def __init__(self, root: Path):
        self.root = root

    def dirs(self, host: str) -> list[Path]:
        raise NotImplementedError

    def set(self, host: str, limits: Limits) -> None:
        raise NotImplementedError

    def read(self, host: str) -> Limits:
        raise NotImplementedError

    def apply(self, host: str, limits: Limits, members) -> list[Path]:
        """Make the host's group, set its limits, move the host's processes (`members()`: their
        pids now) into it. Returns the group's directories."""
        dirs = self.dirs(host)
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        self.set(host, limits)
        # A session forked while we move its sshd may be missed: move until a pass finds none.
        for _ in range(5):
            inside = {int(p) for p in _read(dirs[0] / "cgroup.procs").split()}
            outside = [p for p in members() if p not in inside]
            if not outside:
                break
            for d in dirs:
                for pid in outside:
                    try:
                        _write(d / "cgroup.procs", str(pid))
                    except ProcessLookupError:
                        pass  # ended meanwhile
        return dirs


class CgroupV1(_Cgroups):
    version = "v1"

    def dirs(self, host: str) -> list[Path]:
        return [self.root / "cpu" / GROUP / host, self.root / "memory" / GROUP / host]

    def set(self, host: str, limits: Limits) -> None:
        cpu, mem = self.dirs(host)
        _write(cpu / "cpu.cfs_period_us", str(PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", "-1" if limits.cpu is None else str(round(limits.cpu * PERIOD_US)))
        memsw = mem / "memory.memsw.limit_in_bytes"
        # memsw may never be below the memory limit: open it first, close it to the limit after.
        if memsw.exists():
            _write(memsw, "-1")
        try:
            _write(mem / "memory.limit_in_bytes", "-1" if limits.memory is None else str(limits.memory))
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise RuntimeError(f"{host} uses more than {_size(limits.memory)} now: the kernel cannot "
                                   "lower its limit that far") from None
            raise
        if memsw.exists() and limits.memory is not None:
            _write(memsw, str(limits.memory))

    def read(self, host: str) -> Limits:
        cpu, mem = self.dirs(host)
        if not cpu.is_dir():
            return Limits()
        quota = int(_read(cpu / "cpu.cfs_quota_us"))
        period = int(_read(cpu / "cpu.cfs_period_us"))
        limit = int(_read(mem / "memory.limit_in_bytes"))
        # -1 is written for "no limit"; the kernel reads it back as 2**63 rounded down to a page.
        return Limits(None if quota < 0 else quota / period, None if not 0 <= limit < 2**62 else limit)


class CgroupV2(_Cgroups):
    version = "v2"

    def dirs(self, host: str) -> list[Path]:
        return [self.root / GROUP / host]

    def apply(self, host: str, limits: Limits, members) -> list[Path]:
        # Controllers reach a group only through every parent's subtree_control. The root may
        # hold processes and still delegate; `mlxfleet` itself holds none, as v2 requires.
        base = self.root / GROUP
        base.mkdir(exist_ok=True)
        for d in (self.root, base):
            enabled = _read(d / "cgroup.subtree_control").split() if (d / "cgroup.subtree_control").exists() else []
            for controller in ("cpu", "memory"):
                if controller not in enabled:
                    _write(d / "cgroup.subtree_control", f"+{controller}")
        return super().apply(host, limits, members)

    def set(self, host: str, limits: Limits) -> None:
        (d,) = self.dirs(host)
        quota = "max" if limits.cpu is None else str(round(limits.cpu * PERIOD_US))
        _write(d / "cpu.max", f"{quota} {PERIOD_US}")
        _write(d / "memory.max", "max" if limits.memory is None else str(limits.memory))
        if (d / "memory.swap.max").exists():
            _write(d / "memory.swap.max", "max" if limits.memory is None else "0")

    def read(self, host: str) -> Limits:
        (d,) = self.dirs(host)
        if not d.is_dir():
            return Limits()
        quota, period = _read(d / "cpu.max").split()
        mem = _read(d / "memory.max")
        return Limits(None if quota == "max" else int(quota) / int(period), None if mem == "max" else int(mem))


def detect(root: Path = CGROUP_ROOT) -> _Cgroups:
    """The machine's cgroup hierarchy that has both the cpu and the memory controller."""
    if (root / "cpu" / "cpu.cfs_quota_us").exists() and (root / "memory" / "memory.limit_in_bytes").exists():
        found: _Cgroups = CgroupV1(root)
        writable = [root / "cpu", root / "memory"]
    elif (root / "cgroup.controllers").exists() and {"cpu", "memory"} <= set(_read(root / "cgroup.controllers").split()):
        found = CgroupV2(root)
        writable = [root]
    else:
        raise LimitsUnavailable(f"no cgroup hierarchy with the cpu and memory controllers under {root} "
                                "(v1: cpu/ and memory/; v2: cgroup.controllers listing both): hosts cannot be limited")
    for d in writable:
        if not os.access(d, os.W_OK):
            raise LimitsUnavailable(f"cannot write {d} (root needed, or a read-only cgroup mount): hosts cannot be limited")
    return found


def groups_in(proc_cgroup: str) -> dict[str, str]:
    """Controller -> group path, from a /proc/<pid>/cgroup text; '' is the v2 hierarchy."""
    groups = {}
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            groups[c] = path
    return groups


def remove_all(root: Path = CGROUP_ROOT, timeout: float = 3) -> None:
    """Remove every fleet group (v1 and v2), moving any process still inside to the hierarchy's root.
    Bounded: processes just killed may take a moment to leave."""
    bases = [root / "cpu" / GROUP, root / "memory" / GROUP, root / GROUP]
    deadline = time.monotonic() + timeout
    for base in bases:
        if not base.is_dir():
            continue
        hierarchy = base.parent
        for d in sorted((p for p in base.iterdir() if p.is_dir()), reverse=True) + [base]:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    for pid in _read(d / "cgroup.procs").split() if (d / "cgroup.procs").exists() else []:
                        try:
                            _write(hierarchy / "cgroup.procs", pid)
                        except OSError:
                            pass
                    time.sleep(0.02)
