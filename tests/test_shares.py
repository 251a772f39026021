"""Unequal shares of the global batch (--shares): the row split, and runs that make the equal split's updates."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

from helpers import TINY, cli, events, metrics, popen, unavailable
from mlx_train.config import DistributedConfig
from mlx_train.errors import UserError
from mlx_train.rank.balance import Balancer, fill, groups_of, predicted_s, propose, spread
from mlx_train.rank.batcher import Batcher, Share, micro_batch_count, share_of, split_rows


@pytest.mark.parametrize("global_batch, weights", [
    (16, (3, 1)), (16, (1, 1)), (10, (1, 1, 1)), (7, (0.2, 5.0, 1.3)), (5, (1000, 1, 1)), (64, (2.5, 1, 0.5, 4)),
])
def test_rows_sum_to_the_batch_in_proportion(global_batch, weights):
    rows = split_rows(global_batch, weights)
    assert sum(rows) == global_batch and min(rows) >= 1
    spare, total = global_batch - len(weights), sum(weights)
    for r, w in enumerate(weights):
        # One row each, then the rest by weight: off by less than one row from the exact quota.
        assert abs(rows[r] - 1 - spare * w / total) < 1
    assert split_rows(global_batch, weights) == rows  # a pure function of its inputs


def test_rows_round_by_largest_remainder():
    assert split_rows(16, (3, 1)) == [12, 4]          # quotas 10.5 and 3.5: the tie goes to rank 0
    assert split_rows(12, (1, 1, 1, 1, 1)) == [3, 3, 2, 2, 2]
    assert split_rows(9, (2, 1)) == [6, 3]
    assert split_rows(4, (100, 1, 1, 1)) == [1, 1, 1, 1]  # every rank keeps a row
    with pytest.raises(UserError, match="cannot give each of 3 ranks a row"):
        split_rows(2, (1, 1, 1))


def test_a_rank_cuts_its_rows_into_micro_batches_of_at_most_the_batch_size():
    rows = [11, 3, 1]
    assert [share_of(r, rows, 4) for r in range(3)] == [
        Share(0, (4, 4, 3)),
        Share(11, (3,)),
        Share(14, (1,))]
    assert share_of(0, [5], 4).micro == (3, 2)
    # --shard full: every rank as many micro-batches as the rank that needs the most, empty ones last.
    assert micro_batch_count([15, 1], [4, 4]) == 4 and micro_batch_count([8, 8], [8, 2]) == 4
    assert share_of(1, [15, 1], 4, count=4) == Share(15, (1, 0, 0, 0))
    assert share_of(1, [12, 4], 4, count=3) == Share(12, (2, 1, 1))
    assert share_of(0, [12, 4], 4, count=3) == share_of(0, [12, 4], 4)


@pytest.mark.parametrize("weights", [(3, 1), (1, 2, 5)])
def test_the_windows_cover_the_equal_splits_samples_once(weights):
    b = Batcher(np.arange(40_000) % 251, 16, seed=3)
    dist = DistributedConfig(len(weights), 4, 2)
    G = dist.global_batch_size
    rows = split_rows(G, weights)
    for step in (0, 7, 300):  # 300 is past the first epoch
        equal = np.concatenate([b.window_ids(step, m, r, dist) for m in range(2) for r in range(len(weights))])
        unequal = []
        for r in range(len(weights)):
            share = share_of(r, rows, dist.batch_size_per_device)
            got = list(b.window(step, G, share))
            assert [len(x) for x, _ in got] == list(share.micro)
            unequal.extend(int(i) for m, size in enumerate(share.micro)
                           for i in b.ids_at(step, G, share.offset + sum(share.micro[:m]), size))
        assert sorted(unequal) == sorted(int(i) for i in equal) and len(set(unequal)) == G


def test_auto_takes_a_split_only_when_it_pays():
    # rank 1 three times slower: 12 and 4 rows predict a step of 4 row-times against 8.
    assert propose(16, [8, 8], [3.0, 1.0]) == [12, 4]
    assert predicted_s([12, 4], [3.0, 1.0]) == 4.0
    assert propose(16, [12, 4], [3.0, 1.0]) is None          # already there
    assert propose(16, [8, 8], [1.05, 1.0]) is None          # [8, 8] again: nothing to gain
    assert propose(16, [8, 8], [1.2, 1.0]) is None           # [9, 7]: 7.5 against 8, under the 10% asked
    assert propose(16, [8, 8], [1.2, 1.0], gain=0.05) == [9, 7]
    assert propose(16, [8, 8], [1.0, 0.0]) is None           # a rank that measured nothing decides nothing


def test_a_slow_hosts_fixed_update_time_takes_rows_off_it():
    # The bench's fleet (quotas 0.5, 0.5, 0.125): speeds 120, 120, 30 rows/s, and the update, the same
    # work everywhere, 0.02 s on the fast hosts and 0.1 s on the slow one. Split by speed alone,
    # 43/42/11 rows keep the slow host last (0.1 + 11/30 = 0.47 s); minding the fixed part, 44/44/8
    # end together at 0.39 s. Speeds alone see nothing to gain in 43/42/11.
    speeds, fixed = [120.0, 120.0, 30.0], [0.02, 0.02, 0.1]
    assert propose(96, [43, 42, 11], speeds) is None
    assert propose(96, [43, 42, 11], speeds, fixed=fixed) == [44, 44, 8]
    assert round(predicted_s([44, 44, 8], speeds, fixed), 3) == 0.387
    b = Balancer(96, lambda mine: [[0.9, 108.0, 0.06], [0.9, 108.0, 0.06], [1.1, 33.0, 0.3]], every=4, min_steps=3)
    for step in range(1, 5):
        b.observe(0.3, 36, fixed=0.02)
    got = b.after(4, [43, 42, 11])  # 3 steps measured (the first traces): these are sums over them
    assert [round(v, 9) for v in got.speeds] == speeds and [round(f, 9) for f in got.fixed] == fixed
    assert got.chosen == [44, 44, 8]


def test_the_balancer_gathers_at_the_same_steps_on_every_rank():
    gathered = []

    def gather(mine):
        gathered.append(mine)
        return [[1.0, 30.0, 0.0], [3.0, 30.0, 0.0]]  # rank 1 took three times as long for its rows

    b = Balancer(16, gather, every=5, min_steps=3)
    for step in range(1, 5):
        b.observe(0.5, 8)
        assert b.after(step, [8, 8]) is None
    b.observe(0.5, 8)
    got = b.after(5, [8, 8])
    assert got.speeds == [30.0, 10.0] and got.chosen == [12, 4]
    assert gathered == [[2.0, 32.0, 0.0]]  # the first step (tracing) was not measured
    assert b.after(10, [12, 4]) is None  # too few measured steps since: no gather
    assert len(gathered) == 1


def test_auto_re_shares_between_hosts_never_among_one_hosts_ranks():
    # Rank 1 measured three times slower than rank 0: on hosts apart it loses rows, on one host (they
    # share its cores: contention, not hardware) the split stays equal, bit for bit --shares equal.
    everyone = [[1.0, 30.0, 0.0], [3.0, 30.0, 0.01]]
    apart = Balancer(16, lambda mine: everyone, every=5, min_steps=3, hosts=[0, 1])
    together = Balancer(16, lambda mine: everyone, every=5, min_steps=3, hosts=[7, 7])
    for b in (apart, together):
        for step in range(1, 5):
            b.observe(0.5, 8)
    assert apart.after(5, [8, 8]).chosen == [12, 4]
    one = together.after(5, [8, 8])
    # A host: its ranks' summed rows over their summed seconds, its slowest fixed part over the 3 steps measured.
    assert one.chosen is None and one.speeds == [15.0] and one.fixed == [0.01 / 3]
    # Whatever one host's ranks measure, it keeps the equal split (any number of ranks, any gather).
    for n, speed, fixed in ((2, 1.0, 0.0), (3, 50.0, 0.2), (4, 0.3, 1.0)):
        assert propose(8 * n, [8] * n, [speed], fixed=[fixed], hosts=[0] * n) is None
    # Two hosts, the first with two ranks: the fast host's rows split equally between its ranks, the
    # remainder to its lowest rank (a host's step ends with its most loaded rank).
    b = Balancer(24, lambda mine: [[1.0, 30.0, 0.0], [1.2, 30.0, 0.0], [3.0, 30.0, 0.0]], every=5, min_steps=3,
                 hosts=[0, 0, 1])
    for step in range(1, 5):
        b.observe(0.5, 8)
    got = b.after(5, [8, 8, 8])
    assert [round(v, 6) for v in got.speeds] == [27.272727, 10.0] and got.chosen == [10, 10, 4]
    assert fill(25, [10.0, 10.0], [0.0, 0.0], ranks=[2, 1]) == [17, 8]
    assert spread([17, 8], [0, 0, 1]) == [9, 8, 8]
    assert predicted_s([9, 8, 8], [10.0, 10.0], hosts=[0, 0, 1]) == 0.9
    # Hosts by any ids, ordered by their lowest rank; ranks need not be in blocks.
    assert groups_of([5, 2, 5]) == [[0, 2], [1]] and spread([5, 3], [5, 2, 5]) == [3, 3, 2]


def _cgroups():
    import fleet_limits  # tools/fleet_limits.py, on sys.path from helpers

    try:
        return fleet_limits, fleet_limits.detect()
    except fleet_limits.LimitsUnavailable as exc:
        unavailable(f"a rank cannot be slowed by a CPU quota here: {exc}")


def _train_with_slow_rank(run: Path, args: list, rank: int, cpu: float, env: dict = None) -> None:
    """`train` with rank `rank` put under a CPU quota of `cpu` cores (a cgroup, as the test fleet's
    unequal hosts) once the first step is logged: a rank that is really slower, from the first steps on."""
    limits, cg = _cgroups()
    state = run.parent / f"state-{run.name}"
    proc = popen("train", *args, "--run-dir", str(run), env={**os.environ, "MLX_TRAIN_STATE": str(state), **(env or {})})
    group = f"shares-test-{os.getpid()}"
    moved = None
    try:
        deadline = time.monotonic() + 120
        while moved is None and proc.poll() is None and time.monotonic() < deadline:
            records = list((state / "ranks").glob(f"*.rank{rank}.json")) if (state / "ranks").is_dir() else []
            if records and (run / "metrics.jsonl").exists():
                pid = json.loads(records[0].read_text())["pid"]
                moved = cg.origin(pid)
                cg.apply(group, limits.Limits(cpu=cpu), lambda: [pid])
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out
        assert moved is not None, "the rank was never slowed"
    finally:
        if proc.poll() is None:
            proc.kill()
        if moved is not None:
            cg.release(group, moved)


# The two local ranks as two hosts for --shares auto (rank/inject.py): it re-shares between hosts only.
TWO_HOSTS = {"MLX_TRAIN_TEST_HOSTS": "0,1"}
COMMON = [*TINY, "--devices", "2", "--accumulation", "2", "--steps", "20", "--log-every", "1", "--eval-every", "20",
          "--checkpoint-every", "10"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run with equal shares, with 3,1, and with auto while rank 1 is slowed, its two ranks
    taken as two hosts (then resumed from its step-10 checkpoint, and rank 1 killed once more after the
    resumed run's first step: the supervisor's restart from that checkpoint); and the default (auto)
    with rank 1 slowed on its one host, to step 12: one set for the tests below, which compare them."""
    tmp = tmp_path_factory.mktemp("shares")
    out = {name: tmp / name for name in ("equal", "weighted", "full", "auto", "resumed", "default")}
    cli("train", *COMMON, "--shares", "equal", "--run-dir", str(out["equal"]), check=True)
    # rank 0: 12 rows in 3 micro-batches, rank 1: 4 in 1
    cli("train", *COMMON, "--shares", "3,1", "--run-dir", str(out["weighted"]), check=True)
    # Fully sharded (collectives in every micro-batch): rank 0's 14 rows in 4 micro-batches, so rank 1's
    # 2 rows in 4 too, 2 of them empty. A rank short of micro-batches would wait for ever: no restart.
    cli("train", *COMMON, "--shares", "15,1", "--shard", "full", "--max-restarts", "0", "--stall-timeout", "60",
        "--run-dir", str(out["full"]), check=True)
    _train_with_slow_rank(out["auto"], [*COMMON, "--shares", "auto"], rank=1, cpu=0.15, env=TWO_HOSTS)
    _train_with_slow_rank(out["default"], [*COMMON, "--stop-after", "12"], rank=1, cpu=0.15)
    shutil.copytree(out["auto"], out["resumed"])
    shutil.rmtree(out["resumed"] / "checkpoints" / "step-000020")
    _resume_killing_rank_1(out["resumed"])
    assert events(out["resumed"], "resume")[-1]["step"] == 10
    return out


