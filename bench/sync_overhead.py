"""Gradient sync: the trainer's compiled, bucketed all-reduce vs one all_sum of a single buffer of the
same bytes, 2 ranks on the ring backend over loopback (each rank is a separate process).

Interleaved ABAB per round; reports rank 0's median ratio single_buffer_time / trainer_sync_time
(1.0 = sync costs no more than the ideal single all-reduce; goal >= 0.9). Run by bench/run.py.
"""

from __future__ import annotations

import json
import os
import sys


def rank_main(width: int, layers: int, rounds: int, reps: int) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    from mlx_train.config import ModelConfig
    from mlx_train.rank.model import build_model
    from mlx_train.rank import blas
    from mlx_train.rank.step import all_sum_bytes, make_sync
    from timing import interleaved

    group = mx.distributed.init(backend="ring", strict=True)
    mx.random.seed(0)
    model, _ = build_model(ModelConfig(n_layers=layers, d_model=width, n_heads=4, seq_len=128))
    grads = tree_map(lambda p: mx.random.normal(p.shape), model.trainable_parameters())
    mx.eval(grads)
    nbytes = sum(v.nbytes for _, v in tree_flatten(grads))
    flat = mx.random.normal((nbytes // 4,))
    mx.eval(flat)

    # the trainer's own (compiled) all-reduce, with the bucket size a rank of this host gets
    sync = make_sync(group, all_sum_bytes("ring", group.size(), blas.cores_of_rank(), nbytes))
    loss = mx.array(2.5)

    def trainer_sync():
        mx.eval(sync(grads, loss))

    def single():  # the floor: one all_sum, no packing and no averaging
        mx.eval(mx.distributed.all_sum(flat, group=group))

    r = interleaved(single, trainer_sync, rounds, reps)
    if group.rank() == 0:
        print(json.dumps({"grad_bytes": nbytes, "tensors": len(tree_flatten(grads)), "trainer_sync_s": r["candidate_s"],
                          "single_all_sum_s": r["baseline_s"], "ratio": r["ratio"]}))


def main(width=128, layers=4, rounds=15, reps=30) -> dict:
    from ring import run_ranks

    args = json.dumps({"width": width, "layers": layers, "rounds": rounds, "reps": reps})
    return run_ranks([sys.executable, __file__, "--rank", args], 2, dict(os.environ), "sync bench", timeout=600)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--rank":
        rank_main(**json.loads(sys.argv[2]))
    else:
        print(json.dumps(main(**json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})))
