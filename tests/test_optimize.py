"""`mlx-train optimize` runs real trials and writes a config `train --config` accepts."""

import pytest
import yaml

from helpers import cli, events

pytestmark = pytest.mark.multiproc


def test_optimize_writes_a_usable_config(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model: {n_layers: 2, d_model: 64, n_heads: 2, seq_len: 64}\ndist: {batch_size_per_device: 8}\n")
    best = tmp_path / "best.yaml"
    out = cli("optimize", "--devices", "2", "--config", str(base), "--output", str(best), "--trial-steps", "4",
              check=True, timeout=600).stdout
    assert "trials, fastest first" in out and "best:" in out
    chosen = yaml.safe_load(best.read_text())
    d = chosen["dist"]
    # A pipeline's devices are stages x replicas: only the replicas multiply the batch (its 2-stage
    # row wins on a loaded machine now and then).
    replicas = d["num_devices"] // d.get("pipeline_stages", 1)
    assert replicas * d["batch_size_per_device"] * d["gradient_accumulation"] == 16, "global batch changed"
    run = tmp_path / "tuned"
    cli("train", "--config", str(best), "--steps", "3", "--run-dir", str(run), "--no-live", check=True)
    assert events(run, "launch")[0]["batch_size_per_device"] == d["batch_size_per_device"]


def test_optimize_skips_what_the_planner_says_cannot_fit(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model: {n_layers: 2, d_model: 64, n_heads: 2, seq_len: 64}\ndist: {batch_size_per_device: 64}\n")
    out = cli("optimize", "--config", str(base), "--output", str(tmp_path / "b.yaml"), "--trial-steps", "3",
              "--memory-budget", "12MiB", check=True, timeout=600).stdout
    assert "skipped (predicted over budget)" in out
    assert yaml.safe_load((tmp_path / "b.yaml").read_text())["dist"]["batch_size_per_device"] < 64


def test_optimize_tries_each_setting_at_the_least_shard_level_that_fits():
    """`--shard auto`: a setting is a candidate at the least level the planner fits in the budget, so a
    micro-batch that only fits sharded competes with the rest; an explicit level is the only one tried.
    No trial is run (measure is a stand-in): the tuner's choice of candidates is what is tested."""
    from dataclasses import replace

    from mlx_train.config import SHARD_LEVELS, DistributedConfig, ModelConfig, Split, TrainConfig, shard_level_of
    from mlx_train.planning.planner import MemoryOptimizer
    from mlx_train.planning.tuner import Tuner

    # ~25M parameters: the optimizer update outweighs the activations, so levels matter at every batch.
    base = TrainConfig(model=ModelConfig(n_layers=8, d_model=512, n_heads=8, seq_len=64), dist=DistributedConfig(2, 8, 1))
    budget = 650 * 2**20  # under data parallel's and ZeRO-1's need at every batch, over ZeRO-2's (718, 582 MiB)

    def least(split):
        return next((lv for lv in SHARD_LEVELS
                     if MemoryOptimizer.estimate(replace(split, shard=lv).apply(base)) <= budget), None)

    ran = []

    def measure(t, cfg):
        ran.append((t.split, shard_level_of(cfg)))
        t.status, t.tokens_per_s, t.compute_s, t.comm_s, t.peak = "ok", 100.0 * t.split.batch, 1 / t.split.batch, 0.01, 1

    tuner = Tuner(base, budget, 3, False, measure)
    tuner.stage_candidates = lambda: []  # the pipeline's rows: the next test's
    best = tuner.run()
    assert ran and all(level == split.shard == least(split) for split, level in ran), ran
    assert {level for _, level in ran} == {"gradients"}  # not full: the least level that fits
    assert (best.split.batch, best.split.shard) == (8, "gradients")
    assert shard_level_of(best.apply(base)) == "gradients"
    # Data parallel chosen: nothing fits the budget, nothing runs.
    ran.clear()
    explicit = Tuner(replace(base, shard="none"), budget, 3, False, measure)
    explicit.stage_candidates = lambda: []
    assert explicit.run() is None and not ran
    assert {t.status for t in explicit.trials} == {"skipped (predicted over budget)"}
    assert all(t.split.shard == "none" for t in explicit.trials)


def test_optimize_tries_a_row_per_number_of_stages_fitted_by_the_stage_memory_model():
    """With the built-in GPT on several devices each number of pipeline stages that divides them is a
    trial (a row per S), judged by the per-stage memory model: a budget under data parallel's and
    ZeRO's need at every micro-batch but over one stage's runs only the 2-stage trial, and the
    config written is pipelined. No trial is run (measure is a stand-in)."""
    from dataclasses import replace

    from mlx_train.config import DistributedConfig, ModelConfig, TrainConfig
    from mlx_train.planning.memory import ModelShape
    from mlx_train.planning.stages import stage_memory
    from mlx_train.planning.tuner import Tuner

    model = ModelConfig(n_layers=8, d_model=512, n_heads=8, seq_len=64)
    base = TrainConfig(model=model, dist=DistributedConfig(2, 1, 8), shard="none")
    shape = ModelShape.from_config(model)
    budget = max(stage_memory(shape, 2, s, 1, 8).peak for s in range(2)) + 1
    ran = []

    def measure(t, cfg):
        ran.append(cfg.dist.pipeline_stages)
        t.status, t.tokens_per_s, t.compute_s, t.comm_s, t.peak = "ok", 100.0, 1.0, 0.01, 1

    tuner = Tuner(base, budget, 3, False, measure)
    best = tuner.run()
    assert ran == [2], ran  # every data-parallel setting predicted over budget, none ran
    assert best.split.stages == 2 and (best.split.batch, best.split.accumulation) == (1, 16)
    out = best.apply(base)
    assert out.dist.pipeline_stages == 2 and out.dist.global_batch_size == base.dist.global_batch_size == 16
    # Over every stage's need as well: the stage row is listed, not run.
    ran.clear()
    tight = Tuner(replace(base, memory_budget=None), budget // 4, 3, False, measure)
    assert tight.run() is None and not ran
    assert [t.split.stages for t in tight.trials if t.split.stages > 1] == [2]