def _resume_killing_rank_1(run: Path) -> None:
    """`train --resume run` (its ranks as two hosts), SIGKILLing rank 1 as soon as the resumed attempt has logged a step."""
    def lines() -> int:
        return (run / "metrics.jsonl").read_text().count("\n")

    logged = lines()
    proc = popen("train", "--resume", str(run), env={**os.environ, **TWO_HOSTS})
    try:
        deadline = time.monotonic() + 120
        while lines() == logged and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        pid = next(r["pid"] for r in events(run, "launch")[-1]["ranks"] if r["rank"] == 1)
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()


def _same_losses(a, b):
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 21))
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 * abs(x["loss"]), (x["step"], x["loss"], y["loss"])
    assert a[-1]["loss"] < a[0]["loss"] - 0.5  # it learned: the comparison is not of two idle runs
    # The replicas stay identical (each applies the same summed gradients).
    assert all(len(set(m["param_checksum"])) == 1 for m in b)


@pytest.mark.multiproc
def test_unequal_shares_make_the_equal_splits_updates(runs):
    equal, weighted = metrics(runs["equal"]), metrics(runs["weighted"])
    _same_losses(equal, weighted)
    assert weighted[-1]["rows"] == [12, 4] and equal[-1]["rows"] == [8, 8]
    # monitor --performance on the real run: each rank's rows, its own compute and wait time, its memory.
    spread = _spread_rows(runs["weighted"])
    assert [row[:2] for row in spread] == [["0", "12"], ["1", "4"]]
    assert all(float(row[2]) > 0 and float(row[3]) >= 0 for row in spread), spread
    last = weighted[-1]  # rank 0's own times are the record's (its means, to the microsecond)
    assert abs(last["rank_compute_s"][0] - last["compute_time_s"]) <= 1e-6


