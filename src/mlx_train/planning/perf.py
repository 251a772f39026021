"""Throughput arithmetic shared by monitor, bench and optimize, and the scaling model users plan with.

Bandwidths follow nccl-tests: algbw = bytes / time; busbw = algbw * 2(n-1)/n for an all-reduce,
which makes the figure comparable with the link speed whatever the number of ranks.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

BASELINES = Path(os.environ.get("MLX_TRAIN_STATE", str(Path.home() / ".mlx-train"))) / "baselines.json"


def bus_bandwidth(nbytes: float, seconds: float, n: int) -> Tuple[float, float]:
    """(algbw, busbw) in GB/s of one all-reduce of `nbytes` over `n` ranks; zeros when undefined."""
    if n < 2 or seconds <= 0 or nbytes <= 0:
        return 0.0, 0.0
    algbw = nbytes / seconds / 1e9
    return algbw, algbw * 2 * (n - 1) / n


def baseline_key(run_or_cfg) -> str:
    cfg = run_or_cfg.load_config() if hasattr(run_or_cfg, "load_config") else run_or_cfg
    m = cfg.model
    return (f"{m.name}:L{m.n_layers}:D{m.d_model}:H{m.n_heads}:T{m.seq_len}:B{cfg.dist.batch_size_per_device}"
            f":{cfg.precision}:{'ckpt' if cfg.grad_checkpoint else 'nockpt'}")


def record_baseline(cfg, tokens_per_s: float) -> None:
    """Remember the single-device throughput of this shape (written by bench and optimize)."""
    data = json.loads(BASELINES.read_text()) if BASELINES.is_file() else {}
    data[baseline_key(cfg)] = tokens_per_s
    BASELINES.parent.mkdir(parents=True, exist_ok=True)
    BASELINES.write_text(json.dumps(data, indent=1))


def scaling_efficiency(run, metrics: dict) -> Optional[float]:
    if not BASELINES.is_file():
        return None
    base = json.loads(BASELINES.read_text()).get(baseline_key(run))
    return (metrics["tokens_per_s"] / metrics["devices"]) / base if base else None


# ---------------------------------------------------------------- the scaling model
#
# Data parallelism: each step every device computes its micro-batches, then one all-reduce of
# the gradients, then the update. A ring all-reduce of B bytes over n devices moves
# B x 2(n-1)/n bytes over each device's link in 2(n-1) messages, so at a bus bandwidth of
# `rate x efficiency` it takes 2(n-1) x latency + B x 2(n-1)/n / (rate x efficiency). The trainer's
# step is phased (compute, sync, update as separate graphs): nothing hides the sync, and
# bench/overlap.py measured that putting the all-reduce beside the backward on a communication
# stream does not pay on MLX's CPU build. Accumulation is what hides it: k micro-batches per
# step share one sync.

# Whether MLX hides the sync behind the backward in the trainer's step (bench/overlap.py: no).
MLX_OVERLAPS = False
# The share of a micro-batch's compute that is backward (backward ~ 2 x forward): what overlap
# could at most hide the last micro-batch's all-reduce behind.
BACKWARD_SHARE = 2 / 3


@dataclass(frozen=True)
class Link:
    """A link between hosts: its line rate, the share of it an all-reduce's bus bandwidth reaches,
    and the latency of one message hop."""
    name: str
    gbps: float
    efficiency: float
    latency_s: float


# Published line rates; the efficiencies are stated assumptions (see docs/performance.md).
LINKS = {
    # TCP over 10GBASE-T reaches ~9.4 Gbit/s; MLX's ring pays its copies and reductions on top.
    "10gbe": Link("10 GbE, ring over TCP", 10.0, 0.85, 50e-6),
    # IP over a Thunderbolt 4 / USB4 cable: a 20 Gbit/s-per-direction data path, ~16 Gbit/s of TCP seen.
    "tb4": Link("Thunderbolt 4, ring over TCP", 40.0, 0.4, 30e-6),
    # Thunderbolt 5: 80 Gbit/s; IP over it is CPU-bound like TB4, so the same share is assumed.
    "tb5": Link("Thunderbolt 5, ring over TCP", 80.0, 0.4, 30e-6),
    # RDMA over Thunderbolt 5 (MLX's JACCL backend, macOS 26.2+): no kernel TCP stack in the way.
    "tb5-rdma": Link("Thunderbolt 5 RDMA (JACCL)", 80.0, 0.9, 10e-6),
}


def wire_limit_s(nbytes: float, n: int, gbps: float) -> float:
    """The fastest an all-reduce of `nbytes` over `n` devices can be on links of `gbps`: B x 2(n-1)/n / rate."""
    if n < 2 or gbps <= 0:
        return 0.0
    return nbytes * 2 * (n - 1) / n / (gbps * 1e9 / 8)


def allreduce_s(nbytes: float, n: int, link: Link) -> float:
    """Predicted time of one ring all-reduce of `nbytes` over `n` devices on `link`."""
    if n < 2:
        return 0.0
    return 2 * (n - 1) * link.latency_s + wire_limit_s(nbytes, n, link.gbps) / link.efficiency


@dataclass(frozen=True)
class StepPrediction:
    devices: int
    accumulation: int
    compute_s: float   # per step: accumulation x one micro-batch, plus the update
    comm_s: float      # the gradient all-reduce
    step_s: float

    @property
    def efficiency(self) -> float:
        """Scaling efficiency: tokens/s per device against one device with the same accumulation."""
        return self.compute_s / self.step_s if self.step_s else 1.0

    @property
    def speedup(self) -> float:
        return self.devices * self.efficiency


def predict_step(micro_batch_s: float, grad_bytes: float, devices: int, link: Optional[Link] = None,
                 accumulation: int = 1, update_s: float = 0.0, overlap: bool = MLX_OVERLAPS,
                 comm_s: Optional[float] = None) -> StepPrediction:
    """Step time on `devices` from one device's measured compute of one micro-batch (forward and
    backward; `compute_time_s` / accumulation of a 1-device run) and the gradient bytes (metrics'
    `grad_bytes`). `comm_s`, when measured, replaces the link's prediction. With `overlap`, the
    last micro-batch's backward hides up to its own length of the all-reduce."""
    compute = accumulation * micro_batch_s + update_s
    if comm_s is None:
        comm_s = allreduce_s(grad_bytes, devices, link) if link is not None and devices > 1 else 0.0
    hidden = min(comm_s, BACKWARD_SHARE * micro_batch_s) if overlap else 0.0
    return StepPrediction(devices, accumulation, compute, comm_s, compute + comm_s - hidden)


