"""Planning per host on unequal hardware (planning/planner.py): owner updates on mixed chips, a host too
slow to help left out, each host's micro-batch by its own memory; and `status`'s speeds. Pure functions."""

from dataclasses import replace

import pytest
from rich.console import Console

from mlx_train.config import DistributedConfig, ModelConfig, TrainConfig
from mlx_train.controller.status import measured_speeds, print_speeds, speed_rows
from mlx_train.fleet.hosts import Host, load_cluster, write_cluster
from mlx_train.planning.planner import (hosts_to_run, per_host_plan, replica_warning, resolve_shard, resplit,
                                        split_for, without_slow_hosts)

GiB = 2**30
SMALL = ModelConfig(n_layers=2, d_model=64, n_heads=2, seq_len=64)


def _hosts(*chips, memory=8 * GiB, cpus=None):
    return [Host(f"h{i + 1}", addr=f"10.0.0.{i + 1}", chip=c, memory=memory, cpus=cpus[i] if cpus else None)
            for i, c in enumerate(chips)]


def _cfg(shard="auto", devices=2, batch=4, model=SMALL, **dist):
    return TrainConfig(model=model, shard=shard,
                       dist=DistributedConfig(num_devices=devices, batch_size_per_device=batch, **dist))


def test_mixed_chips_never_run_pure_data_parallel_unless_asked_with_a_warning():
    same, mixed = _hosts("Apple M2 Max", "Apple M2 Max"), _hosts("Apple M1", "Apple M3 Max")
    assert resolve_shard(_cfg(), same) == "none"  # a small model fits unsharded: today's choice
    assert resolve_shard(_cfg(), mixed) == "optimizer"
    assert split_for(_cfg(), mixed).shard == "optimizer" and split_for(_cfg(), same).shard == "none"
    # A host whose chip configure did not record (an older cluster file) is not taken as different.
    assert resolve_shard(_cfg(), _hosts("Apple M1", None)) == "none"
    # Chosen by hand: kept, with one line.
    assert resolve_shard(_cfg("none"), mixed) == "none"
    line = replica_warning(_cfg("none"), mixed)
    assert line.startswith("warning: --shard none on unequal hardware (Apple M1, Apple M3 Max)") and "\n" not in line
    assert replica_warning(_cfg("none"), same) is None and replica_warning(_cfg("auto"), mixed) is None


def test_a_host_too_slow_to_help_at_equal_shares_is_left_out_with_one_line():
    hosts = _hosts(None, None, None, cpus=[0.5, 0.5, 0.125])
    left = without_slow_hosts(hosts, [0.5, 0.5, 0.125], 12, by_speed=False)
    assert [h.name for h in left.kept] == ["h1", "h2"] and [h.name for h in left.left_out] == ["h3"]
    # Equal shares wait for the slowest: 4 rows at 0.125 against 6 rows at 0.5.
    assert left.all_step_s == 12 / 3 / 0.125 and left.step_s == 12 / 2 / 0.5
    assert left.line.startswith("leaving out h3 (0.125): too slow to help") and "\n" not in left.line
    # Shares by speed: the slow host still adds rows per second, so it stays unless its sync costs more.
    assert not without_slow_hosts(hosts, [0.5, 0.5, 0.125], 12, by_speed=True).left_out
    costly = without_slow_hosts(hosts, [0.5, 0.5, 0.125], 12, by_speed=True, sync_s=lambda n: 5.0 * (n - 1))
    assert [h.name for h in costly.left_out] == ["h3"]
    # A host only a little slower helps; a set whose ranks do not divide the global batch is not a candidate
    # (9 rows: not h1 and h2, so h1 alone, 9 rows at 0.5 against 3 at 0.125).
    assert not without_slow_hosts(hosts, [0.5, 0.5, 0.4], 12, by_speed=False).left_out
    alone = without_slow_hosts(hosts, [0.5, 0.5, 0.125], 9, by_speed=False)
    assert [h.name for h in alone.kept] == ["h1"] and alone.step_s == 9 / 0.5
    # From the cluster file's cores, at equal shares: the run goes on the fast hosts, the same global
    # batch re-split.
    cfg = _cfg(devices=3, batch=4, shares="equal")
    chosen = hosts_to_run(cfg, hosts)
    assert [h.name for h in chosen.kept] == ["h1", "h2"]
    again = resplit(cfg, 2)
    assert again.dist.num_devices == 2 and again.dist.global_batch_size == 12 and again.dist.batch_size_per_device <= 4
    assert not hosts_to_run(_cfg(devices=3), hosts).left_out  # the default, auto: shares by speed
    assert not hosts_to_run(cfg, _hosts(None, None, None)).left_out  # no speeds: nothing to judge by


def test_each_host_gets_the_micro_batch_its_own_memory_holds_within_the_same_global_batch():
    model = ModelConfig(n_layers=8, d_model=512, n_heads=8, seq_len=512)
    cfg = _cfg(devices=3, batch=16, model=model)
    hosts = _hosts(None, None, None)
    hosts = [replace(hosts[0], memory=6 * GiB), replace(hosts[1], memory=6 * GiB), replace(hosts[2], memory=2 * GiB)]
    plans = per_host_plan(cfg, hosts)
    big, small = plans[0], plans[2]
    assert all(p.fits for p in plans) and plans[0] == replace(plans[1], host="h1")
    assert small.batch < big.batch and small.accumulation > big.accumulation
    assert big.rows == small.rows == 16 and small.batch * small.accumulation >= 16 > small.batch * (small.accumulation - 1)
    assert small.peak <= small.budget + 256 * 2**20 and small.budget < big.budget
    # Unequal rows (--shares 3,1,1): each host plans for its own ranks' part.
    weighted = per_host_plan(cfg, hosts, rows=[28, 10, 10])
    assert weighted[0].rows == 28 and weighted[2].rows == 10
    with pytest.raises(ValueError):
        per_host_plan(cfg, hosts, rows=[16, 16, 15])


def test_status_shows_each_hosts_measured_speed(tmp_path, monkeypatch):
    launch = {"ranks": [{"rank": 0, "host": "h1"}, {"rank": 1, "host": "h2"}, {"rank": 2, "host": "h2"}]}
    metrics = [{"step": 10, "rows": [4, 4, 4], "rank_compute_s": [0.5, 1.0, 2.0]}, {"step": 20}]
    assert measured_speeds(launch, metrics) == {"h1": 8.0, "h2": 3.0}
    assert measured_speeds(launch, [{"step": 10, "rows": [4, 4, 4]}]) == {}
    hosts = [replace(h, speed=s) for h, s in zip(_hosts("Apple M1", "Apple M3", cpus=[8, 0.5]), (None, 12.5))]
    assert speed_rows(hosts, {"h1": 8.0}) == [("h1", "8", "-", "8.0"), ("h2", "0.5", "12.5", "-")]
    # The cluster file keeps the chip and the speed; status prints them.
    path = tmp_path / "cluster.yaml"
    write_cluster(path, hosts, "ring")
    assert [(h.chip, h.speed) for h in load_cluster(str(path)).hosts] == [("Apple M1", None), ("Apple M3", 12.5)]
    monkeypatch.chdir(tmp_path)  # no runs/ here: the file's speeds alone
    console = Console(record=True, width=200)
    print_speeds(console, str(path), [])
    text = console.export_text()
    assert "host speeds" in text and "12.5" in text
