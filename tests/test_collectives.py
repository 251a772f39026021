"""reduce_scatter and all_gather_flat (rank/collectives.py) on real ranks: every strategy gives this
rank's slice of the exact sum, gathering the slices gives all_sum's buffer, and the ring fed chunk
by chunk (reduce_scatter_chunks) gives the ring's bits; the ring's sub-pieces (rank/ring_scatter.py,
made small here so that the largest case has several each way) arrive in order.

One process launch per world size (ring: 2 and 3 ranks on loopback; MPI: 2 ranks under mpirun),
every case inside it: each rank rebuilds every rank's input from seeds, so it knows the exact sum,
checks its own slice and reports the errors as one JSON line; the test asserts on them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import run_ring_ranks, src_env, unavailable
from mlx_train.rank import collectives as c

TESTS = Path(__file__).resolve().parent
TIMEOUT = 240  # seconds for a whole launch: a hung collective fails the test, never waits forever


# -- the pure parts ------------------------------------------------------------------------------

def test_shard_bounds_tile_the_buffer_in_rank_order():
    assert [c.shard_bounds(12, 3, r) for r in range(3)] == [(0, 4), (4, 8), (8, 12)]
    with pytest.raises(ValueError, match="pad it"):
        c.shard_bounds(10, 3, 0)


def test_pad_flat_appends_zeros_to_a_multiple():
    import mlx.core as mx

    assert c.padded_length(10, 3) == 12 and c.padded_length(12, 3) == 12
    x = mx.arange(10, dtype=mx.bfloat16)
    p = c.pad_flat(x, 4)
    assert p.shape == (12,) and p.dtype == mx.bfloat16 and p[10:].tolist() == [0, 0]
    assert c.pad_flat(x, 5) is x


def test_auto_uses_sum_scatter_only_where_the_backend_has_it():
    assert c.choose("nccl") == c.choose("jaccl") == "native"
    assert c.choose("ring") == c.choose("mpi") == c.choose(None) == "ring"  # measured: half all_sum's time


def test_native_is_refused_without_trying_it_where_the_backend_lacks_it():
    import mlx.core as mx

    group = mx.distributed.init(backend="ring")  # no peers: size 1; the refusal comes first
    for backend in ("ring", "mpi", None):
        with pytest.raises(ValueError, match="sum_scatter is not available"):
            c.reduce_scatter(mx.zeros((4,)), group, "native", backend=backend)
    with pytest.raises(ValueError, match="unknown reduce-scatter strategy"):
        c.reduce_scatter(mx.zeros((4,)), group, "tree")


# -- real ranks ----------------------------------------------------------------------------------

def rank_main(backend: str, out_dir: str) -> None:
    """One rank: every case, its errors written as report-<rank>.json in `out_dir`."""
    import mlx.core as mx

    from mlx_train.rank import ring_scatter

    # Sub-pieces of 32 KiB: the largest case's chunks pipelined in 2-4 sub-pieces each way.
    ring_scatter.PIECE_BYTES = 1 << 15
    group = mx.distributed.init(backend=backend, strict=True)
    n, r = group.size(), group.rank()
    results = []
    cases = [(kind, dt, length) for kind in ("uniform", "integers") for dt in ("float32", "bfloat16")
             for length in (n, 7 * n, 1001, 65536 * n + 5)]
    for i, (kind, dt, length) in enumerate(cases):
        def made(k):  # rank k's input; integers in [-8, 8] sum exactly even in bfloat16
            rng = np.random.default_rng(1000 * i + k)
            v = rng.uniform(1, 10, length) if kind == "uniform" else rng.integers(-8, 9, length)
            return np.asarray(mx.array(v.astype(np.float32)).astype(getattr(mx, dt)).astype(mx.float32))

        inputs = [made(k) for k in range(n)]
        total = np.pad(np.sum(np.array(inputs, dtype=np.float64), axis=0), (0, c.padded_length(length, n) - length))
        x = c.pad_flat(mx.array(inputs[r]).astype(getattr(mx, dt)), n)
        lo, hi = c.shard_bounds(x.size, n, r)
        reduced = mx.distributed.all_sum(x, group=group)
        for how in ("ring", "all_sum", "auto"):
            mine = c.reduce_scatter(x, group, how, backend=backend)
            back = c.all_gather_flat(mine, group)
            mx.eval(mine, back, reduced)
            got = np.asarray(mine.astype(mx.float32), dtype=np.float64)
            want = total[lo:hi]
            results.append({"case": f"{kind} {dt} {length} {how}", "dtype": dt, "kind": kind,
                            "shape_ok": mine.shape == (x.size // n,) and mine.dtype == x.dtype,
                            "rel": _rel(got, want),
                            "exact": bool(np.array_equal(got, want)),
                            "gathered_rel": _rel(np.asarray(back.astype(mx.float32)),
                                                 np.asarray(reduced.astype(mx.float32))),
                            "gathered_exact": bool(mx.array_equal(back, reduced).item())})
        # The same ring, its chunks built in their rounds out of pieces (as the `gradients` level
        # cuts them out of the gradient tree): the same additions, so the ring's bits.
        k = x.size // n

        def piece(i, a, b, after):  # elements [a, b) of chunk i, put together from two parts
            lo, mid, hi = i * k + a, i * k + (a + b) // 2, i * k + b
            src = mx.depends(x, after) if after else x
            return mx.concatenate([src[lo:mid], src[mid:hi]])

        chunked = c.reduce_scatter_chunks(piece, k, x.dtype, group, backend=backend)
        ring = c.reduce_scatter(x, group, "ring", backend=backend)
        results[-1]["chunks_exact"] = bool(chunked.shape == ring.shape and mx.array_equal(chunked, ring).item())
    try:
        c.reduce_scatter(mx.zeros((n,)), group, "native", backend=backend)
        refused = False
    except ValueError:
        refused = True
    report = {"rank": r, "size": n, "native_refused": refused, "results": results}
    (Path(out_dir) / f"report-{r}.json").write_text(json.dumps(report))


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    """The largest relative error (an exact zero counts as 1: nothing else in the cases is zero
    except padding and integer sums, which must match exactly)."""
    got, want = got.astype(np.float64), want.astype(np.float64)
    return float(np.max(np.abs(got - want) / np.where(want == 0, 1.0, np.abs(want))))


def _rank_argv(backend: str, out_dir: Path) -> list:
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_collectives as t; "
            f"t.rank_main({backend!r}, {str(out_dir)!r})")
    return [sys.executable, "-c", code]


def _reports(out_dir: Path) -> list:
    return sorted((json.loads(p.read_text()) for p in out_dir.glob("report-*.json")), key=lambda rep: rep["rank"])


def _run_ring(n: int, tmp_path: Path) -> list:
    return run_ring_ranks(n, "test_collectives", ("ring", tmp_path), tmp_path, TIMEOUT)


def _check(reports: list, n: int) -> None:
    assert [rep["rank"] for rep in reports] == list(range(n)) and all(rep["size"] == n for rep in reports)
    for rep in reports:
        assert rep["native_refused"]
        for res in rep["results"]:
            where = f"rank {rep['rank']} of {n}: {res['case']}"
            assert res["shape_ok"], where
            assert res.get("chunks_exact", True), f"{where}: reduce_scatter_chunks is not the ring's bits"
            if res["kind"] == "integers":  # every partial sum is exact: any order of adding gives the same bits
                assert res["exact"] and res["gathered_exact"], where
            else:  # float32: a few ulps; bfloat16: each addition rounds to 8 bits, both sides
                tol = 1e-6 if res["dtype"] == "float32" else 2 ** -8 * (n - 1)
                assert res["rel"] <= tol, f"{where}: relative error {res['rel']:.3g}"
                assert res["gathered_rel"] <= 2 * tol, f"{where}: gathered vs all_sum {res['gathered_rel']:.3g}"


@pytest.mark.multiproc
@pytest.mark.parametrize("n", [2, 3])
def test_every_strategy_gives_the_slice_of_the_exact_sum_on_ring(n, tmp_path):
    _check(_run_ring(n, tmp_path), n)


@pytest.mark.multiproc
def test_every_strategy_gives_the_slice_of_the_exact_sum_under_mpi(tmp_path):
    if shutil.which("mpirun") is None:
        unavailable("OpenMPI's mpirun is not installed")
    from mlx_train.fleet import mpi

    env = {**mpi.env_here(), "PYTHONPATH": src_env()["PYTHONPATH"]}
    res = subprocess.run(["mpirun", "--oversubscribe", "-np", "2", *mpi.forward(env), *_rank_argv("mpi", tmp_path)],
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _check(_reports(tmp_path), 2)
