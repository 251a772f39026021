"""Hosts of unequal memory under --optimize-memory: each rank's micro-batch is what its own host holds
(DistributedConfig.micro_caps), the accumulation making up its rows, and the run makes the equal split's
updates. The planner's answer for two hosts, then real 2-rank runs of it against the equal split."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import yaml

from helpers import cli, events, metrics
from mlx_train.config import DistributedConfig, ModelConfig, Split, TrainConfig
from mlx_train.controller.run import plan_for_budget
from mlx_train.fleet.hosts import Host
from mlx_train.planning.memory import RUNTIME_OVERHEAD, step_memory
from mlx_train.planning.planner import SPLIT_SAFETY, micro_caps_for, model_shape
from mlx_train.rank.device import BUDGET_FRACTION

GiB = 2**30
BASE = TrainConfig(model=ModelConfig(n_layers=2, d_model=64, n_heads=2, seq_len=64), shard="none", steps=6,
                   log_every=1, eval_every=6, checkpoint_every=6,
                   dist=DistributedConfig(num_devices=2, batch_size_per_device=4, gradient_accumulation=2))


def _memory_holding(batch: int, count: int, more_batch: int, more_count: int) -> int:
    """Host memory whose rank budget holds a rank's step at `batch` x `count` but not at the next
    larger micro-batch (`more_batch` x `more_count`), as the planner judges it."""
    shape = model_shape(BASE.model)
    fits, not_ = (step_memory(shape, b, c, num_devices=2).total for b, c in ((batch, count), (more_batch, more_count)))
    assert fits < not_
    usable = (fits + not_) / 2
    return int((usable / SPLIT_SAFETY - RUNTIME_OVERHEAD) / BUDGET_FRACTION)


def _hosts(small: int) -> list:
    return [Host("big", "10.0.0.1", memory=4 * GiB), Host("small", "10.0.0.2", memory=small)]


def test_the_planner_caps_each_ranks_micro_batch_by_its_own_hosts_memory(tmp_path):
    small = _memory_holding(2, 4, 3, 3)  # 8 rows: 4 micro-batches of 2 fit, 3 of 3 do not
    planned = plan_for_budget(BASE, _hosts(small))
    # The split is the tightest host's; the big host's rank takes its 8 rows at once.
    assert Split.of(planned) == Split(16, 2, 2, 4, False, "fp32", "none")
    assert planned.dist.micro_caps == (8, 2) and planned.dist.global_batch_size == BASE.dist.global_batch_size
    # Hosts alike, or one budget for every rank: no caps, today's config exactly.
    alike = plan_for_budget(BASE, [Host("a", "1", memory=small), Host("b", "2", memory=small)])
    assert alike.dist.micro_caps is None and "micro_caps" not in alike.to_dict()["dist"]
    assert micro_caps_for(replace(BASE, memory_budget=GiB), _hosts(small)) is None
    # Recorded in config.yaml and read back; a re-split alone (the out-of-memory ladder) drops them.
    planned.to_yaml(tmp_path / "config.yaml")
    assert TrainConfig.from_yaml(tmp_path / "config.yaml", complete=True) == planned
    assert Split.of(planned).apply(planned).dist.micro_caps is None
    with pytest.raises(ValueError, match="one micro-batch per device"):
        DistributedConfig(num_devices=2, micro_caps=(4,))
    with pytest.raises(ValueError, match="micro_caps must be a positive integer"):
        DistributedConfig(num_devices=2, micro_caps=(4, 0))


@pytest.mark.multiproc
def test_a_small_host_takes_smaller_micro_batches_with_the_equal_splits_losses(tmp_path):
    planned = plan_for_budget(BASE, _hosts(_memory_holding(2, 4, 3, 3)))
    assert planned.dist.micro_caps == (8, 2)
    runs = {}
    for name, cfg in (("equal", BASE), ("capped", planned)):
        path = tmp_path / f"{name}.yaml"
        cfg.to_yaml(path)
        runs[name] = tmp_path / name
        cli("train", "--config", str(path), "--run-dir", str(runs[name]), check=True)
    run = runs["capped"]
    recorded = yaml.safe_load((run / "config.yaml").read_text())["dist"]
    assert recorded["micro_caps"] == [8, 2] and recorded["batch_size_per_device"] == 2
    assert "micro_caps" not in yaml.safe_load((runs["equal"] / "config.yaml").read_text())["dist"]  # as before
    # Each rank cut its 8 rows by its own cap: one micro-batch on the big host, four on the small one.
    said = [re.search(r"as micro-batches of ([\d, ]+) \(", (run / "logs" / f"rank-{r}.log").read_text()).group(1)
            for r in (0, 1)]
    assert said == ["8", "2, 2, 2, 2"]
    capped, equal = metrics(run), metrics(runs["equal"])
    # The small rank's smaller micro-batch is seen in its measured peak; nothing passed its budget.
    assert capped[-1]["peak_memory"][1] < capped[-1]["peak_memory"][0], capped[-1]["peak_memory"]
    assert not [e for e in events(run) if "oom" in e["event"] or "memory" in e["event"]]
    assert [m["step"] for m in capped] == [m["step"] for m in equal] == list(range(1, 7))
    for x, y in zip(equal, capped):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 * abs(x["loss"]), (x["step"], x["loss"], y["loss"])
    assert all(len(set(m["param_checksum"])) == 1 for m in capped)


def test_a_rank_on_a_limited_host_budgets_for_its_cgroups_limit(tmp_path):
    """A rank's own budget (rank/device.py) is within its cgroup's memory limit, the tightest of its
    group's and its ancestors', as `configure` records the host: past it the kernel kills the rank."""
    from mlx_train.rank.device import cgroup_memory_limit

    def tree(files: dict, cgroup: str):
        for rel, text in files.items():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_text(text)
        (tmp_path / "cgroup").write_text(cgroup)
        return cgroup_memory_limit(str(tmp_path / "cgroup"), str(tmp_path / "fs"))

    unlimited = "9223372036854771712"
    assert tree({"fs/memory/memory.limit_in_bytes": unlimited, "fs/memory/mlxfleet/memory.limit_in_bytes": unlimited,
                 "fs/memory/mlxfleet/h3/memory.limit_in_bytes": str(512 << 20)},
                "5:memory:/mlxfleet/h3\n1:cpu,cpuacct:/\n0::/\n") == 512 << 20
    assert tree({"fs/memory.max": "max", "fs/a/memory.max": str(2 * GiB), "fs/a/b/memory.max": "max"},
                "0::/a/b\n") == 2 * GiB
    assert tree({}, "0::/nowhere\n") is None and cgroup_memory_limit(str(tmp_path / "none")) is None
