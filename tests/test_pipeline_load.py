"""Each pipeline stage reads only its own layers' weights, and the stages follow the hosts' memory.

Loading: a 4-layer llama made offline is loaded lazily (hf.load_model lazy=True) and one stage's
part kept (rank/pipeline.py load_only): MLX's peak memory over that load is measured against the
whole model's bytes, and against an eager load of the same model (which holds it all).
Planning (planning/stages.py): layers in proportion to each host's memory, equal hosts equal
stages, `--pipeline-stages auto` the least S that fits, refused in one line when none does.
"""

from __future__ import annotations

import gc

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_train.config import AUTO_STAGES, FineTuneConfig, ModelConfig, TrainConfig, from_dict, parse_stages
from mlx_train.errors import UserError
from mlx_train.fleet.hosts import Host
from mlx_train.planning import stages as planning
from mlx_train.rank import hf
from mlx_train.rank.pipeline import load_only, stage_kind, stage_layers
from tiny_llama import make_model_dir

LAYERS = 4
LORA = FineTuneConfig(mode="lora", lora_layers=-1, lora_rank=4)
GiB = 2**30


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # The blocks (2.9 MB each in fp32) outweigh the embeddings and head (0.5 MB together).
    return make_model_dir(tmp_path_factory.mktemp("load") / "llama4", hidden_size=256, intermediate_size=704,
                          num_hidden_layers=LAYERS)


def _fresh() -> int:
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    return mx.get_active_memory()


def _load_peak(model_dir, stage=None, stages=2):
    """MLX's peak bytes over loading the model (lazily and one stage's part kept, with `stage`),
    and the bytes its parameters hold after."""
    base = _fresh()
    mx.random.seed(0)
    model = hf.load_model(ModelConfig(name=str(model_dir)), LORA, lazy=stage is not None)
    if stage is not None:
        kind = stage_kind(model)
        layers = stage_layers(kind.count(model), [1.0] * stages)
        load_only(kind(model, layers[stage], stage == 0, stage == stages - 1))
    mx.eval(model.parameters())
    held = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    peak = mx.get_peak_memory() - base
    del model
    return peak, held


def test_a_stage_reads_only_its_layers(model_dir):
    whole = sum(v.nbytes for v in mx.load(str(model_dir / "model.safetensors")).values())
    eager, eager_held = _load_peak(model_dir)
    assert eager >= whole and eager_held >= whole, (eager, whole)  # the premise: a plain load holds it all
    for stage in (0, 1):
        peak, held = _load_peak(model_dir, stage)
        print(f"stage {stage} of 2: peak {peak / 1e6:.1f} MB, holds {held / 1e6:.1f} MB; "
              f"whole model {whole / 1e6:.1f} MB, eager load's peak {eager / 1e6:.1f} MB")
        # Its 2 blocks and one end of the model (plus the adapters), never the other stage's blocks.
        assert held < 0.62 * whole, (stage, held, whole)
        assert peak <= held * 1.02, (stage, peak, held)


def _cfg(model_dir, stages=1, batch=2, accumulation=2, budget=None) -> TrainConfig:
    return from_dict(TrainConfig, {"model": {"name": str(model_dir), "seq_len": 32},
                                   "fine_tune": {"mode": "lora", "lora_layers": -1, "lora_rank": 4},
                                   "dist": {"num_devices": 2, "batch_size_per_device": batch,
                                            "gradient_accumulation": accumulation, "pipeline_stages": stages},
                                   **({"memory_budget": budget} if budget else {})})


def _hosts(*memory):
    return [Host(f"h{i}", f"10.0.0.{i}", memory=m) for i, m in enumerate(memory, 1)]


def test_stages_follow_the_hosts_memory(model_dir):
    cfg = _cfg(model_dir, stages=2)
    assert planning.stage_weights(cfg, _hosts(8 * GiB, 8 * GiB), 2) is None  # equal hosts: equal stages
    weights = planning.stage_weights(cfg, _hosts(12 * GiB, 4 * GiB), 2)
    assert weights is not None and weights[0] == 3 * weights[1], weights
    assert stage_layers(8, weights) == [range(0, 6), range(6, 8)]
    assert planning.resolve(cfg, _hosts(12 * GiB, 4 * GiB)).dist.stage_weights == weights
    p = planning.plan(cfg, _hosts(12 * GiB, 4 * GiB), 2)
    assert p.layers == (range(0, 3), range(3, 4)) and p.fits, p


def test_auto_takes_the_least_stages_that_fit(model_dir, capsys):
    assert parse_stages("auto") == AUTO_STAGES and parse_stages("3") == 3
    auto = _cfg(model_dir, stages="auto")
    assert auto.dist.pipeline_stages == AUTO_STAGES
    one = planning.plan(_cfg(model_dir), _hosts(64 * GiB, 64 * GiB), 1)
    two = planning.plan(_cfg(model_dir, stages=2), _hosts(64 * GiB, 64 * GiB), 2)
    assert max(two.needs) < one.needs[0], (two, one)
    # Plenty: one stage (no pipeline). Between a stage's need and the whole model's: two.
    assert planning.resolve(auto, _hosts(64 * GiB, 64 * GiB)).dist.pipeline_stages == 1
    between = int((max(two.needs) + one.needs[0]) / 2 / 0.9) + 1  # rank_budget_for takes 0.9 of a host
    resolved = planning.resolve(auto, _hosts(between, between))
    assert resolved.dist.pipeline_stages == 2 and resolved.dist.global_batch_size == 4, resolved.dist
    assert "--pipeline-stages auto: 2 stages (stage 0: layers 0-1" in capsys.readouterr().out
    # Too little for any split: one line.
    with pytest.raises(UserError, match="fits no split of its 4 layers over 2 devices") as exc:
        planning.resolve(auto, _hosts(1 << 20, 1 << 20))
    assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="pipeline stage 0 .* needs about"):
        planning.check_fits(_cfg(model_dir, stages=2), _hosts(1 << 20, 1 << 20))