@pytest.mark.multiproc
def test_fully_sharded_unequal_shares_take_equal_micro_batch_counts(runs):
    equal, full = metrics(runs["equal"]), metrics(runs["full"])
    assert [m["step"] for m in full] == list(range(1, 21)) and all(m["rows"] == [14, 2] for m in full)
    assert full[-1]["gathered_bytes"] > 0  # the blocks were gathered: fully sharded
    # Each micro-batch's gradients summed over the ranks before the micro-batches are added up: another
    # order than data parallel's, so within 1e-5, not the bits.
    for x, y in zip(equal, full):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x["step"], x["loss"], y["loss"])
    assert all(len(set(m["param_checksum"])) == 1 for m in full)


def _spread_rows(run_dir) -> list:
    """The body rows of `monitor --performance`'s per-rank spread table, split into cells."""
    from rich.console import Console

    from mlx_train.controller.monitor import spread_table, take_snapshot
    from mlx_train.rundir import RunDir

    console = Console(width=250, record=True)
    console.print(spread_table(take_snapshot(RunDir(run_dir))))
    cells = [line.replace("│", " ").split() for line in console.export_text().splitlines() if line.startswith("│")]
    return [c for c in cells if c and c[0].isdigit()]


@pytest.mark.multiproc
def test_auto_shares_follow_a_slow_rank_with_the_equal_splits_updates(runs):
    equal, auto = metrics(runs["equal"]), metrics(runs["auto"])
    _same_losses(equal, auto)
    assert auto[9]["rows"] == [8, 8]  # equal until the first gather (after step 10)
    # The shares moved to the fast rank, and the checkpoint records those the steps after it use.
    meta = json.loads((runs["auto"] / "checkpoints" / "step-000010" / "manifest.json").read_text())["meta"]
    assert meta["shares"] == "auto" and sum(meta["rows"]) == 16 and meta["rows"][0] > meta["rows"][1], meta["rows"]
    assert auto[10]["rows"] == meta["rows"]
    # Every rank's compute and waiting are reported: the slow rank computed longer, the fast one waited.
    assert all(len(m["rank_compute_s"]) == len(m["rank_wait_s"]) == 2 for m in auto)
    assert sum(m["rank_compute_s"][1] for m in auto[1:10]) > sum(m["rank_compute_s"][0] for m in auto[1:10])
    assert sum(m["rank_wait_s"][0] for m in auto[1:10]) > sum(m["rank_wait_s"][1] for m in auto[1:10])


