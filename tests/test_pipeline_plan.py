"""The planner and pipeline stages (docs/pipeline.md "When to pipeline and when to shard"): functions
only, no launch.

--optimize-memory pipelines a model that fits no device at any shard level allowed (the fewest
stages that fit, one line), keeps a given --pipeline-stages, and says which it prefers where sharding
fits too (the scaling model when the hosts' speeds and the link are known, else sharding). The
out-of-memory ladder on a pipelined run cuts the micro-batch (same global batch, same stages) and
judges the crash by the stage's predicted peak.
"""

from __future__ import annotations

import json

import pytest

from mlx_train.config import Split, TrainConfig, from_dict, shard_level_of
from mlx_train.controller.run import plan_for_budget
from mlx_train.errors import UserError
from mlx_train.fleet.hosts import Host
from mlx_train.planning import oom, stages
from mlx_train.planning.planner import MemoryOptimizer, model_shape

MiB = 2**20
GiB = 2**30


def _gpt(budget_mib, shard="auto", stages_=1, batch=2, accumulation=2, link_gbps=0.0) -> TrainConfig:
    # 8 blocks of width 256: the fp32 state (~130 MB with AdamW) outweighs a micro-batch's activations.
    return from_dict(TrainConfig, {"model": {"n_layers": 8, "d_model": 256, "n_heads": 4, "seq_len": 64},
                                   "dist": {"num_devices": 2, "batch_size_per_device": batch,
                                            "gradient_accumulation": accumulation, "pipeline_stages": stages_,
                                            "link_gbps": link_gbps},
                                   "shard": shard, "memory_budget": budget_mib * MiB})


def _hosts(n=2, speed=None):
    return [Host(f"h{i}", f"10.0.0.{i}", speed=speed) for i in range(1, n + 1)]


def test_optimize_memory_pipelines_a_model_that_fits_no_device(capsys):
    # 100 MiB, --shard none: the step fits no device unpipelined; two stages hold it (and the
    # checkpoint's pieces).
    cfg = _gpt(100, shard="none")
    planned = plan_for_budget(cfg, _hosts())
    out = capsys.readouterr().out.strip().splitlines()
    assert planned.dist.pipeline_stages == 2, planned.dist
    assert planned.dist.global_batch_size == cfg.dist.global_batch_size == 8  # the same rows per step
    assert stages.plan(planned, _hosts(), 2).fits
    assert len(out) == 1 and out[0].startswith("--optimize-memory: the model fits no device unpipelined at "
                                               "--shard none: 2 pipeline stages"), out
    # Not pipelinable (a level chosen with --shard; one device): refused before launch as before.
    for not_pipelined, hosts in ((_gpt(100, shard="gradients"), _hosts()), (_gpt(100, shard="none"), _hosts(1))):
        not_pipelined = from_dict(TrainConfig, {**not_pipelined.to_dict(), "dist": {
            **not_pipelined.to_dict()["dist"], "num_devices": len(hosts)}})
        with pytest.raises(UserError, match="even at batch 1"):
            plan_for_budget(not_pipelined, hosts)
    # 80 MiB: a stage's step at batch 1 fits, and so does its checkpoint, which goes a piece at a
    # time beside the stage's state (before, its gather of the whole model's state did not fit).
    smallest = stages.at_stages(cfg, _hosts(), 2, 1, 8, "fp32", False)
    shape = model_shape(cfg.model, cfg.fine_tune)
    layers = stages.plan(smallest, _hosts(), 2).layers
    assert max(stages.checkpoint_need(shape, r, s, 2) for s, r in enumerate(layers)) \
        < max(stages.stage_need(smallest, shape, r, s, 2) for s, r in enumerate(layers)) < 80 * MiB
    assert plan_for_budget(_gpt(80), _hosts()).dist.pipeline_stages == 2
    capsys.readouterr()
    # Too little for any number of stages (75 MiB: a stage's step at batch 1 does not fit): the
    # unpipelined refusal, one line.
    with pytest.raises(UserError, match="cannot hold this model even at batch 1") as exc:
        plan_for_budget(_gpt(75), _hosts())
    assert "\n" not in str(exc.value)


def test_optimize_memory_keeps_the_stages_given(capsys):
    # --pipeline-stages 2 with a micro-batch of 8 (in flight on stage 0: 2 of them) over 100 MiB: the
    # stages stay, the micro-batch is cut to what every stage holds, the global batch kept.
    cfg = _gpt(100, stages_=2, batch=8, accumulation=1)
    assert not stages.plan(cfg, _hosts(), 2).fits
    planned = plan_for_budget(cfg, _hosts())
    assert planned.dist.pipeline_stages == 2 and planned.dist.global_batch_size == 8
    assert planned.dist.batch_size_per_device < 8 and stages.plan(planned, _hosts(), 2).fits
    assert capsys.readouterr().out.startswith("--optimize-memory: 2 pipeline stages x 1 replica")


