"""The `full` level's reduce-scatter on ring (rank/ring_scatter.py): a ring of send/recv inside the
backward's one lazy graph, (N - 1)/N of the bytes.

Three ranks of MLX's ring on loopback, one launch. Each rank differentiates, compiled, a function of
an all_gather (fullshard's gather, whose vjp is the reduce-scatter) many times, once with the ring's
vjp and once with the all_sum's, and compares the gradients: the receives of N - 1 rounds in one
graph must run in order and after the forward's all_gather (a receive has no inputs: a misplaced one
takes another collective's bytes, a wrong sum or a hang), so the steps alternate a buffer whose 4 MB
chunks are still on the wire when the backward starts (hung before the receive was gated) with
small, padded ones. A third rank sums in another order than the all_sum: within float rounding.
The training itself (loss and parameters against data parallel, 2 and 3 ranks) is
tests/test_sharding.py's `full` cases, which run this reduce-scatter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_ring_ranks

SIZES = (3_000_001, 1_000, 7)  # elements of each flat buffer before padding to a multiple of 3
STEPS = 9
TIMEOUT = 240


def rank_main(out_dir: str) -> None:
    import mlx.core as mx

    from mlx_train.rank import collectives, fullshard

    group = mx.distributed.init(backend="ring", strict=True)
    n, r = group.size(), group.rank()
    flats = []
    for size in SIZES:
        padded = collectives.padded_length(size, n)
        lo, hi = collectives.shard_bounds(padded, n, r)
        flats.append((padded, hi - lo, fullshard._gatherer(group, lo, hi, fullshard.RING, duplex=True),
                      fullshard._gatherer(group, lo, hi, fullshard.ALL_SUM)))

    def graphs(k: int, which: int):
        padded, _, *gathers = flats[k]

        def loss(shard, w):  # each rank's own function of the whole: the cotangents differ by rank
            return mx.sum(mx.sin(gathers[which](shard) * w[:padded]) * (r + 1.5))
        return mx.compile(mx.grad(loss))

    ring, all_sum = ([graphs(k, which) for k in range(len(SIZES))] for which in (0, 1))
    worst = 0.0
    for step in range(STEPS):
        k = step % len(SIZES)
        mx.random.seed(step * n + r)
        shard, w = mx.random.normal((flats[k][1],)), mx.random.normal((flats[k][0],))
        mine = ring[k](shard, w)
        mx.eval(mine)
        theirs = all_sum[k](shard, w)
        mx.eval(theirs)
        worst = max(worst, (mx.max(mx.abs(mine - theirs)) / mx.max(mx.abs(theirs))).item())
    Path(out_dir, f"report-{r}.json").write_text(json.dumps({"rank": r, "worst": worst}))


@pytest.mark.multiproc
def test_the_ring_reduce_scatter_in_the_backward_gives_the_all_sums_slice(tmp_path):
    reports = run_ring_ranks(3, "test_fullshard_scatter", (tmp_path,), tmp_path, TIMEOUT)
    assert [rep["rank"] for rep in reports] == [0, 1, 2]
    for rep in reports:
        assert rep["worst"] <= 1e-6, f"rank {rep['rank']}: the ring's gradient off the all_sum's by {rep['worst']:.3g}"