def accumulation_to_hide(micro_batch_s: float, comm_s: float, overhead: float = 0.10) -> int:
    """The fewest micro-batches per step that keep the sync at most `overhead` of the step."""
    if comm_s <= 0:
        return 1
    return max(1, math.ceil(comm_s * (1 - overhead) / (overhead * micro_batch_s)))


def scaling_table(micro_batch_s: float, grad_bytes: float, links: Sequence[Link],
                  devices: Sequence[int] = range(2, 9), overhead: float = 0.10) -> str:
    """docs/performance.md's planning table: step time and efficiency without accumulation, and
    the accumulation that keeps the sync under `overhead` of the step."""
    rows = ["| link | N | sync s | step s (acc 1) | efficiency | speedup | accumulation for <= "
            f"{overhead:.0%} sync | efficiency with it |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for link in links:
        for n in devices:
            p = predict_step(micro_batch_s, grad_bytes, n, link)
            k = accumulation_to_hide(micro_batch_s, p.comm_s, overhead)
            pk = predict_step(micro_batch_s, grad_bytes, n, link, accumulation=k)
            rows.append(f"| {link.name} | {n} | {p.comm_s:.3f} | {p.step_s:.3f} | {p.efficiency:.0%} | "
                        f"{p.speedup:.1f}x | {k} | {pk.efficiency:.0%} |")
    return "\n".join(rows)


# ---------------------------------------------------------------- sharded levels (--shard, issue 17)
#
# What a rank sends per step, in units of data parallel's all-reduce (2(N-1)/N x the gradient
# bytes). ZeRO (arXiv 1910.02054, section 7): a reduce-scatter and an all-gather move what the
# all-reduce does; full sharding gathers the parameters twice (forward, backward) and
# reduce-scatters the gradients, 1.5x. Full sharding does that for every micro-batch.
ZERO_TRAFFIC = {"none": 1.0, "optimizer": 1.0, "gradients": 1.0, "full": 1.5}
# What this code sends (measured on the test fleet's interfaces, bench/shard_fleet.py): `optimizer`
# and `gradients` reduce-scatter and all-gather (0.5 + 0.5); `full` reduce-scatters inside the backward
# by a ring of send/recv on ring and MPI (sum_scatter on JACCL, NCCL), ZeRO's bytes (0.5 + 0.5 + 0.5).
BUILT_TRAFFIC = {"none": 1.0, "optimizer": 1.0, "gradients": 1.0, "full": 1.5}
# Collectives a step makes, each 2(N-1) hops of latency at most: per group at `full` two gathers and a
# reduce-scatter per micro-batch.
_CALLS = {"none": 1, "optimizer": 2, "gradients": 2}


def shard_sync_s(grad_bytes: float, n: int, link: Link, shard: str = "none", accumulation: int = 1,
                 groups: int = 1, traffic: Optional[dict] = None) -> float:
    """Predicted communication of one optimizer step at shard level `shard` over `n` devices on `link`:
    `traffic[shard]` (default BUILT_TRAFFIC, what this code moves) times data parallel's all-reduce,
    once per step, or once per micro-batch at `full` (the parameters are gathered for each
    micro-batch's forward and backward). `groups`: the gathered groups at `full` (blocks + 1)."""
    if n < 2:
        return 0.0
    share = (traffic or BUILT_TRAFFIC)[shard]
    times = accumulation if shard == "full" else 1
    calls = 3 * groups * accumulation if shard == "full" else _CALLS[shard]
    wire = wire_limit_s(grad_bytes, n, link.gbps) / link.efficiency
    return calls * 2 * (n - 1) * link.latency_s + times * share * wire


def train_flops(n_params: float, tokens: float, recompute: bool) -> float:
    """FLOPs of a training step over `tokens`: 6 per parameter per token (forward 2, backward 4), 8
    when the forward is computed again in the backward (checkpointing; `full` always does)."""
    return (8 if recompute else 6) * n_params * tokens