@pytest.mark.multiproc
def test_the_default_auto_on_one_host_is_the_equal_split_bit_for_bit(runs):
    # Rank 1 under a CPU quota measures far slower, but its host is rank 0's: no re-share at step 10,
    # and every step's loss and parameters are --shares equal's exactly.
    default, equal = metrics(runs["default"]), metrics(runs["equal"])
    assert yaml.safe_load((runs["default"] / "config.yaml").read_text())["dist"]["shares"] == "auto"
    assert [m["step"] for m in default] == list(range(1, 13)) and all(m["rows"] == [8, 8] for m in default)
    assert [(m["loss"], m["param_checksum"]) for m in default] == [(m["loss"], m["param_checksum"]) for m in equal[:12]]
    assert sum(m["rank_compute_s"][1] for m in default[1:10]) > sum(m["rank_compute_s"][0] for m in default[1:10])


@pytest.mark.multiproc
def test_auto_shares_resume_exactly_after_a_rank_is_killed(runs):
    # The resumed run lost rank 1 after its first step; the supervisor restarted it from step 10.
    assert {"rank": 1, "signal": 9} in [{k: e[k] for k in ("rank", "signal") if k in e}
                                         for e in events(runs["resumed"], "rank_exit")]
    assert [e["step"] for e in events(runs["resumed"], "resume")] == [10, 10]
    x = mx.load(str(runs["auto"] / "checkpoints" / "step-000020" / "model.safetensors"))
    y = mx.load(str(runs["resumed"] / "checkpoints" / "step-000020" / "model.safetensors"))
    assert sorted(x) == sorted(y)
    for k in x:
        assert np.array_equal(np.array(x[k]), np.array(y[k])), f"{k} differs after resume"
    assert metrics(runs["resumed"])[-1]["rows"] == metrics(runs["auto"])[-1]["rows"]


