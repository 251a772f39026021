"""Throughput arithmetic shared by monitor, bench and optimize.

Bandwidths follow nccl-tests: algbw = bytes / time; busbw = algbw * 2(n-1)/n for an all-reduce,
which makes the figure comparable with the link speed whatever the number of ranks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Tuple

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
