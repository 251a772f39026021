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
    """(bytes, source) for this machine's accelerator, or its RAM on the CPU build."""
    import mlx.core as mx

    try:
        info = mx.device_info()
    except (AttributeError, RuntimeError):
        info = {}
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key]), f"mx.device_info()['{key}']"
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "system memory (CPU build)"


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
