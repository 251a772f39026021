"""check-network on the 3-host fleet: healthy, a host cut off, a host dropping every packet."""
from __future__ import annotations

import subprocess

import pytest

import fleet as fleet_tools
from helpers import FLEET_HOSTS, MLX_TRAIN, fleet_env

pytestmark = pytest.mark.fleet


def check(fleet, cluster, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([MLX_TRAIN, "check-network", "--cluster", str(cluster), "--size-mb", "4", *extra],
                          env=fleet_env(fleet), capture_output=True, text=True, timeout=120)


def fail_rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if "FAIL" in line]


def test_healthy_fleet_passes(fleet, cluster):
    res = check(fleet, cluster, "--backend", "mpi")
    assert res.returncode == 0, res.stdout + res.stderr
    for a, b in (("h1", "h2"), ("h1", "h3"), ("h2", "h3")):
        assert f"{a} <-> {b}" in res.stdout
        assert f"{a} -> {b}" in res.stdout and f"{b} -> {a}" in res.stdout  # the mesh, both ways
    for host in FLEET_HOSTS:
        assert f"controller -> {host}" in res.stdout
    assert "GB/s" in res.stdout and "btl_tcp_links=4" in res.stdout and "mpi all_sum" in res.stdout
    assert "mpi4py allreduce" in res.stdout and "mpi4py," in res.stdout
    assert not fail_rows(res.stdout)


def test_link_down_is_reported_naming_the_host(fleet, cluster):
    try:
        fleet_tools.link_down("h2")
        res = check(fleet, cluster)
    finally:
        fleet_tools.link_up("h2")
    assert res.returncode == 1, res.stdout + res.stderr
    rows = fail_rows(res.stdout)
    assert rows and all("h2" in r for r in rows), res.stdout
    assert any("controller -> h2" in r for r in rows) and any("h1 -> h2" in r for r in rows), res.stdout


def test_packet_drop_is_reported_naming_the_host(fleet, cluster):
    try:
        fleet_tools.drop_packets("h3", per_mille=1000)
        res = check(fleet, cluster)
    finally:
        fleet_tools.clear_faults("h3")
    assert res.returncode == 1, res.stdout + res.stderr
    rows = fail_rows(res.stdout)
    assert rows and all("h3" in r for r in rows), res.stdout
