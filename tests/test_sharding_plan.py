"""Planning of sharded training state (ZeRO 1-3): the memory per level, the level the planner picks,
the out-of-memory ladder's use of it, and the refusal of a run that fits at no level allowed."""

from dataclasses import replace

import pytest

from helpers import cli
from mlx_train.config import SHARD_LEVELS, DistributedConfig, ModelConfig, Split, TrainConfig, shard_level_of
from mlx_train.controller.launch import local_hosts
from mlx_train.errors import UserError
from mlx_train.planning.memory import LMShape, ModelShape, bytes_per_param, step_memory
from mlx_train.planning.planner import MemoryOptimizer, resolve_shard, split_for

GiB = 2**30
MiB = 2**20
# A model whose state outweighs its activations at a small batch: 8 blocks of width 512, ~25M parameters.
STATEFUL = dict(n_layers=8, d_model=512, n_heads=8, seq_len=64)
STATEFUL_FLAGS = ["--layers", "8", "--width", "512", "--heads", "8", "--seq-len", "64", "--batch-size", "2"]


@pytest.mark.parametrize("n", [1, 2, 8])
def test_bytes_per_parameter_follow_the_zero_formulas(n):
    # Mixed-precision AdamW (ZeRO paper, section 5): bf16 weights and gradients, fp32 master and moments.
    assert bytes_per_param("none", n) == 16
    assert bytes_per_param("optimizer", n) == pytest.approx(4 + 12 / n)
    assert bytes_per_param("gradients", n) == pytest.approx(2 + 14 / n)
    assert bytes_per_param("full", n) == pytest.approx(16 / n)
    # The memory model's own roles (fp32 weights that are the masters, fp32 gradients, AdamW's two
    # moments): its static terms are exactly these, plus the one layer `full` gathers.
    shape = ModelShape(4, 256, 4, 64, 256)
    P = shape.n_params
    for level in SHARD_LEVELS:
        m = step_memory(shape, 1, 1, False, "fp32", num_devices=n, shard=level)
        assert m.parameters + m.gradients + m.optimizer_state - m.gathered == \
            pytest.approx(P * bytes_per_param(level, n, 4, 4, 8), abs=2)
        assert (m.gathered > 0) == (level == "full") and m.shard == level


def test_none_is_todays_model_and_one_device_shards_nothing():
    shape = ModelShape(4, 256, 4, 64, 256)
    for args in [(8, 1, False, "fp32"), (4, 2, True, "bf16")]:
        for n in (1, 2):
            assert step_memory(shape, *args, num_devices=n) == step_memory(shape, *args, num_devices=n, shard="none")
            # On one device the optimizer level's step is data parallel's.
        assert step_memory(shape, *args, num_devices=1, shard="optimizer").peak == step_memory(shape, *args).peak


def test_7b_fits_on_enough_32gb_macs_with_a_level_named():
    plans = {n: MemoryOptimizer.suggest_config(model_size=7e9, num_devices=n, memory_per_device=32 * GiB)
             for n in (1, 2, 8, 16)}
    assert not plans[1].fits and plans[1].shard == "none"  # nothing to shard over on one device
    for n in (8, 16):
        assert plans[n].fits and plans[n].shard != "none", plans[n]
        assert f"shard {plans[n].shard}" in str(plans[n]) and plans[n].split.shard == plans[n].shard
    assert plans[8].breakdown.total <= plans[8].hardware.usable_memory
    small = MemoryOptimizer.suggest_config(model_size=7e9, num_devices=1, memory_per_device=16 * GiB)
    assert not small.fits


@pytest.mark.parametrize("level", SHARD_LEVELS)
def test_memory_per_device_does_not_grow_with_more_devices(level):
    shape = ModelShape.from_model_size(7e9)
    peaks = [step_memory(shape, 1, 4, True, "bf16", num_devices=n, shard=level).peak for n in (2, 4, 8, 16, 64)]
    assert peaks == sorted(peaks, reverse=True)
    if level != "none":
        assert peaks[-1] < peaks[0]
    # The planner's answer at this level for the same global batch (nothing fits: its smallest attempt).
    totals = [MemoryOptimizer.suggest_config(model_size=7e9, num_devices=n, shard=level, global_batch_size=64,
                                             memory_per_device=GiB).breakdown.total for n in (2, 4, 8, 16)]
    assert totals == sorted(totals, reverse=True)


