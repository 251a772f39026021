"""Training across the 3-host fleet, one rank per host, on both backends; configure's facts."""
from __future__ import annotations

import json

import pytest
import yaml

from helpers import FLEET_HOSTS, NODE_PYTHON, assert_ranks_gone, events, metrics, rank_pids, train_on_fleet

pytestmark = pytest.mark.fleet


@pytest.mark.parametrize("backend", ["ring", "mpi"])
def test_run_finishes_one_rank_per_host(fleet, cluster, corpus, tmp_path, backend):
    run = tmp_path / "run"
    res = train_on_fleet(fleet, cluster, corpus, run, "--steps", "20", "--backend", backend)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ev = events(run)
    assert ev[-1]["event"] == "finish"
    launch = events(run, "launch")[0]
    assert launch["backend"] == backend
    assert [r["host"] for r in launch["ranks"]] == FLEET_HOSTS
    ms = metrics(run)
    assert ms and all(m["devices"] == len(FLEET_HOSTS) for m in ms)
    assert all(len(set(m["param_checksum"])) == 1 and len(m["param_checksum"]) == len(FLEET_HOSTS) for m in ms)
    for rank, host in enumerate(FLEET_HOSTS):
        hello = next(json.loads(line.split(" ", 1)[1]) for line in (run / "logs" / f"rank-{rank}.log").read_text().splitlines()
                     if line.startswith("@mlx-train ") and '"hello"' in line)
        assert hello["host"] == host and hello["python"] == NODE_PYTHON
    assert (run / "checkpoints").is_dir()
    assert_ranks_gone(rank_pids(run))


def test_distributed_defaults_to_the_provisioned_backend(fleet, cluster, corpus, tmp_path):
    # The fleet is provisioned for ring (node.yml); a cluster file recording mpi makes mpi the default.
    data = yaml.safe_load(cluster.read_text())
    assert data["backend"] == "ring"
    mpi_cluster = tmp_path / "cluster.yaml"
    mpi_cluster.write_text(yaml.safe_dump({**data, "backend": "mpi"}, sort_keys=False))
    run = tmp_path / "run"
    res = train_on_fleet(fleet, mpi_cluster, corpus, run, "--steps", "3")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert events(run, "launch")[0]["backend"] == "mpi"


def test_configure_records_each_hosts_facts(fleet, cluster):
    from mlx_train.config import TrainConfig
    from mlx_train.fleet.hosts import load_cluster
    from mlx_train.rank.device import rank_budget_for

    data = yaml.safe_load(cluster.read_text())
    hosts = data["hosts"]
    assert data["backend"] == "ring"  # what provisioning wrote in each node's node.yml
    assert [h["name"] for h in hosts] == FLEET_HOSTS
    assert [h["addr"] for h in hosts] == [fleet.host(n).ip for n in FLEET_HOSTS]
    assert all(h["iface"] == "eth0" and h["python"] == NODE_PYTHON and h["slots"] == 1 for h in hosts)
    assert all(h["memory"] > 2**30 for h in hosts)
    parsed = load_cluster(str(cluster))
    assert parsed.backend == "ring" and [(h.name, h.iface) for h in parsed.hosts] == [(n, "eth0") for n in FLEET_HOSTS]
    # The memory planner's device memory for remote hosts comes from these facts.
    assert rank_budget_for(TrainConfig(), parsed.hosts) == int(min(h["memory"] for h in hosts) * 0.9)
