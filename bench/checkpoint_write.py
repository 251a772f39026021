"""Checkpoint write speed vs the disk's own sequential write speed, same directory, same bytes.

The floor: one file of the checkpoint's size written in 4 MiB blocks and fsynced (what `dd
conv=fsync` measures). The trainer: `checkpoint.save` of a model's parameters and AdamW state
(safetensors, sha256 manifest, fsync, atomic rename). Interleaved rounds; reports the median ratio
disk_time / checkpoint_time (1.0 = the checkpoint writes at the disk's speed; goal >= 0.7).

The stall: as the trainer saves (rank/trainer.py), a snapshot of the state and a write in a
background thread (checkpoint.Writer) while a stand-in training loop (matmuls) goes on. `stall_s` is
how long the loop was held up per save (the snapshot and the hand-over), against `background_write_s`,
the write itself, done beside the loop (goal: the stall far below the write).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from mlx_train.config import ModelConfig
from mlx_train.rank import checkpoint
from mlx_train.rank.model import build_model
from timing import interleaved


def main(layers=8, width=512, rounds=5, where=".") -> dict:
    mx.random.seed(0)
    model, _ = build_model(ModelConfig(n_layers=layers, d_model=width, n_heads=8, seq_len=256))
    params = dict(tree_flatten(model.trainable_parameters()))
    moments = {f"{k}.{m}": v for k, v in params.items() for m in ("m", "v")}
    moments = tree_map(lambda v: v + 0, moments)
    mx.eval(params, moments)
    nbytes = sum(v.nbytes for v in params.values()) + sum(v.nbytes for v in moments.values())
    work = Path(tempfile.mkdtemp(prefix=".bench-ckpt-", dir=where))
    block = os.urandom(4 << 20)

    def disk():
        with open(work / "seq.bin", "wb") as fh:
            for _ in range(0, nbytes, len(block)):
                fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
        (work / "seq.bin").unlink()

    step = [0]

    def save():
        step[0] += 1
        checkpoint.save(work / "ckpt", step[0], params, moments, keep=1)

    try:
        r = interleaved(disk, save, rounds, 1)
        stalls, writes = background(params, moments, work / "bg", rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"bytes": nbytes, "disk_s": r["baseline_s"], "checkpoint_s": r["candidate_s"], "ratio": r["ratio"],
            "disk_mib_s": nbytes / r["baseline_s"] / 2**20, "checkpoint_mib_s": nbytes / r["candidate_s"] / 2**20,
            "stall_s": statistics.median(stalls), "background_write_s": statistics.median(writes)}


def background(params, moments, root: Path, rounds: int):
    """Per save: (seconds the loop was held up, seconds the background write took)."""
    a = mx.random.normal((256, 256))
    writer = checkpoint.Writer()
    stalls, writes = [], []
    for step in range(1, rounds + 2):  # the first round warms up
        t0 = time.perf_counter()
        snap_p, snap_m = checkpoint.snapshot(params), checkpoint.snapshot(moments)
        writer.start(lambda: checkpoint.save(root, step, snap_p, snap_m, keep=1))
        stall = time.perf_counter() - t0
        while (done := writer.finish(block=False)) is None:  # training goes on beside the write
            mx.eval(a @ a)
        if isinstance(done[0], BaseException):
            raise done[0]
        if step > 1:
            stalls.append(stall)
            writes.append(done[1])
    return stalls, writes


if __name__ == "__main__":
    print(json.dumps(main(**json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})))