def test_where_both_fit_the_planner_says_which_it_prefers(capsys):
    # 100 MiB: `full` fits unpipelined, and so do 2 stages.
    cfg = _gpt(100)
    planned = plan_for_budget(cfg, _hosts())
    out = capsys.readouterr().out
    assert planned.dist.pipeline_stages == 1 and shard_level_of(planned) == "full", planned
    assert "a pipeline of 2 stages fits too; --shard full: --shard full has no bubble" in out, out
    # With the hosts' measured speeds and the link's rate the scaling model decides, either way.
    sharded, staged = Split.of(planned).apply(_gpt(100, link_gbps=1.0)), stages.fewest(cfg, _hosts())[0]
    fast_compute, slow_compute = _hosts(speed=1e6), _hosts(speed=1e-3)  # rows per second per rank
    pipelined, why = stages.prefer(sharded, staged, fast_compute)
    assert pipelined and "a pipeline moves only activations" in why, why  # full's traffic dominates
    pipelined, why = stages.prefer(sharded, staged, slow_compute)
    assert not pipelined, why  # compute dominates: the bubble costs more than full's traffic


def test_the_pipeline_step_model():
    from mlx_train.planning.perf import LINKS

    link = LINKS["10gbe"]
    # No wire cost, one replica: the compute split over S stages, stretched by (M+S-1)/M.
    ideal = stages.pipeline_step_s(8.0, 2, 4, 0, link) - 2 * (4 + 1) * link.latency_s - 2 * link.latency_s
    assert ideal == pytest.approx(8.0 * 5 / 8)
    # An activation's bytes add once forward and once back per schedule slot.
    more = stages.pipeline_step_s(8.0, 2, 4, 1e6, link) - stages.pipeline_step_s(8.0, 2, 4, 0, link)
    assert more == pytest.approx(5 * 2 * 1e6 / (link.gbps * 1e9 / 8 * link.efficiency))


def test_the_oom_ladder_on_a_pipelined_run():
    cfg = stages.at_stages(_gpt(80), _hosts(), 2, 2, 4, "fp32", False)
    assert cfg.dist.pipeline_stages == 2 and cfg.dist.global_batch_size == 8
    nxt = MemoryOptimizer.suggest_recovery_config(cfg)  # --shard auto: never a shard level for a pipeline
    assert (nxt.dist.pipeline_stages, nxt.dist.batch_size_per_device, nxt.dist.gradient_accumulation) == (2, 1, 8)
    assert nxt.dist.global_batch_size == 8 and shard_level_of(nxt) == "none"
    # The judge takes the stage's peak, not the whole model's.
    assert oom._predicted(cfg) == stages.peak(cfg) < MemoryOptimizer.estimate(cfg)
    verdict = oom.OomPolicy().judge(cfg, oom.CrashFacts(rank=0, code=-9, budget=stages.peak(cfg) + MiB))
    assert verdict is not None and "predicted" in verdict.reason, verdict


def _model_dir(path, **over):
    # The shape is what the planner reads (config.json; the dtype given, so no weights are needed).
    config = dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                  num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                  torch_dtype="bfloat16", quantization={"group_size": 64, "bits": 4})
    config.update(over)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    header = b"{}"
    (path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)  # no tensors
    return path


def test_qlora_on_a_70b_over_two_macs(tmp_path, capsys):
    # The headline: a 4-bit Llama-3-70B (~40 GB) over two 32 GB Macs, LoRA, --shard none.
    model = _model_dir(tmp_path / "llama70b")
    cfg = from_dict(TrainConfig, {"model": {"name": str(model), "seq_len": 512},
                                  "fine_tune": {"mode": "lora", "lora_layers": 16, "lora_rank": 8},
                                  "dist": {"num_devices": 2, "batch_size_per_device": 1, "gradient_accumulation": 8},
                                  "shard": "none"})
    macs = [Host(f"m{i}", f"10.0.0.{i}", memory=32 * 10**9) for i in (1, 2)]
    planned = plan_for_budget(cfg, macs)
    assert planned.dist.pipeline_stages == 2 and planned.dist.global_batch_size == 16, planned.dist
    assert "2 pipeline stages" in capsys.readouterr().out
    assert stages.why_not_pipelined(cfg) is None
    gemma = from_dict(TrainConfig, {**cfg.to_dict(), "model": {"name": str(_model_dir(tmp_path / "g",
                                                                                      model_type="gemma")),
                                                                "seq_len": 512}})
    assert "not gemma" in stages.why_not_pipelined(gemma)
    with pytest.raises(UserError, match="even at batch 1"):
        plan_for_budget(gemma, macs)
