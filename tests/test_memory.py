"""The memory planner: its contract (the guide's call), its planning rules, recovery, and its
accuracy against MLX's measured peak on a few grid points."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from mlx_train.config import DistributedConfig, ModelConfig, Split, TrainConfig, shard_level_of
from mlx_train.planning.memory import RUNTIME_OVERHEAD, ModelShape, step_memory
from mlx_train.planning.planner import MemoryOptimizer
from mlx_train.rank.device import device_memory

GiB = 1024 ** 3
SMALL = dict(n_layers=4, d_model=256, n_heads=4, seq_len=256, vocab_size=256)
# Activations dominate even at batch 1, so each memory saving shows.
LONG = dict(n_layers=4, d_model=128, n_heads=4, seq_len=1024, vocab_size=256)


def _load_bench(name: str):
    # bench/ is a folder of scripts, not a package: load the one that holds the measurement by path.
    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench():
    return _load_bench("memory_accuracy")


def test_guide_call_reads_as_dict_and_attributes():
    config = MemoryOptimizer.suggest_config(model_size=1e9, num_devices=2)
    for key in ("suggested_batch_size", "gradient_accumulation", "activation_checkpointing", "precision", "fits"):
        assert config[key] == getattr(config, key)
    assert config["hardware"]["memory_per_device"] == device_memory()[0] > 0
    assert config["precision"] in ("fp32", "bf16")
    assert isinstance(config["fits"], bool)
    breakdown = config["breakdown"]
    for key in ("parameters", "gradients", "optimizer_state", "activations", "runtime_overhead", "peak", "total"):
        assert isinstance(breakdown[key], int) and breakdown[key] >= 0
    # fp32 master weights of 1e9 parameters, whole, or their half when the plan shards the weights.
    assert breakdown["parameters"] >= 4 * 10 ** 9 // (2 if config.shard == "full" else 1)
    assert any("2048" in a and "32000" in a for a in config["assumptions"])
    assert config.to_dict()["hardware"]["memory_per_device"] == config.hardware.memory_per_device


def test_model_size_only_derives_a_matching_shape():
    for n in (125e6, 1e9, 7e9):
        shape = ModelShape.from_model_size(n)
        assert abs(shape.n_params - n) / n < 0.15
        assert shape.d_model % shape.n_heads == 0


def test_plan_converts_to_distributed_and_train_config():
    plan = MemoryOptimizer.suggest_config(num_devices=2, global_batch_size=32, memory_per_device=4 * GiB, **SMALL)
    dist = plan.to_distributed_config()
    assert isinstance(dist, DistributedConfig)
    assert (dist.num_devices, dist.batch_size_per_device, dist.gradient_accumulation) == (
        2, plan.suggested_batch_size, plan.gradient_accumulation)
    assert dist.global_batch_size == 32
    cfg = plan.apply_to(TrainConfig(model=ModelConfig(**SMALL)))
    assert cfg.dist.global_batch_size == 32 and cfg.precision == plan.precision
    assert Split.of(cfg) == plan.split and plan.split.global_batch == 32
    assert MemoryOptimizer.estimate(cfg) == plan.breakdown.peak


def test_largest_batch_that_fits_keeps_the_global_batch():
    budget = 1 * GiB
    plan = MemoryOptimizer.suggest_config(num_devices=2, global_batch_size=64, memory_per_device=budget, **SMALL)
    assert plan.fits and not plan.activation_checkpointing and plan.precision == "fp32"
    assert plan.suggested_batch_size * plan.gradient_accumulation * 2 == 64
    assert plan.breakdown.total <= plan.hardware.usable_memory
    bigger = step_memory(ModelShape(**SMALL), plan.suggested_batch_size * 2, 1)
    assert bigger.total > plan.hardware.usable_memory


def test_more_devices_checkpointing_and_bf16_lower_the_per_device_need():
    shape = ModelShape(**SMALL)
    roomy = dict(memory_per_device=64 * GiB, global_batch_size=32, **SMALL)
    one = MemoryOptimizer.suggest_config(num_devices=1, **roomy)
    four = MemoryOptimizer.suggest_config(num_devices=4, **roomy)
    assert four.breakdown.peak < one.breakdown.peak
    plain = step_memory(shape, 16)
    assert step_memory(shape, 16, checkpointing=True).peak < plain.peak
    assert step_memory(shape, 16, precision="bf16").peak < plain.peak


def test_checkpointing_comes_before_bf16_and_only_when_needed():
    shape = ModelShape(**LONG)
    no_ckpt = step_memory(shape, 1, 8).total  # batch 1, accumulation 8: global batch 8
    ckpt = step_memory(shape, 1, 8, checkpointing=True).total
    bf16_ckpt = step_memory(shape, 1, 8, checkpointing=True, precision="bf16").total
    assert bf16_ckpt < ckpt < no_ckpt

    def plan_for(total):
        return MemoryOptimizer.suggest_config(memory_per_device=total / 0.85 + 100, global_batch_size=8, **LONG)

    assert not plan_for(no_ckpt).activation_checkpointing
    between = plan_for((ckpt + no_ckpt) / 2)
    assert between.fits and between.activation_checkpointing and between.precision == "fp32"
    last = plan_for(bf16_ckpt)
    assert last.fits and last.activation_checkpointing and last.precision == "bf16"
    forced = MemoryOptimizer.suggest_config(memory_per_device=64 * GiB, activation_checkpointing=True,
                                            precision="bf16", **LONG)
    assert forced.activation_checkpointing and forced.precision == "bf16"


def test_tiny_budget_gives_fits_false_with_the_closest_attempt():
    plan = MemoryOptimizer.suggest_config(model_size=1e9, num_devices=2, memory_per_device=1 * GiB, global_batch_size=8)
    assert plan.fits is False and plan["fits"] is False
    assert plan.suggested_batch_size == 1 and plan.gradient_accumulation == 4
    assert plan.breakdown.total > plan.hardware.usable_memory


def test_the_plan_line_states_the_need_it_compares_with_the_memory():
    """A step whose MLX peak is under the usable memory while peak + runtime is over it does not fit,
    and its one line says the number that decided it (it used to show only the peak, under the
    usable memory, beside "does not fit")."""
    ask = dict(model_size=1e8, num_devices=1, global_batch_size=1, precision="fp32", activation_checkpointing=True,
               safety_fraction=1.0)
    mem = MemoryOptimizer.suggest_config(**ask, memory_per_device=64 * GiB).breakdown
    plan = MemoryOptimizer.suggest_config(**ask, memory_per_device=(mem.peak + mem.total) // 2)
    assert mem.peak < plan.hardware.usable_memory < mem.total and not plan.fits
    line = str(plan)
    assert line.startswith("does not fit") and f"needs {mem.total / 2**20:.0f} of " in line, line
    assert f"peak {mem.peak / 2**20:.0f} MiB" in line and "outside MLX" in line, line


def test_recovery_steps_down_keeping_the_global_batch_and_ends_with_none():
    cfg = TrainConfig(dist=DistributedConfig(num_devices=2, batch_size_per_device=8, gradient_accumulation=1))
    seen = []
    current = cfg
    while (nxt := MemoryOptimizer.suggest_recovery_config(current)) is not None:
        assert isinstance(nxt, TrainConfig)
        assert nxt.dist.global_batch_size == cfg.dist.global_batch_size
        seen.append((nxt.dist.batch_size_per_device, nxt.dist.gradient_accumulation, nxt.grad_checkpoint, nxt.precision,
                     shard_level_of(nxt)))
        current = nxt
    # The small default model's activations outweigh its state: the batch first, then, once the
    # steps run out, the least level that saves 5% (`optimizer` and `gradients` save less here).
    assert seen == [(4, 2, False, "fp32", "none"), (2, 4, False, "fp32", "none"), (1, 8, False, "fp32", "none"),
                    (1, 8, True, "fp32", "none"), (1, 8, True, "bf16", "none"), (1, 8, True, "bf16", "full")]
    assert cfg.dist.batch_size_per_device == 8  # the input is not modified


def test_recovery_takes_dicts_and_dataclasses():
    step = MemoryOptimizer.suggest_recovery_config
    assert step({"batch_size_per_device": 6, "gradient_accumulation": 2, "grad_checkpoint": False,
                 "precision": "fp32", "num_devices": 3}) == {
        "batch_size_per_device": 3, "gradient_accumulation": 4, "grad_checkpoint": False,
        "precision": "fp32", "num_devices": 3}
    assert step({"batch_size_per_device": 1, "gradient_accumulation": 4, "activation_checkpointing": True,
                 "precision": "fp32"})["precision"] == "bf16"
    assert step(DistributedConfig(batch_size_per_device=2)) == DistributedConfig(batch_size_per_device=1,
                                                                                 gradient_accumulation=2)
    assert step(DistributedConfig(batch_size_per_device=1)) is None


@pytest.mark.parametrize("kwargs, words", [
    (dict(model_size=-1), "model_size"),
    (dict(model_size=1e9, num_devices=0), "num_devices"),
    (dict(model_size=1e9, precision="fp16"), "precision"),
    (dict(model_size=1e9, optimizer="lion"), "optimizer"),
    (dict(model_size=1e9, num_devices=4, global_batch_size=10), "divisible"),
    (dict(model_size=1e9, memory_per_device=0), "memory_per_device"),
    (dict(model_size=1e9, safety_fraction=1.5), "safety_fraction"),
    (dict(n_layers=2, d_model=100, n_heads=3), "divisible by n_heads"),
    (dict(d_model=128), "n_layers"),
    (dict(), "model_size"),
])
def test_bad_inputs_raise_value_error(kwargs, words):
    with pytest.raises(ValueError, match=words):
        MemoryOptimizer.suggest_config(**kwargs)


def test_bad_recovery_inputs_raise_value_error():
    with pytest.raises(ValueError, match="per-device batch"):
        MemoryOptimizer.suggest_recovery_config({"precision": "fp32"})
    with pytest.raises(ValueError, match="TrainConfig"):
        MemoryOptimizer.suggest_recovery_config(8)


def test_estimate_grows_with_batch_and_total_adds_runtime():
    base = TrainConfig(model=ModelConfig(**SMALL))
    small = MemoryOptimizer.estimate(base)
    big = MemoryOptimizer.estimate(dataclasses.replace(base, dist=DistributedConfig(batch_size_per_device=32)))
    assert 0 < small < big
    assert MemoryOptimizer.breakdown(base).total == small + RUNTIME_OVERHEAD


def test_prediction_within_15_percent_of_measured_peak():
    bench = _bench()
    points = [bench.Point(4, 128, 4, 128, 8, False, "fp32"),
              bench.Point(4, 128, 2, 256, 2, True, "fp32", accumulation=2),
              bench.Point(2, 128, 4, 128, 4, False, "bf16")]
    for row in bench.run_grid(points):
        assert abs(row["error"]) <= bench.TOLERANCE, (row["point"].label(), row["predicted"], row["measured"])


# -- pretrained models (config.json shapes, frozen bases, packed weights) -----------------------------
def _lm_bench():
    return _load_bench("lm_memory")


@pytest.mark.parametrize("which, ft", [
    ("fp", dict(mode="full")), ("fp", dict(mode="lora", lora_layers=1)),
    ("fp", dict(mode="dora", lora_layers=-1, lora_rank=3, lora_keys="self_attn.q_proj,mlp.down_proj")),
    ("4bit", dict(mode="lora", lora_layers=-1)),
])
def test_lm_shape_counts_what_mlx_lm_builds(tiny_model, tiny_model_4bit, which, ft):
    """Parameter counts, trainable counts and held bytes from config.json equal the loaded model's."""
    from mlx.utils import tree_flatten

    from mlx_train.config import FineTuneConfig
    from mlx_train.planning.memory import LMShape
    from mlx_train.rank import hf

    path = {"fp": tiny_model, "4bit": tiny_model_4bit}[which]
    ft = FineTuneConfig(**ft)
    shape = LMShape.from_model_dir(path, 64, ft)
    model = hf.load_model(ModelConfig(name=str(path)), ft)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    held = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if k not in trainable or ft.mode == "full")
    assert shape.trainable == sum(v.size for v in trainable.values())
    assert shape.weight_bytes == held
    if which == "fp":
        assert shape.n_params == sum(v.size for _, v in tree_flatten(model.parameters())) - (
            0 if ft.mode == "full" else shape.trainable)


