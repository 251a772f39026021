"""`mlx-train status` with a cluster file: every host, reachable, with the ranks it runs right now."""
from __future__ import annotations

import signal
import subprocess
import uuid

import pytest

from helpers import FLEET_HOSTS, MLX_TRAIN, NODE_PYTHON, assert_ranks_gone, fleet_env, rank_pids, train_on_fleet, wait_for

pytestmark = pytest.mark.fleet


def table_rows(out: str, title: str) -> list:
    """The body rows of the rich table titled `title`, each a list of its cells."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(title))
    rows = []
    for line in lines[start + 1:]:
        if not line.startswith(("│", "┏", "┃", "┡", "└", "┌", "├", "╇")):
            break
        if line.startswith("│"):
            rows.append([c.strip() for c in line.strip("│").split("│")])
    return rows


def test_status_shows_every_host_and_its_running_rank(fleet, cluster, corpus, tmp_path):
    # A run id no other text in the output can contain.
    run = tmp_path / f"status-{uuid.uuid4().hex[:8]}"
    proc = train_on_fleet(fleet, cluster, corpus, run, "--steps", "100000", "--no-live", popen=True)
    try:
        wait_for(lambda: (run / "metrics.jsonl").exists(), 120, "the run's first metrics")
        out = subprocess.run([MLX_TRAIN, "status", "--cluster", str(cluster)], env=fleet_env(fleet),
                             capture_output=True, text=True, timeout=120)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    hosts = {row[0]: row for row in table_rows(out.stdout, f"cluster ({cluster})")}
    assert sorted(hosts) == FLEET_HOSTS, out.stdout
    for rank, host in enumerate(FLEET_HOSTS):
        name, reachable, _os, _mlx, python, _memory, _device, ranks = hosts[host]
        assert reachable == "yes" and python == NODE_PYTHON, hosts[host]
        assert ranks == f"{run.name}: rank {rank}", hosts[host]  # this run's rank, live, and nothing else
    device = {row[0]: row[1] for row in table_rows(out.stdout, "this device")}
    assert device["BLAS (ranks)"] and not device["BLAS (ranks)"].startswith("unknown"), device
    assert_ranks_gone(rank_pids(run))
