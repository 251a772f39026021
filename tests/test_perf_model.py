"""The scaling model (planning/perf.py), optimize's use of it, and the wire percentages that
monitor --performance and check-network show. Arithmetic only: no timings."""

import io

import pytest
from rich.console import Console

from mlx_train.config import DistributedConfig, ModelConfig, TrainConfig
from mlx_train.controller.monitor import performance_table, take_snapshot
from mlx_train.fleet.network import _figures
from mlx_train.planning import perf
from mlx_train.planning.tuner import CHECKPOINT_COST, PREDICTED_SLOWER, Tuner
from mlx_train.rundir import RunDir


def test_wire_limit_is_the_ring_all_reduce_bound():
    # 3 MB over 3 ranks at 200 Mbit/s: 3e6 x 4/3 bytes at 25e6 bytes/s.
    assert perf.wire_limit_s(3e6, 3, 0.2) == pytest.approx(0.16)
    assert perf.wire_limit_s(3e6, 1, 0.2) == 0.0
    link = perf.Link("half", 0.2, 0.5, 1e-3)
    assert perf.allreduce_s(3e6, 3, link) == pytest.approx(4 * 1e-3 + 0.32)


def test_step_is_compute_plus_sync_and_accumulation_hides_it():
    link = perf.Link("wire", 1.0, 1.0, 0.0)
    p = perf.predict_step(0.1, 30e6, 4, link)
    assert p.comm_s == pytest.approx(30e6 * 1.5 / 125e6)  # 0.36 s
    assert p.step_s == pytest.approx(0.46) and p.efficiency == pytest.approx(0.1 / 0.46)
    k = perf.accumulation_to_hide(0.1, p.comm_s, overhead=0.10)
    with_k = perf.predict_step(0.1, 30e6, 4, link, accumulation=k)
    short = perf.predict_step(0.1, 30e6, 4, link, accumulation=k - 1)
    assert with_k.comm_s / with_k.step_s <= 0.10 < short.comm_s / short.step_s
    # Overlap (not what MLX's step does: the default) hides at most the last backward.
    hidden = perf.predict_step(0.1, 30e6, 4, link, overlap=True)
    assert not perf.MLX_OVERLAPS and hidden.step_s == pytest.approx(0.46 - 0.1 * perf.BACKWARD_SHARE)


def test_shard_levels_move_zeros_multiples_of_the_all_reduce_and_full_per_micro_batch():
    link = perf.Link("wire", 1.0, 1.0, 0.0)
    dp = perf.allreduce_s(30e6, 3, link)
    zero = {lv: perf.shard_sync_s(30e6, 3, link, lv, traffic=perf.ZERO_TRAFFIC) for lv in perf.ZERO_TRAFFIC}
    assert zero == pytest.approx({"none": dp, "optimizer": dp, "gradients": dp, "full": 1.5 * dp})
    # What the code moves today (bench/shard_fleet.py measured it), and full's gathers per micro-batch.
    assert perf.shard_sync_s(30e6, 3, link, "optimizer") == pytest.approx(dp)
    assert perf.shard_sync_s(30e6, 3, link, "full", accumulation=4) == pytest.approx(6 * dp)
    assert perf.shard_sync_s(30e6, 3, link, "gradients", accumulation=4) == pytest.approx(dp)
    assert perf.shard_sync_s(30e6, 1, link, "full") == 0.0
    assert perf.train_flops(1e9, 2048, recompute=False) == 6 * 1e9 * 2048


def test_faster_links_and_fewer_devices_predict_shorter_steps():
    c, grads = 1.0, 1.4e9
    by_link = [perf.predict_step(c, grads, 4, link).step_s for link in perf.LINKS.values()]
    assert by_link == sorted(by_link, reverse=True)  # 10 GbE, TB4, TB5, TB5 RDMA
    by_n = [perf.predict_step(c, grads, n, perf.LINKS["10gbe"]).step_s for n in range(2, 9)]
    assert by_n == sorted(by_n)
    assert "| Thunderbolt 5 RDMA (JACCL) | 8 |" in perf.scaling_table(c, grads, list(perf.LINKS.values()))


