"""How close MemoryOptimizer's predicted peak is to MLX's measured peak of a real training step.

Each grid point runs in a fresh Python process (so no allocator state leaks between points):
build the built-in GPT, a Stepper with make_optimizer, run one step, clear the buffer cache,
reset the peak counter, run the measured step and report `mx.get_peak_memory()`.

    python bench/memory_accuracy.py            # run the grid, print the table, update the docs
    python bench/memory_accuracy.py --no-docs  # print only

Debian's OpenBLAS is preloaded when present: it makes fp32 matmuls ~30x faster on the CPU build
and leaves the measured peaks unchanged (checked: identical bytes with and without it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
DOC = REPO / "docs" / "memory_optimization.md"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
START, END = "<!-- accuracy:start -->", "<!-- accuracy:end -->"
TOLERANCE = 0.15


class Point(NamedTuple):
    layers: int
    width: int
    heads: int
    seq: int
    batch: int
    checkpointing: bool
    precision: str
    accumulation: int = 1
    vocab: int = 256

    def label(self) -> str:
        return (f"L{self.layers} d{self.width} h{self.heads} T{self.seq} B{self.batch}"
                f"{' x' + str(self.accumulation) if self.accumulation > 1 else ''} {self.precision}"
                f"{' ckpt' if self.checkpointing else ''}{' V' + str(self.vocab) if self.vocab != 256 else ''}")


# Varies depth, width, heads, sequence, batch, checkpointing, precision and accumulation; bf16
# points stay small because bf16 matmuls do not use BLAS on the CPU build.
GRID = [
    Point(2, 64, 2, 64, 4, False, "fp32"),
    Point(4, 128, 4, 128, 8, False, "fp32"),
    Point(4, 128, 4, 128, 8, True, "fp32"),
    Point(6, 256, 4, 256, 8, False, "fp32"),
    Point(6, 256, 4, 256, 8, True, "fp32"),
    Point(2, 256, 8, 128, 16, False, "fp32"),
    Point(3, 192, 3, 192, 4, False, "fp32", accumulation=4),
    Point(4, 128, 2, 256, 2, True, "fp32", accumulation=2),
    Point(5, 160, 5, 96, 6, False, "fp32", accumulation=3),
    Point(2, 64, 1, 256, 16, True, "fp32"),
    Point(6, 256, 8, 64, 1, False, "fp32"),
    Point(2, 128, 4, 128, 4, False, "bf16"),
    Point(2, 128, 4, 128, 4, True, "bf16"),
    Point(4, 64, 2, 256, 8, False, "bf16", accumulation=2),
    Point(3, 256, 4, 64, 2, False, "bf16"),
    Point(2, 128, 2, 64, 2, True, "bf16", accumulation=2, vocab=1024),
    Point(4, 512, 8, 512, 4, False, "fp32"),
    Point(4, 512, 8, 512, 4, True, "fp32"),
    Point(2, 1024, 16, 128, 4, False, "fp32", vocab=8192),
    Point(8, 384, 6, 384, 2, False, "fp32", accumulation=2),
]


def measure_here(p: Point) -> int:
    """Peak bytes of one real training step with `p`, in this process."""
    import mlx.core as mx
    import numpy as np

    from mlx_train.config import ModelConfig, OptimConfig
    from mlx_train.rank.model import build_model
    from mlx_train.rank.step import Stepper, make_optimizer

    cfg = ModelConfig(n_layers=p.layers, d_model=p.width, n_heads=p.heads, seq_len=p.seq, vocab_size=p.vocab)
    mx.random.seed(0)
    model, loss_fn = build_model(cfg, grad_checkpoint=p.checkpointing)
    stepper = Stepper(model, loss_fn, make_optimizer(OptimConfig(), 100), p.precision, OptimConfig().grad_clip)
    rng = np.random.default_rng(0)

    def micro_batches():
        return [(rng.integers(0, p.vocab, (p.batch, p.seq), dtype=np.int32),
                 rng.integers(0, p.vocab, (p.batch, p.seq), dtype=np.int32)) for _ in range(p.accumulation)]

    stepper.step(micro_batches())  # creates the optimizer state
    mx.clear_cache()
    mx.reset_peak_memory()
    stepper.step(micro_batches())
    return int(mx.get_peak_memory())


def measure(p: Point, openblas: bool = True) -> int:
    """`measure_here` in a fresh interpreter."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if openblas and os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = OPENBLAS
        env.setdefault("OPENBLAS_NUM_THREADS", "1")  # two points run side by side
    out = subprocess.run([sys.executable, __file__, "--measure", json.dumps(p._asdict())],
                         capture_output=True, text=True, env=env, timeout=600)
    if out.returncode:
        raise RuntimeError(f"measuring {p.label()} failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])


def predict(p: Point) -> int:
    from mlx_train.planning.memory import ModelShape, step_memory

    shape = ModelShape(p.layers, p.width, p.heads, p.seq, p.vocab)
    return step_memory(shape, p.batch, p.accumulation, p.checkpointing, p.precision).peak


def params_only(p: Point) -> int:
    """The usual back-of-envelope: weights + gradients + AdamW's two moments, all fp32."""
    from mlx_train.planning.memory import ModelShape

    return 16 * ModelShape(p.layers, p.width, p.heads, p.seq, p.vocab).n_params


def run_grid(points=GRID, workers: int = 2) -> list:
    with ThreadPoolExecutor(workers) as pool:
        measured = list(pool.map(measure, points))
    rows = []
    for p, m in zip(points, measured):
        pred, naive = predict(p), params_only(p)
        rows.append(dict(point=p, measured=m, predicted=pred, error=(pred - m) / m,
                         naive=naive, naive_error=(naive - m) / m))
    return rows


def table(rows: list) -> str:
    mib = lambda b: f"{b / 2**20:.1f}"
    lines = ["| config | predicted MiB | measured MiB | error | params-only MiB | params-only error |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['point'].label()} | {mib(r['predicted'])} | {mib(r['measured'])} | "
                     f"{r['error']:+.1%} | {mib(r['naive'])} | {r['naive_error']:+.1%} |")
    worst = max(abs(r["error"]) for r in rows)
    lines.append("")
    lines.append(f"Worst error {worst:.1%} over {len(rows)} configurations (bound: {TOLERANCE:.0%}); "
                 f"params-only worst {max(abs(r['naive_error']) for r in rows):.1%}.")
    return "\n".join(lines)


def write_doc(text: str, doc: Path = DOC) -> None:
    body = doc.read_text()
    if START not in body or END not in body:
        raise SystemExit(f"{doc} has no {START} ... {END} markers")
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{text}\n{END}", body, flags=re.S)
    doc.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--no-docs", action="store_true", help="print the table without updating the docs")
    args = ap.parse_args()
    if args.measure:
        print(measure_here(Point(**json.loads(args.measure))))
        return
    t0 = time.perf_counter()
    rows = run_grid()
    text = table(rows)
    import mlx.core as mx

    text += (f"\n\nMeasured with mlx {mx.__version__} (CPU build), {time.perf_counter() - t0:.0f} s for the grid: "
             "`python bench/memory_accuracy.py`.")
    print(text)
    if not args.no_docs:
        write_doc(text)
    if max(abs(r["error"]) for r in rows) > TOLERANCE:
        sys.exit(1)


if __name__ == "__main__":
    main()