def test_suggest_config_takes_a_model_directory(tiny_model, tiny_model_4bit):
    from mlx_train.config import FineTuneConfig
    from mlx_train.planning.memory import LMShape

    full = MemoryOptimizer.suggest_config(model=str(tiny_model), num_devices=2, seq_len=64, memory_per_device=GiB)
    assert full.fits and isinstance(full.model, LMShape) and full.model.n_kv_heads == 2
    assert full.model.intermediate_size == 128 and full.model.vocab_size == 512
    lora = MemoryOptimizer.suggest_config(model=str(tiny_model), num_devices=2, seq_len=64, memory_per_device=GiB,
                                          fine_tune=FineTuneConfig(mode="lora", lora_layers=-1))
    # The frozen base: held once, no gradients, no optimizer state.
    assert lora.breakdown.optimizer_state == 2 * 4 * lora.model.trainable < full.breakdown.optimizer_state / 5
    assert lora.breakdown.gradients == 4 * lora.model.trainable
    q = MemoryOptimizer.suggest_config(model=str(tiny_model_4bit), num_devices=1, seq_len=64, memory_per_device=GiB,
                                       fine_tune=FineTuneConfig(mode="lora"))
    assert q.model.quant_bits == 4 and q.model.weight_bytes < lora.model.weight_bytes / 3
    # A TrainConfig naming the directory plans the same way (what --optimize-memory calls).
    cfg = TrainConfig(model=ModelConfig(name=str(tiny_model), seq_len=64))
    assert MemoryOptimizer.breakdown(cfg).parameters == full.breakdown.parameters == 4 * full.model.n_params
    with pytest.raises(ValueError, match="only seq_len"):
        MemoryOptimizer.suggest_config(model=str(tiny_model), d_model=64)