class World:
    """A machine whose step follows the model's own form: compute = 0.4 + 0.05 x micro-batches,
    checkpointing x1.5, bf16 x0.8, sync 0.02 s; 8192 tokens per step."""

    def __init__(self):
        self.order = []

    def __call__(self, t, cfg):
        s = t.split
        self.order.append((s.batch, s.checkpointing, s.precision))
        compute = (0.4 + 0.05 * s.accumulation) * (1.5 if s.checkpointing else 1.0) * (0.8 if s.precision == "bf16" else 1.0)
        t.compute_s, t.comm_s = compute, 0.02
        t.tokens_per_s, t.peak, t.status = 8192 / (compute + 0.02), 1, "ok"


def test_optimize_tries_settings_in_the_models_order_and_skips_predicted_losers():
    base = TrainConfig(model=ModelConfig(n_layers=2, d_model=64, n_heads=2, seq_len=64),
                       dist=DistributedConfig(num_devices=2, batch_size_per_device=8))
    world = World()
    tuner = Tuner(base, 2**40, 4, False, world)
    tuner.stage_candidates = lambda: []  # the pipeline's rows: test_optimize.py's
    best = tuner.run()
    # Ties go to the bigger batch: fp32 and bf16 (no prior against it) at batch 8 first; bf16 wins,
    # so fp32's smaller batches are predicted slower; bf16 at batch 4 ties until measured, and then
    # the per-micro-batch cost is known and batches 2 and 1 are predicted slower; checkpointing is
    # predicted 4/3 slower and never run.
    assert world.order == [(8, False, "fp32"), (8, False, "bf16"), (4, False, "bf16")]
    assert (best.split.batch, best.split.precision, best.split.checkpointing) == (8, "bf16", False)
    skipped = [t for t in tuner.trials if t.status == PREDICTED_SLOWER]
    assert {(t.split.batch, t.split.checkpointing, t.split.precision) for t in skipped} == \
        {(4, False, "fp32"), (2, False, "fp32"), (1, False, "fp32"), (2, False, "bf16"), (1, False, "bf16"),
         (8, True, "fp32"), (4, True, "fp32"), (2, True, "fp32"), (1, True, "fp32")}
    assert all(t.predicted < best.tokens_per_s * 0.97 for t in skipped)
    # The calibrated model reproduces the world it measured.
    assert tuner.model.per_micro == pytest.approx(0.05) and tuner.model.factor["bf16"] == pytest.approx(0.8)
    assert tuner.model.factor["ckpt"] == CHECKPOINT_COST  # never measured: still the prior


def test_monitor_shows_sync_against_the_wire_when_the_rate_is_recorded(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    TrainConfig(steps=10, dist=DistributedConfig(num_devices=3, link_gbps=0.2)).to_yaml(run.config_path)
    run.append(run.metrics_path, {"step": 1, "loss": 3.0, "time": 1.0, "tokens_per_s": 900.0, "step_time_s": 0.5,
                                  "compute_time_s": 0.3, "comm_time_s": 0.2, "grad_bytes": 3_000_000, "devices": 3,
                                  "global_batch": 12, "peak_memory": [1, 1, 1], "param_checksum": [7, 7, 7]})
    out = io.StringIO()
    Console(file=out, width=200).print(performance_table(take_snapshot(run)))
    text = out.getvalue()
    assert "sync % of wire" in text and "0.2 Gbit/s" in text
    assert "80%" in text  # limit 0.16 s of a measured 0.2 s


def test_check_network_gives_bus_bandwidth_as_a_share_of_the_link():
    f = _figures(size_mb=4.0, ms=200.0, ranks=3, link_gbps=0.2)
    assert f["busbw_gbs"] == pytest.approx(4 * 2**20 / 0.2 / 1e9 * 4 / 3)
    assert f["wire_pct"] == pytest.approx(100 * f["busbw_gbs"] * 8 / 0.2)
    assert "wire_pct" not in _figures(4.0, 200.0, 3)
