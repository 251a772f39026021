"""Can MLX overlap the gradient all-reduce with compute? 2 ranks on the ring backend over loopback.

Three ways to run the same optimizer step (fresh copies of one model, interleaved rounds):
  phased    the trainer's Stepper: compute, all-reduce and update as three evaluated graphs;
  fused     one compiled graph: backward, one all_sum per bucket on the default stream, update;
  overlap   the same graph with each 1 MiB bucket's all_sum on a separate CPU stream (MLX runs each
            stream on its own thread, so a bucket can be summed while the backward goes on).
Prints rank 0's median milliseconds per step and the phased step's compute and comm times.
`make bench` runs it (a row of the README table; docs/performance.md has the fleet figures); alone:
    PYTHONPATH=src python bench/overlap.py '{"width": 256}'
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def rank_main(width: int, batch: int, rounds: int, bucket_mib: int) -> None:
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_train.config import ModelConfig, OptimConfig
    from mlx_train.rank.model import build_model
    from mlx_train.rank.step import Stepper, _assign, make_optimizer, pack, unpack

    group = mx.distributed.init(backend="ring", strict=True)
    cfg = ModelConfig(n_layers=4, d_model=width, n_heads=4, seq_len=128)
    rng = np.random.default_rng(group.rank())
    x, y = (mx.array(rng.integers(0, 256, (batch, 128)).astype(np.int32)) for _ in range(2))

    def stepper():
        mx.random.seed(0)
        model, loss = build_model(cfg)
        return Stepper(model, loss, make_optimizer(OptimConfig(), 1000), "fp32", 1.0, group)

    def fused(st, stream, bucket_bytes):
        def step(x, y, scale):
            loss, grads = st.grad_fn(st.params, x, y, scale)
            flat = tree_flatten(grads)[::-1]  # the last layers' gradients exist first
            out, bucket, size = [], [], 0
            for i, (k, g) in enumerate(flat):
                bucket.append((k, g))
                size += g.nbytes
                if size >= bucket_bytes or i == len(flat) - 1:
                    summed = mx.distributed.all_sum(pack([g for _, g in bucket]), group=group, stream=stream)
                    out += list(zip([k for k, _ in bucket], unpack(summed, [g for _, g in bucket])))
                    bucket, size = [], 0
            grads, norm = optim.clip_grad_norm(tree_unflatten(out), 1.0)
            _assign(st.params, st.optimizer.apply_gradients(grads, st.params))
            return loss, norm

        state = [st.params, st.optimizer.state, mx.random.state]
        compiled, scale = mx.compile(step, inputs=state, outputs=state), mx.array(1.0 / group.size())

        def run():
            loss, norm = compiled(x, y, scale)
            mx.eval(state, loss, norm)
            loss.item()
        return run

    phased_stepper, stats = stepper(), []
    variants = {"phased": lambda: stats.append(phased_stepper.step([(x, y)])),
                "fused": fused(stepper(), None, 32 << 20),
                "overlap": fused(stepper(), mx.new_stream(mx.cpu), bucket_mib << 20)}
    times = {k: [] for k in variants}
    for fn in variants.values():
        fn()
    for _ in range(rounds):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(3):
                fn()
            times[k].append((time.perf_counter() - t0) / 3)
    out = {f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()}
    out["phased_compute_ms"] = statistics.median(s.compute_s for s in stats) * 1e3
    out["phased_comm_ms"] = statistics.median(s.comm_s for s in stats) * 1e3
    out["grad_mib"] = sum(v.nbytes for _, v in tree_flatten(phased_stepper.params)) / 2**20
    if group.rank() == 0:
        print(json.dumps(out))


def main(width=256, batch=4, rounds=7, bucket_mib=1) -> dict:
    from ring import run_ranks
    from mlx_train.rank import blas

    args = json.dumps({"width": width, "batch": batch, "rounds": rounds, "bucket_mib": bucket_mib})
    return run_ranks([sys.executable, __file__, "--rank", args], 2, {**os.environ, **blas.rank_env(ranks_on_host=2)},
                     "overlap bench")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--rank":
        rank_main(**json.loads(sys.argv[2]))
    else:
        print(json.dumps(main(**json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})))
