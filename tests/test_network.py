"""check-network on the 3-host fleet: healthy, a host cut off, a host dropping every packet."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fleet as fleet_tools

pytestmark = pytest.mark.fleet
MLX_TRAIN = str(Path(sys.executable).parent / "mlx-train")


def fleet_env(fleet) -> dict:
    return {**os.environ, "PATH": f"{fleet.ssh_wrapper_dir}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "200"}


@pytest.fixture(scope="module")
def cluster_file(fleet, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("net") / "cluster.yaml"
    subprocess.run([MLX_TRAIN, "configure", "--distributed", "--inventory", str(fleet.inventory_path),
                    "--output", str(out), "--hostfile", str(out.with_name("hostfile.json"))],
                   env=fleet_env(fleet), check=True, capture_output=True, text=True, timeout=60)
    return out


def check(fleet, cluster_file, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([MLX_TRAIN, "check-network", "--cluster", str(cluster_file), "--size-mb", "4", *extra],
                          env=fleet_env(fleet), capture_output=True, text=True, timeout=120)


def fail_rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if "FAIL" in line]


def test_healthy_fleet_passes(fleet, cluster_file):
    res = check(fleet, cluster_file, "--backend", "mpi")
    assert res.returncode == 0, res.stdout + res.stderr
    for pair in ("h1 <-> h2", "h1 <-> h3", "h2 <-> h3"):
        assert pair in res.stdout
    assert "GB/s" in res.stdout and "btl_tcp_links=4" in res.stdout and "mpi all_sum" in res.stdout
    assert "mpi4py allreduce" in res.stdout and "mpi4py," in res.stdout
    assert not fail_rows(res.stdout)


def test_link_down_is_reported_naming_the_host(fleet, cluster_file):
    t0 = time.monotonic()
    try:
        fleet_tools.link_down("h2")
        res = check(fleet, cluster_file)
    finally:
        fleet_tools.link_up("h2")
    assert res.returncode == 1, res.stdout + res.stderr
    rows = fail_rows(res.stdout)
    assert rows and all("h2" in r for r in rows), res.stdout
    assert any("controller -> h2" in r for r in rows) and any("h1 -> h2" in r for r in rows), res.stdout
    assert time.monotonic() - t0 < 40


def test_packet_drop_is_reported_naming_the_host(fleet, cluster_file):
    try:
        fleet_tools.drop_packets("h3", per_mille=1000)
        res = check(fleet, cluster_file)
    finally:
        fleet_tools.clear_faults("h3")
    assert res.returncode == 1, res.stdout + res.stderr
    rows = fail_rows(res.stdout)
    assert rows and all("h3" in r for r in rows), res.stdout
