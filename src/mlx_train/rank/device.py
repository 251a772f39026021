"""This device's memory, and the share of it one rank may use by default.

A fact the rank measures for itself (it may run on a host the controller cannot see), and
that the planner and the controller read for local ranks.
"""

from __future__ import annotations

import os


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


def rank_budget(device_bytes: int, ranks_on_host: int) -> int:
    return int(device_bytes * BUDGET_FRACTION / max(1, ranks_on_host))
