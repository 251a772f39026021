"""Checkpoint write speed vs the disk's own sequential write speed, same directory, same bytes.

The floor: one file of the checkpoint's size written in 4 MiB blocks and fsynced (what `dd
conv=fsync` measures). The trainer: `checkpoint.save` of a model's parameters and AdamW state
(safetensors, sha256 manifest, fsync, atomic rename). Interleaved rounds; reports the median ratio
disk_time / checkpoint_time (1.0 = the checkpoint writes at the disk's speed; goal >= 0.7).

The stall: a short real run, `mlx-train train --devices 2` with a checkpoint every few steps. Each
`checkpoint` event in its events.jsonl carries `stall_s` (how long rank 0's training loop was held up:
every parameter's CRC32, the ranks' all_gather of those checksums, the wait for the previous write
if it is still going, the snapshot and the hand-over) and `write_s` (the write itself, in the
background). The last checkpoint is left out: the run waits for its write before it exits, so its
stall is the write. Reports the medians (goal: the stall far below the write).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from mlx_train.config import ModelConfig
from mlx_train.rank import checkpoint
from mlx_train.rank.model import build_model
from timing import interleaved


def main(layers=8, width=512, rounds=5, where=".", run_steps=10, every=2) -> dict:
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
        stall = real_run(layers, width, run_steps, every, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"bytes": nbytes, "disk_s": r["baseline_s"], "checkpoint_s": r["candidate_s"], "ratio": r["ratio"],
            "disk_mib_s": nbytes / r["baseline_s"] / 2**20, "checkpoint_mib_s": nbytes / r["candidate_s"] / 2**20,
            **stall}


def real_run(layers: int, width: int, steps: int, every: int, where: Path) -> dict:
    """Checkpoint stalls and writes of a real 2-rank `mlx-train train` run (its events.jsonl)."""
    run = where / "run"
    argv = [sys.executable, "-m", "mlx_train.cli", "train", "--devices", "2", "--layers", str(layers), "--width",
            str(width), "--heads", "8", "--seq-len", "64", "--batch-size", "2", "--steps", str(steps),
            "--checkpoint-every", str(every), "--keep-checkpoints", "1", "--eval-every", "100000",
            "--log-every", "1", "--run-dir", str(run), "--no-live"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=os.environ)
    if proc.returncode:
        raise SystemExit(f"checkpoint run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]
    saves = [e for e in events if e["event"] == "checkpoint" and e["step"] < steps]
    if len(saves) < 2:
        raise SystemExit(f"checkpoint run: {len(saves)} checkpoint events before the last step")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    newest = max((run / "checkpoints").iterdir())
    return {"run_stall_s": statistics.median(e["stall_s"] for e in saves),
            "run_write_s": statistics.median(e["write_s"] for e in saves),
            "run_stalls_s": [e["stall_s"] for e in saves], "run_writes_s": [e["write_s"] for e in saves],
            "run_step_s": statistics.median(m["step_time_s"] for m in metrics[1:]),
            "run_bytes": sum(f.stat().st_size for f in newest.glob("*.safetensors")),
            "run": f"mlx-train train --devices 2 --layers {layers} --width {width} --seq-len 64 --batch-size 2 "
                   f"--steps {steps} --checkpoint-every {every}"}


if __name__ == "__main__":
    print(json.dumps(main(**json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})))
