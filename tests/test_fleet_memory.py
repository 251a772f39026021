"""Hosts of unequal memory on the fleet: the issue's 6G, 6G, 2G at a quarter (h1 1.5 GiB, h3 0.5 GiB
through cgroup memory limits, tools/fleet.py `limit`), `configure` recording each host's limit,
and a model and batch that fit h1 but not h3 at an equal share.

The equal split runs out of memory on h3 (the kernel kills its rank inside h3's group; the rank
reported h3's limit as its budget, so the supervisor knows it for memory) and the out-of-memory
ladder relaunches every rank at half the micro-batch. With --optimize-memory each host is planned
by its own memory: h3's rank takes its rows as two micro-batches, h1's as one, nothing runs out
of memory, and every step's loss is the equal split's (1e-6 relative).

Two hosts, two steps: the cheapest run that shows it (a third rank would add time, not a property).
"""
from __future__ import annotations

import subprocess

import pytest

import fleet as fleet_tools  # tools/fleet.py, on sys.path from helpers
import fleet_limits
from helpers import MLX_TRAIN, events, fleet_env, metrics, unavailable
from mlx_train.fleet.hosts import load_cluster, write_cluster

pytestmark = pytest.mark.fleet

M = 2**20
BIG, SMALL = 1536 * M, 512 * M
# 28 rows per rank at 512 tokens: about 0.65 GiB resident (measured), over h3's 0.5 GiB; 14 rows about 0.4 GiB.
MODEL = ["--layers", "2", "--width", "64", "--heads", "2", "--seq-len", "512", "--shard", "none",
         "--batch-size", "28", "--accumulation", "1", "--devices", "2"]


@pytest.fixture(scope="module")
def limited(fleet, tmp_path_factory):
    """h1 and h3 of the session fleet at 1.5 GiB and 0.5 GiB, and the cluster file `configure` writes
    for them then (h1 and h3 only); the limits lifted after the module."""
    try:
        fleet_tools.limit("h1", memory=BIG)
        fleet_tools.limit("h3", memory=SMALL)
    except fleet_limits.LimitsUnavailable as e:
        unavailable(str(e))
    try:
        where = tmp_path_factory.mktemp("memory18")
        full = fleet_tools.configure(fleet, where)
        cluster = load_cluster(str(full))
        two = where / "two.yaml"
        write_cluster(two, [h for h in cluster.hosts if h.name in ("h1", "h3")], cluster.backend)
        yield fleet, full, two
    finally:
        fleet_tools.limit("h1")
        fleet_tools.limit("h3")


def _train(fl, cluster, corpus, run, *extra):
    argv = [MLX_TRAIN, "train", "--cluster", str(cluster), *MODEL, "--data", str(corpus), "--run-dir", str(run),
            "--steps", "2", "--log-every", "1", "--eval-every", "1000", "--checkpoint-every", "1000", "--no-live", *extra]
    res = subprocess.run(argv, env=fleet_env(fl), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_each_host_is_planned_by_its_own_memory_limit(limited, corpus, tmp_path):
    fl, full, two = limited
    # configure probed each host's cgroup, not the machine: h2 has no limit, so the machine's memory.
    memory = {h.name: h.memory for h in load_cluster(str(full)).hosts}
    assert (memory["h1"], memory["h3"]) == (BIG, SMALL) and memory["h2"] > 4 * BIG, memory

    equal, capped = tmp_path / "equal", tmp_path / "capped"
    _train(fl, two, corpus, equal)
    oom = events(equal, "oom")
    assert len(oom) == 1 and oom[0]["rank"] == 1 and oom[0]["code"] == 137, oom  # SIGKILL, relayed by ssh
    # The rank's budget was h3's limit, not the machine's: that is why the kill reads as memory.
    assert oom[0]["evidence"].endswith(f"of a {0.9 * SMALL / M:.0f} MiB budget)"), oom
    (reconf,) = events(equal, "reconfigure")
    assert reconf["new"]["batch_size_per_device"] == 14 and reconf["new"]["gradient_accumulation"] == 2

    res = _train(fl, two, corpus, capped, "--optimize-memory")
    assert "each rank's micro-batch by its own host's (h1 28, h3 14)" in res.stdout, res.stdout[-2000:]
    said = [(capped / "logs" / f"rank-{r}.log").read_text() for r in (0, 1)]
    assert "as micro-batches of 28 (" in said[0] and "as micro-batches of 14, 14 (" in said[1]
    assert not [e for e in events(capped) if e["event"] in ("oom", "restart", "reconfigure")]
    a = list({m["step"]: m for m in metrics(equal)}.values())  # the relaunch logged step 1 again: its own
    b = metrics(capped)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 * abs(x["loss"]), (x["step"], x["loss"], y["loss"])
    # h1's rank, with twice the micro-batch, used more memory; both stayed within their limits.
    assert b[-1]["peak_memory"][0] > b[-1]["peak_memory"][1] and b[-1]["peak_memory"][1] < SMALL, b[-1]["peak_memory"]