def test_lm_prediction_within_15_percent_of_measured(tmp_path):
    bench = _lm_bench()
    models = bench.build(tmp_path)
    configs = [c for c in bench.CONFIGS if c[:2] in (("fp", "full"), ("fp", "lora"), ("4bit", "lora"))][:3]
    for row in bench.measure(models, configs):
        assert abs(row["error"]) < 0.15, row


# -- sharded levels on real ranks (bench/shard_memory.py measures the whole table) -----------------------
def rank_main(out_dir: str, levels: str) -> None:
    """One of run_ring_ranks' ranks: the bench's GPT measured at each of `levels`, in this one process."""
    import json

    import mlx.core as mx

    group = mx.distributed.init(backend="ring", strict=True)
    bench = _load_bench("shard_memory")
    gpt = [c for c in bench.CONFIGS if c[0] == "gpt"]
    rows = bench.measure_rank(group, gpt, tuple(levels.split(",")), None)
    Path(out_dir, f"report-{group.rank()}.json").write_text(json.dumps({"rank": group.rank(), "rows": rows}))


@pytest.mark.multiproc
def test_sharded_prediction_within_15_percent_of_measured_on_two_ranks(tmp_path):
    from helpers import run_ring_ranks

    bench = _load_bench("shard_memory")
    reports = run_ring_ranks(2, "test_memory", (tmp_path, "gradients,full"), tmp_path, timeout=300)
    rows = bench.combine([rep["rows"] for rep in reports])
    assert sorted(r["level"] for r in rows) == ["full", "gradients"]
    for row in rows:
        assert abs(row["ratio"] - 1) <= bench.TOLERANCE, row
