"""The matmul peak of this host as MLX sees it (float32, the BLAS in this process): the best
GFLOP/s over square sizes, the denominator of model FLOPs utilization."""

from __future__ import annotations

import json
import time

import mlx.core as mx

from mlx_train.rank import blas


def main(sizes=(512, 1024, 2048), reps=5) -> dict:
    best = 0.0
    for n in sizes:
        a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
        mx.eval(a @ b)
        t0 = time.perf_counter()
        for _ in range(reps):
            mx.eval(a @ b)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return {"peak_flops": best, "blas": blas.in_use()}


if __name__ == "__main__":
    print(json.dumps(main()))
