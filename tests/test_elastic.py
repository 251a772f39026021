"""Elastic membership without a fleet: who is excluded, when an excluded host is probed again
(a hand clock, a scripted probe), and that a re-split keeps the global batch and plans the model
as it trains (a LoRA run as LoRA)."""

from dataclasses import replace

import pytest

from helpers import wait_for
from mlx_train.config import DistributedConfig, FineTuneConfig, ModelConfig, TrainConfig
from mlx_train.controller import elastic
from mlx_train.fleet.hosts import Host


def _hosts():
    return [Host(f"h{i}", f"10.0.0.{i}", python="/usr/bin/python3", slots=1) for i in (1, 2, 3)]


class _Clock:
    t = 0.0

    def __call__(self):
        return self.t


def test_a_host_is_blamed_out_after_failures_in_a_row_and_never_below_the_minimum():
    m = elastic.Membership(_hosts(), min_devices=2)
    assert m.blame("h3") is None and m.blame("h2") is None  # not in a row
    assert m.blame("h2") == "ended 2 attempts in a row"
    h2 = m.active[1]
    assert m.can_exclude(h2)
    m.exclude(h2, "test")
    assert [h.name for h in m.active] == ["h1", "h3"] and m.devices() == 2
    assert not m.can_exclude(m.active[0])
    m.progressed()
    assert m.blame("h3") is None


def test_excluded_host_is_probed_with_a_growing_cooldown_and_readmitted_in_order():
    clock, answers = _Clock(), []
    m = elastic.Membership(_hosts(), min_devices=1, max_devices=3, probe=lambda h: answers.pop(0), clock=clock)
    m.exclude(m.active[0], "unreachable")
    m.tick()
    assert m.readmittable() == []  # cooldown not over: not probed
    for wait, answer in ((elastic.COOLDOWN_S, (False, "down")), (2 * elastic.COOLDOWN_S, (True, ""))):
        clock.t += wait
        answers.append(answer)
        m.tick()
        wait_for(lambda: not m.out["h1"].probing, 10, "the probe's thread", every=0.01)
    assert [h.name for h in m.readmittable()] == ["h1"]
    m.readmit(m.readmittable()[0])
    assert [h.name for h in m.active] == ["h1", "h2", "h3"] and not m.out


def test_max_devices_bounds_readmission():
    m = elastic.Membership(_hosts(), min_devices=1, max_devices=2, probe=lambda h: (True, ""))
    m.exclude(m.active[2], "x")
    m.out["h3"].healthy = True
    assert m.readmittable() == []


def test_resplit_keeps_the_global_batch():
    cfg = TrainConfig()
    cfg = replace(cfg, dist=replace(cfg.dist, num_devices=3, batch_size_per_device=4))
    new = elastic.resplit(cfg, _hosts()[:2])
    assert new.dist.num_devices == 2 and new.dist.global_batch_size == 12
    assert new.precision == cfg.precision and new.grad_checkpoint == cfg.grad_checkpoint


@pytest.mark.parametrize("mode", ["lora", "dora"])
def test_resplit_plans_an_adapter_run_as_its_adapters_train(tiny_model, mode):
    """After a host leaves, a LoRA/DoRA run is re-planned with its frozen base and few trainable weights:
    a budget that holds the adapters' step at 16 per device (but not a full fine-tune's) keeps 16."""
    from mlx_train.planning.memory import RUNTIME_OVERHEAD
    from mlx_train.planning.planner import SPLIT_SAFETY, MemoryOptimizer, split_for

    def cfg(fine_tune, devices, batch, budget=None):
        return TrainConfig(model=ModelConfig(name=str(tiny_model), seq_len=64), fine_tune=FineTuneConfig(fine_tune),
                           dist=DistributedConfig(devices, batch, 1), memory_budget=budget)

    def need(c):  # the budget at which split_for's plan for `c` just fits
        return int(MemoryOptimizer.breakdown(c).total / SPLIT_SAFETY) - RUNTIME_OVERHEAD + 1

    budget = need(cfg(mode, 2, 16))
    assert need(cfg("full", 2, 16)) > budget, "the test needs a budget that only the adapters' step fits"
    run = cfg(mode, 4, 8, budget)  # global batch 32 over 4 devices, then 2
    plan = split_for(run, _hosts()[:2], keep_mode=True)
    assert plan.model.fine_tune == mode and plan.fits
    new = elastic.resplit(run, _hosts()[:2])
    assert (new.dist.num_devices, new.dist.batch_size_per_device, new.dist.gradient_accumulation) == (2, 16, 1)
    assert new.fine_tune.mode == mode and new.dist.global_batch_size == 32