def test_monitor_shows_each_ranks_rows(tmp_path):
    from rich.console import Console

    from mlx_train.config import TrainConfig
    from mlx_train.controller.monitor import render, take_snapshot
    from mlx_train.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.prepare(TrainConfig(steps=30), resume=False)
    record = {"step": 10, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 100.0, "step_time_s": 0.1, "comm_time_s": 0.01,
              "compute_time_s": 0.09, "grad_norm": 1.0, "devices": 2, "grad_bytes": 4, "global_batch": 16,
              "peak_memory": [1 << 20, 1 << 20], "param_checksum": [7, 7], "rows": [12, 4], "time": 0.0, "attempt": 1}
    run.append(run.metrics_path, record)
    console = Console(width=200, record=True)
    console.print(render(take_snapshot(run), performance=True))
    lines = [line.replace("│", " ").replace("┃", " ").split() for line in console.export_text().splitlines()]
    assert ["rank", "peak", "memory", "param", "checksum", "rows"] in lines
    assert [(row[0], row[-1]) for row in lines if len(row) == 5 and row[3] == "00000007"] == [("0", "12"), ("1", "4")]


def test_an_elastic_resize_carries_shares_and_caps_by_host(tmp_path):
    """An excluded host takes its weight and cap with it, a re-admitted one gets them back, `auto`
    measures again; the `reshare` event says so and monitor shows it."""
    from dataclasses import replace

    from rich.console import Console

    from mlx_train.config import TrainConfig
    from mlx_train.controller import elastic
    from mlx_train.controller.monitor import render, take_snapshot
    from mlx_train.events import Event
    from mlx_train.fleet.hosts import Host
    from mlx_train.rundir import RunDir

    hosts = [Host(f"h{i}", f"10.0.0.{i}", python="/p", slots=s) for i, s in ((1, 1), (2, 2), (3, 1))]
    cfg = TrainConfig(steps=30)
    cfg = replace(cfg, dist=replace(cfg.dist, num_devices=4, batch_size_per_device=2, gradient_accumulation=3,
                                    shares="4,2,2,1", micro_caps=(8, 4, 4, 2)))
    m = elastic.Membership(hosts, min_devices=1, probe=lambda h: (True, ""))
    m.exclude(hosts[1], "test")  # h2's two ranks leave
    out, fields = m.resplit(cfg, hosts)
    assert out.dist.num_devices == 2 and out.dist.global_batch_size == cfg.dist.global_batch_size
    assert (out.dist.shares, out.dist.micro_caps) == ("4,1", (8, 2))
    assert fields == {"hosts": ["h1", "h3"], "shares": "4,1", "micro_caps": [8, 2],
                      "note": "weights h1 4, h3 1; micro-batch caps h1 8, h3 2"}
    m.readmit(hosts[1])  # h2 back: its weights and caps too, in rank order
    back, _ = m.resplit(out, [hosts[0], hosts[2]])
    assert (back.dist.num_devices, back.dist.shares, back.dist.micro_caps) == (4, "4,2,2,1", (8, 4, 4, 2))
    # auto: equal shares to start, measured again on the new group; equal shares without caps: no event.
    auto = replace(cfg, dist=replace(cfg.dist, shares="auto", micro_caps=None))
    m.exclude(hosts[1], "test")
    out, fields = m.resplit(auto, hosts)
    assert out.dist.shares == "auto" and out.dist.micro_caps is None
    assert fields["note"] == "auto: measured again from equal shares"
    plain = replace(auto, dist=replace(auto.dist, shares="equal"))
    assert m.resplit(plain, hosts)[1] is None
    # A host whose weight was never seen (not in the config it ran under): equal shares, said so.
    m2 = elastic.Membership(hosts[:1], min_devices=1)
    m2.active = [hosts[0], hosts[2]]
    one = replace(cfg, dist=replace(cfg.dist, num_devices=1, batch_size_per_device=2, gradient_accumulation=12,
                                    shares="3", micro_caps=(8,)))
    out, fields = m2.resplit(one, hosts[:1])
    assert (out.dist.shares, out.dist.micro_caps) == ("equal", None) and "not known" in fields["note"]

    run = RunDir(tmp_path / "run")
    run.prepare(cfg, resume=False)
    run.append(run.metrics_path, {"step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 1.0, "step_time_s": 0.1,
                                  "comm_time_s": 0.0, "compute_time_s": 0.1, "grad_norm": 1.0, "devices": 2,
                                  "grad_bytes": 4, "global_batch": 24, "peak_memory": [1, 1],
                                  "param_checksum": [7, 7], "rows": [19, 5], "time": 0.0, "attempt": 2})
    run.event(Event.RESHARE, hosts=["h1", "h3"], shares="4,1", micro_caps=[8, 2],
              note="weights h1 4, h3 1; micro-batch caps h1 8, h3 2")
    console = Console(width=200, record=True)
    console.print(render(take_snapshot(run)))
    assert "reshare   weights h1 4, h3 1; micro-batch caps h1 8, h3 2" in console.export_text()
