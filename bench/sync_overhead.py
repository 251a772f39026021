"""Gradient sync: the trainer's compiled, bucketed all-reduce vs the fastest way MLX offers to
all-reduce the same bytes, 2 ranks on the ring backend over loopback (each rank is a separate process).

The floor is not one way but the fastest of those MLX offers, timed in the same rounds: one all_sum
of one flat buffer of the gradient's bytes; that buffer in 2, 4 or 8 equal all_sums; in pieces small
enough that the ring sends each in one direction only (rank/step.py all_sum_bytes); and
mlx.nn.average_gradients on the gradient tree with its default 32 MiB buckets and with smaller ones.
Reports rank 0's median per-round ratio floor_time / trainer_sync_time (1.0 = the sync costs no more
than the fastest of them; goal >= 0.9), which way was the floor, and every way's time. Run by bench/run.py.
"""

from __future__ import annotations

import json
import os
import sys


def ways(flat, grads, group, one_direction: int) -> dict:
    """Each way MLX offers to all-reduce the gradient's bytes, by name (each evaluates its result)."""
    import mlx.core as mx
    import mlx.nn as nn

    def pieces(n: int):
        def run():
            mx.eval([mx.distributed.all_sum(flat[i:i + n], group=group) for i in range(0, flat.size, n)])
        return run

    def average(bucket: int):
        return lambda: mx.eval(nn.average_gradients(grads, group, all_reduce_size=bucket))

    out = {"one all_sum of one buffer": lambda: mx.eval(mx.distributed.all_sum(flat, group=group))}
    out.update({f"{k} all_sums of 1/{k} each": pieces(-(-flat.size // k)) for k in (2, 4, 8)})
    out[f"one-direction all_sums of {one_direction} bytes"] = pieces(one_direction // flat.itemsize)
    for bucket in (32 << 20, 4 << 20):
        out[f"nn.average_gradients, {bucket >> 20} MiB buckets"] = average(bucket)
    out[f"nn.average_gradients, one-direction buckets ({one_direction} bytes)"] = average(one_direction)
    return out


def rank_main(width: int, layers: int, rounds: int, reps: int) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    from mlx_train.config import ModelConfig
    from mlx_train.rank.model import build_model
    from mlx_train.rank import blas
    from mlx_train.rank.step import all_sum_bytes, make_sync
    from timing import fastest_baseline

    group = mx.distributed.init(backend="ring", strict=True)
    mx.random.seed(0)
    model, _ = build_model(ModelConfig(n_layers=layers, d_model=width, n_heads=4, seq_len=128))
    grads = tree_map(lambda p: mx.random.normal(p.shape), model.trainable_parameters())
    mx.eval(grads)
    nbytes = sum(v.nbytes for _, v in tree_flatten(grads))
    flat = mx.random.normal((nbytes // 4,))
    mx.eval(flat)

    # the trainer's own (compiled) all-reduce, with the bucket size a rank of this host gets
    bucket = all_sum_bytes("ring", group.size(), blas.cores_of_rank(), nbytes)
    sync = make_sync(group, bucket)
    loss = mx.array(2.5)

    def trainer_sync():
        mx.eval(sync(grads, loss))

    one_direction = all_sum_bytes("ring", group.size(), 1, 0)
    r = fastest_baseline(ways(flat, grads, group, one_direction), trainer_sync, rounds, reps)
    if group.rank() == 0:
        print(json.dumps({"grad_bytes": nbytes, "tensors": len(tree_flatten(grads)), "trainer_bucket_bytes": bucket,
                          "trainer_sync_s": r["candidate_s"], "floor": r["baseline"], "floor_s": r["baseline_s"],
                          "ways_s": r["baselines_s"], "ratio": r["ratio"]}))


def main(width=128, layers=4, rounds=15, reps=30) -> dict:
    from ring import run_ranks

    args = json.dumps({"width": width, "layers": layers, "rounds": rounds, "reps": reps})
    return run_ranks([sys.executable, __file__, "--rank", args], 2, dict(os.environ), "sync bench", timeout=600)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--rank":
        rank_main(**json.loads(sys.argv[2]))
    else:
        print(json.dumps(main(**json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})))