def test_auto_keeps_small_models_unsharded():
    for n in (2, 8):
        auto = MemoryOptimizer.suggest_config(model_size=125e6, num_devices=n, memory_per_device=64 * GiB)
        assert auto.fits and auto.shard == "none"
        none = MemoryOptimizer.suggest_config(model_size=125e6, num_devices=n, memory_per_device=64 * GiB,
                                              shard="none")
        assert (auto.split, auto.breakdown) == (none.split, none.breakdown)
    tiny = TrainConfig(dist=DistributedConfig(num_devices=2, batch_size_per_device=4), memory_budget=GiB)
    assert resolve_shard(tiny, local_hosts(2)) == "none"
    assert split_for(tiny, local_hosts(2)).shard == "none"


def test_full_shards_a_lora_runs_frozen_base_too():
    shape = LMShape(n_layers=16, d_model=2048, n_heads=16, seq_len=512, vocab_size=32000, n_kv_heads=4,
                    head_dim=128, intermediate_size=8192, fine_tune="lora")
    none = step_memory(shape, 1, 1, True, "fp32", num_devices=8)
    optimizer = step_memory(shape, 1, 1, True, "fp32", num_devices=8, shard="optimizer")
    full = step_memory(shape, 1, 1, True, "fp32", num_devices=8, shard="full")
    assert optimizer.parameters >= shape.weight_bytes  # below `full` every rank holds the whole base
    assert full.parameters < shape.weight_bytes / 8 + 2 * shape.frozen_layer_bytes + 4 * shape.trainable
    assert full.peak < none.peak


def test_an_explicit_level_is_kept():
    plan = MemoryOptimizer.suggest_config(model_size=7e9, num_devices=8, memory_per_device=32 * GiB,
                                          shard="optimizer")
    assert plan.shard == "optimizer" and not plan.fits
    cfg = TrainConfig(model=ModelConfig(**STATEFUL), dist=DistributedConfig(2, 2, 1), memory_budget=350 * MiB,
                      shard="none")
    assert resolve_shard(cfg, local_hosts(2)) == "none"
    with pytest.raises(UserError, match="with --shard none: use --shard full or auto"):
        split_for(cfg, local_hosts(2))
    assert split_for(replace(cfg, shard="auto"), local_hosts(2)).shard != "none"
    with pytest.raises(ValueError, match="--shard none was chosen"):
        Split(4, 2, 2, 1, shard="full").apply(cfg)
    # The out-of-memory ladder never raises it either.
    current = replace(cfg, dist=DistributedConfig(2, 8, 1))
    while (current := MemoryOptimizer.suggest_recovery_config(current)) is not None:
        assert shard_level_of(current) == "none"


def test_the_oom_ladder_raises_the_level_before_it_halves_the_batch():
    cfg = TrainConfig(model=ModelConfig(**STATEFUL), dist=DistributedConfig(2, 2, 2))
    seen, current = [], cfg
    while (current := MemoryOptimizer.suggest_recovery_config(current)) is not None:
        assert current.dist.global_batch_size == cfg.dist.global_batch_size
        seen.append((shard_level_of(current), current.dist.batch_size_per_device))
    # On 2 ranks `optimizer` saves under MIN_LEVEL_SAVING of this model's need (4.6%): the ladder
    # passes over it to `gradients` (18%) rather than stopping.
    assert seen[:3] == [("gradients", 2), ("full", 2), ("full", 1)], seen
    # An explicit level asked for with --shard wins over the one resolved before.
    assert shard_level_of(replace(cfg, shard="gradients", shard_level="full")) == "gradients"


def test_a_run_no_allowed_level_holds_is_refused_with_what_would_fit():
    from mlx_train.controller.run import check_fits

    cfg = TrainConfig(model=ModelConfig(**STATEFUL), dist=DistributedConfig(2, 2, 1), memory_budget=350 * MiB)
    check_fits(cfg, local_hosts(2))  # auto: `full` holds it
    with pytest.raises(UserError, match="with --shard none: raise it to at least .*, or use --shard full or a "
                                        r"smaller model \(--layers, --width, --seq-len\)"):
        check_fits(replace(cfg, shard="none"), local_hosts(2))
    # No level holds it on 2 devices, some do on more.
    tight = replace(cfg, memory_budget=200 * MiB)
    with pytest.raises(UserError, match=r"at any shard level: .*use \d+ devices or more with --shard full or a "
                                        "smaller model"):
        check_fits(tight, local_hosts(2))


def test_the_cli_refuses_an_explicit_level_that_does_not_fit_in_one_line(tmp_path):
    proc = cli("train", *STATEFUL_FLAGS, "--devices", "2", "--memory-budget", "350MiB", "--shard", "none",
               "--run-dir", str(tmp_path / "r"), "--no-live")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "use --shard full" in err and "with --shard none" in err, err
    assert not (tmp_path / "r").exists()
