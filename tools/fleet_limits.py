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
# The CFS period of a host's CPU quota. A quota is enforced per period: at 0.125 cores and the
# kernel's default 100 ms a host runs 12.5 ms and is then held off 87.5 ms, so a ring collective
# with it waits most of a period, which no slower chip does. 10 ms spreads the same share finely
# (bench/shares_fleet.py: the sync of the shares bench fell from 0.05-0.14 s to 0.025-0.034 s).
PERIOD_US = 10_000
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


    def hierarchies(self) -> dict[str, Path]:
        """/proc/<pid>/cgroup's controller key -> the mount of its hierarchy, for this group's dirs."""
        raise NotImplementedError

    def origin(self, pid: int) -> dict[str, str]:
        """The groups `pid` is in now, in the hierarchies the host's group lives in: where
        release() puts the host's processes back."""
        groups = groups_in(Path(f"/proc/{pid}/cgroup").read_text())
        return {key: groups.get(key, "/") for key in self.hierarchies()}

    def release(self, host: str, origin: dict[str, str], timeout: float = 3) -> None:
        """Lift the host's limits: its processes back to the groups they came from (the
        hierarchy's root if those are gone), its group removed."""
        for key, mount in self.hierarchies().items():
            d = mount / GROUP / host
            if not d.is_dir():
                continue
            back = mount / origin.get(key, "/").lstrip("/")
            back = back if (back / "cgroup.procs").exists() else mount
            _empty(d, back, timeout)


def _empty(d: Path, into: Path, timeout: float) -> None:
    """Move every process in group `d` to group `into`, then remove `d`; bounded, since a process
    may fork or exit meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        for pid in _read(d / "cgroup.procs").split() if (d / "cgroup.procs").exists() else []:
            try:
                _write(into / "cgroup.procs", pid)
            except OSError:
                pass  # ended meanwhile
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class CgroupV1(_Cgroups):
    version = "v1"

    def dirs(self, host: str) -> list[Path]:
        return [self.root / "cpu" / GROUP / host, self.root / "memory" / GROUP / host]

    def hierarchies(self) -> dict[str, Path]:
        return {"cpu": self.root / "cpu", "memory": self.root / "memory"}

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

    def hierarchies(self) -> dict[str, Path]:
        return {"": self.root}

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


def mount_commands(mountinfo: str, links: dict[str, str] | None = None) -> list[str]:
    """Shell commands that give a host the machine's view of /sys/fs/cgroup.

    `ip netns exec` mounts a fresh sysfs over /sys in the host's mount namespace (so
    /sys/class/net shows the host's interfaces), which hides the cgroup mounts below it: without
    them a host could not see its own limits (`configure` reads them). Mounting a cgroup
    hierarchy again with the same controllers shows the same hierarchy, not a new one.
    `mountinfo`: the controller's /proc/self/mountinfo; `links`: symlinks in /sys/fs/cgroup
    (name -> target, e.g. cpu -> cpu,cpuacct)."""
    commands = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        point = fields[4]
        fstype, _, superopts = line.split(" - ", 1)[1].split()[:3]
        if point != str(CGROUP_ROOT) and not point.startswith(f"{CGROUP_ROOT}/"):
            continue
        if fstype == "tmpfs" and point == str(CGROUP_ROOT):
            commands.append(f"mount -t tmpfs -o mode=755 tmpfs {point}")
        elif fstype == "cgroup":
            opts = ",".join(o for o in superopts.split(",") if o not in ("rw", "ro"))
            commands.append(f"mkdir -p {point} && mount -t cgroup -o {opts} cgroup {point}")
        elif fstype == "cgroup2":
            commands.append(f"mkdir -p {point} && mount -t cgroup2 cgroup2 {point}")
    commands += [f"ln -sfn {target} {CGROUP_ROOT}/{name}" for name, target in sorted((links or {}).items())]
    return commands


def machine_mount_commands() -> list[str]:
    """mount_commands() for this machine."""
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
        links = {p.name: os.readlink(p) for p in CGROUP_ROOT.iterdir() if p.is_symlink()}
    except OSError:
        return []
    return mount_commands(mountinfo, links)


def groups_in(proc_cgroup: str) -> dict[str, str]:
    """Controller -> group path, from a /proc/<pid>/cgroup text; '' is the v2 hierarchy."""
    groups = {}
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            groups[c] = path
    return groups


def remove_all(root: Path = CGROUP_ROOT, timeout: float = 3) -> None:
    """Remove every fleet group (v1 and v2), moving any process still inside to the hierarchy's
    root. Bounded: processes just killed may take a moment to leave."""
    for base in (root / "cpu" / GROUP, root / "memory" / GROUP, root / GROUP):
        if base.is_dir():
            for d in [p for p in base.iterdir() if p.is_dir()] + [base]:
                _empty(d, base.parent, timeout)
