"""The memory model's peak per pipeline stage against the peak measured on real ring ranks.

    PYTHONPATH=src python bench/pipeline_memory.py [--json bench/pipeline_memory.json]

For each configuration (S stages, M micro-batches, the micro-batch) it starts S ring ranks on
loopback (MLX_HOSTFILE/MLX_RANK). Each builds the built-in GPT and its stage of it (rank/pipeline.py's
Pipeline, as the trainer does), runs one step (the optimizer state's first allocation), clears the
cache, resets the peak, runs a second step and reports `mx.get_peak_memory()`: the measured peak of
a step on that stage, what planning/stages.stage_memory's `peak` predicts. Then a checkpoint's save
as the trainer runs it (rank/pipeline.py whole_pieces: every rank in each piece's all_sum, each
leaf's crc; rank 0, the writer, snapshots each piece and holds it until the next has come, as its
writer thread does), its peak from the same state, what stages.checkpoint_need predicts. Prints a
markdown table (predicted, measured, ratio, for the step and the save) and with --json writes the rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 0.15
# (stages, micro-batches, micro-batch, layers, width, seq_len): the state outweighing the activations,
# and the other way round; 2 and 3 stages.
CONFIGS = [(2, 4, 2, 6, 256, 64), (3, 4, 2, 6, 256, 64), (2, 4, 16, 4, 128, 128), (3, 6, 16, 6, 128, 128),
           (2, 2, 8, 4, 256, 64)]


def rank_main(config: list) -> None:
    import mlx.core as mx
    import numpy as np

    from mlx_train.config import ModelConfig, OptimConfig
    from mlx_train.planning.memory import ModelShape
    from mlx_train.planning.stages import checkpoint_need, stage_memory
    from mlx_train.rank import checkpoint
    from mlx_train.rank.model import build_model
    from mlx_train.rank.pipeline import Pipeline, stage_layers
    from mlx_train.rank.step import make_optimizer

    stages, micro, batch, layers, width, seq = config
    group = mx.distributed.init(backend="ring", strict=True)
    cfg = ModelConfig(n_layers=layers, d_model=width, n_heads=4, seq_len=seq)
    mx.random.seed(0)
    model, _ = build_model(cfg)
    pipe = Pipeline(model, make_optimizer(OptimConfig(), 10), "fp32", 1.0, group, stages, backend="ring")
    rng = np.random.default_rng(0)

    def batches():
        t = rng.integers(0, 256, (micro, batch, seq + 1)).astype(np.int32)
        return [(t[i, :, :-1], t[i, :, 1:]) for i in range(micro)]

    pipe.step(batches())
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    pipe.step(batches())
    measured = mx.get_peak_memory()
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    held = None
    for pairs, moments in pipe.whole_pieces():
        for _, v in pairs:
            checkpoint.leaf_crc(v)
        if group.rank() == 0:  # the piece before goes once this one is snapshotted (checkpoint.Handoff)
            held = (checkpoint.snapshot(dict(pairs)), checkpoint.snapshot(dict(moments)))
        del pairs, moments
    del held
    saved = mx.get_peak_memory()
    s = group.rank() % stages
    shape = ModelShape.from_config(cfg)
    predicted = stage_memory(shape, stages, s, batch, micro).peak
    save_predicted = checkpoint_need(shape, stage_layers(layers, [1.0] * stages)[s], s, stages)
    peaks = np.array(mx.distributed.all_gather(mx.array([[measured, predicted, saved, save_predicted]],
                                                        dtype=mx.int64), group=group))
    if group.rank() == 0:
        print(json.dumps([{"stages": stages, "micro": micro, "batch": batch, "layers": layers, "width": width,
                           "seq_len": seq, "stage": i, "measured": int(m), "predicted": int(p),
                           "ratio": float(p / m), "save_measured": int(sm), "save_predicted": int(sp),
                           "save_ratio": float(sp / sm)}
                          for i, (m, p, sm, sp) in enumerate(peaks.reshape(-1, 4))]), flush=True)


def _free_ports(n: int) -> list:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run(config) -> list:
    stages = config[0]
    fd, hostfile = tempfile.mkstemp(prefix="mlx-train-pipemem-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump([[f"127.0.0.1:{p}"] for p in _free_ports(stages)], fh)
    env = {**os.environ, "MLX_HOSTFILE": hostfile, "PYTHONPATH": str(ROOT / "src")}
    try:
        procs = [subprocess.Popen([sys.executable, __file__, "--rank", json.dumps(list(config))], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**env, "MLX_RANK": str(r)})
                 for r in range(stages)]
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        os.unlink(hostfile)
    if any(p.returncode for p in procs):
        raise SystemExit(f"{config} failed:\n" + "\n".join(o[1][-1500:] for o in outs))
    return json.loads(outs[0][0].strip().splitlines()[-1])


def table(rows: list) -> str:
    lines = ["| S | M | micro-batch | GPT | stage | predicted MiB | measured MiB | predicted / measured | "
             "save: predicted MiB | measured MiB | predicted / measured |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['stages']} | {r['micro']} | {r['batch']} | L{r['layers']} D{r['width']} T{r['seq_len']} | "
                     f"{r['stage']} | {r['predicted'] / 2**20:.1f} | {r['measured'] / 2**20:.1f} | {r['ratio']:.2f} | "
                     f"{r['save_predicted'] / 2**20:.1f} | {r['save_measured'] / 2**20:.1f} | {r['save_ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    rows = [row for config in CONFIGS for row in run(config)]
    print(table(rows))
    bad = [r for r in rows if abs(r["ratio"] - 1) > TOLERANCE]
    print(f"{len(rows) - len(bad)}/{len(rows)} stages within {TOLERANCE:.0%}")
    bad = [r for r in rows if abs(r["save_ratio"] - 1) > TOLERANCE]
    print(f"{len(rows) - len(bad)}/{len(rows)} saves within {TOLERANCE:.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"tolerance": TOLERANCE, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--rank":
        rank_main(json.loads(sys.argv[2]))
    else:
        main()
