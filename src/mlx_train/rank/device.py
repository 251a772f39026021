"""This device's memory, and the share of it one rank may use.

A fact the rank measures for itself (it may run on a host the controller cannot see), and
that the planner and the controller read for local ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional, Protocol

if TYPE_CHECKING:
    from mlx_train.config import TrainConfig


def device_memory() -> tuple:
    """(bytes, source) for this machine's accelerator, or its RAM on the CPU build; within this
    process's cgroup memory limit where it has one (a container, the test fleet's unequal hosts),
    as `configure` records it: past that limit the kernel kills the rank, whatever the machine has."""
    import mlx.core as mx

    try:
        info = mx.device_info()
    except (AttributeError, RuntimeError):
        info = {}
    found = next(((int(info[k]), f"mx.device_info()['{k}']") for k in ("max_recommended_working_set_size",
                                                                       "memory_size") if info.get(k)), None)
    if found is None:
        found = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "system memory (CPU build)"
    limit = cgroup_memory_limit()
    return (limit, "the cgroup's memory limit") if limit is not None and limit < found[0] else found


def cgroup_memory_limit(proc: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> Optional[int]:
    """The tightest memory limit of this process's cgroup and its ancestors (v1 memory.limit_in_bytes,
    v2 memory.max), None where none limits it or there are no cgroups (macOS)."""
    try:
        with open(proc) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        _, ctrl, path = (line.split(":", 2) + ["", ""])[:3]
        if "memory" in ctrl.split(","):
            base, name = os.path.join(root, "memory"), "memory.limit_in_bytes"
        elif ctrl == "":
            base, name = root, "memory.max"
        else:
            continue
        while True:
            try:
                with open(os.path.join(base + path.rstrip("/"), name)) as fh:
                    value = fh.read().strip()
            except OSError:
                value = ""
            if value.isdigit() and int(value) < 2**62:  # v1 writes a huge number for no limit, v2 `max`
                found.append(int(value))
            if path in ("", "/"):
                break
            path = path.rsplit("/", 1)[0] or "/"
    return min(found) if found else None


# A rank's default budget: this share of its device, split among the ranks on that device.
BUDGET_FRACTION = 0.9


class Shared(Protocol):
    """A device and the ranks on it: a cluster file's host (fleet/hosts.Host) or `ThisHost`."""
    memory: Optional[int]   # bytes; None: this machine's
    slots: int


@dataclass(frozen=True)
class ThisHost:
    """The machine a rank runs on, as the rank sees it."""
    slots: int
    memory: Optional[int] = None


def rank_budget_for(cfg: "TrainConfig", hosts: Iterable[Shared]) -> int:
    """The memory budget of every rank of `cfg` on `hosts`: --memory-budget when given, else the tightest
    host's share (BUDGET_FRACTION of its memory, split among its ranks). The controller plans with it
    and each rank checks its peak against it, so both must get it from here."""
    if cfg.memory_budget:
        return cfg.memory_budget
    return min(int((h.memory or device_memory()[0]) * BUDGET_FRACTION / max(1, h.slots)) for h in hosts)
