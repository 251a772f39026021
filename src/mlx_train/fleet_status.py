"""Per-host status across the cluster (filled in by the fleet work)."""

from __future__ import annotations

from typing import Optional


def print_fleet_status(console, cluster_file: Optional[str]) -> int:
    from .cluster import DEFAULT_PATHS

    if cluster_file is None and not any(p.is_file() for p in DEFAULT_PATHS):
        console.print("cluster: none configured (mlx-train configure --distributed)")
        return 0
    console.print("cluster: per-host status not available yet")
    return 0
