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


def check_under_fault(fleet, cluster, host: str, fault, clear) -> str:
    """check-network while `fault` afflicts `host`: it fails, and every FAIL row names that host."""
    try:
        fault(host)
        res = check(fleet, cluster)
    finally:
        clear(host)
    assert res.returncode == 1, res.stdout + res.stderr
    rows = fail_rows(res.stdout)
    assert rows and all(host in r for r in rows), res.stdout
    return res.stdout


def test_link_down_is_reported_naming_the_host(fleet, cluster):
    out = check_under_fault(fleet, cluster, "h2", fleet_tools.link_down, fleet_tools.link_up)
    rows = fail_rows(out)
    assert any("controller -> h2" in r for r in rows) and any("h1 -> h2" in r for r in rows), out


def test_packet_drop_is_reported_naming_the_host(fleet, cluster):
    check_under_fault(fleet, cluster, "h3", lambda h: fleet_tools.drop_packets(h, per_mille=1000),
                      fleet_tools.clear_faults)
