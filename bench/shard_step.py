"""Memory and step time of each shard level (rank/spread.py) against data parallel, on ring ranks.

    python bench/shard_step.py --ranks 2 [--layers 4 --width 256 --steps 20]

starts the ranks on loopback (MLX_HOSTFILE/MLX_RANK, as tests/test_sharding.py does). Each rank
builds the same seeded GPT at every level (none, optimizer, gradients, full) and reports: the
parameters and optimizer state it holds between steps (bytes of the fp32 parameters, or of their
slices at full; of m, v and the step count), its peak memory over building the step and 4 steps
(mx.get_peak_memory, reset before each level, one level at a time: `peak_memory`), and the peak
of those 4 steps alone (reset again after building: `step_peak_memory`); then the median step time
after the first 3 (tracing), the levels' steps interleaved so that the load of a shared machine
falls on each alike. Rank 0 prints one JSON line per level.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rank_main(args) -> None:
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from mlx_train.config import ModelConfig, OptimConfig
    from mlx_train.rank.model import build_model
    from mlx_train.rank.step import Stepper, make_optimizer

    group = mx.distributed.init(backend="ring", strict=True)
    n, r = group.size(), group.rank()
    cfg = ModelConfig(n_layers=args.layers, d_model=args.width, n_heads=args.heads, seq_len=args.seq_len)
    levels = tuple(args.levels.split(","))

    def batch(step):
        return np.random.default_rng(step * n + r).integers(0, 256, (args.batch, cfg.seq_len + 1)).astype(np.int32)

    def stepper(level):
        mx.random.seed(0)
        model, loss_fn = build_model(cfg)
        return Stepper(model, loss_fn, make_optimizer(OptimConfig(), args.steps), "fp32", 1.0, group,
                       shard=level, backend="ring")

    rows = {}
    for level in levels:  # memory: one level at a time, the peak reset before each
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        s = stepper(level)
        mx.eval(s.params, s.optimizer.state)
        built_peak = mx.get_peak_memory()
        mx.reset_peak_memory()
        for step in range(4):
            tokens = batch(step)
            s.step([(tokens[:, :-1], tokens[:, 1:])])
        rows[level] = {"ranks": n, "level": level, "param_bytes": sum(v.nbytes for _, v in tree_flatten(s.params)),
                       "optimizer_state_bytes": sum(v.nbytes for _, v in tree_flatten(s.optimizer.state)),
                       "peak_memory": max(built_peak, mx.get_peak_memory()),
                       "step_peak_memory": mx.get_peak_memory(), "scattered_bytes": s.spread.scattered_bytes,
                       "gathered_bytes": s.spread.gathered_bytes}
        del s
    # Time: every level alive, their steps interleaved, so the machine's drifting load falls on all alike.
    steppers = {level: stepper(level) for level in levels}
    times: dict = {level: [] for level in levels}
    for step in range(args.steps):
        tokens = batch(step)
        for level, s in steppers.items():
            t0 = time.perf_counter()
            s.step([(tokens[:, :-1], tokens[:, 1:])])
            times[level].append(time.perf_counter() - t0)
    for level in levels:
        step_s = statistics.median(times[level][3:])
        rows[level].update(step_s=step_s, step_vs_none=step_s / statistics.median(times["none"][3:]))
        if r == 0:
            print(json.dumps(rows[level]), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--levels", default="none,optimizer,gradients,full", help="comma-separated, none first")
    p.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank:
        rank_main(args)
        return 0
    ports = []
    for _ in range(args.ranks):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump([[f"127.0.0.1:{port}"] for port in ports], fh)
    src = str(Path(__file__).resolve().parent.parent / "src")
    env = {**os.environ, "MLX_HOSTFILE": fh.name, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--rank"], env={**env, "MLX_RANK": str(r)})
             for r in range(args.ranks)]
    codes = [proc.wait() for proc in procs]
    os.unlink(fh.name)
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
