"""Reduce-scatter on every backend, and its inverse: the two collectives a sharded step needs.

MLX 0.32 has `mx.distributed.sum_scatter` only on NCCL and JACCL: the ring backend raises "[ring]
sum_scatter not supported", MPI does not implement it, and an MLX issue reports the ring's hanging
on some versions. So it is chosen by the backend's name, never by trying it. Elsewhere it is built
from what the backend has:

- "ring": N - 1 rounds; in each, a rank sends one chunk to r + 1 and receives one from r - 1 (the
  only peers the ring backend reaches), adding its own copy of the chunk it received. Each rank
  moves (N - 1)/N of the buffer. Built in one lazy graph by rank/ring_scatter.py (the one ring
  implementation, which fullshard's backward uses too): no evaluation per round. On the ring
  backend, from 3 ranks on, half of each chunk goes the other way round (to r - 1, from r + 1), as
  the backend's own all_sum and all_gather split theirs, each way's half in a few sub-pieces passed
  on as they arrive (pipelined); sends and receives run on streams of their own (each CPU stream is
  a thread), so they all travel at once. The buffer may also be given piece by piece
  (reduce_scatter_chunks), never whole. MPI is initialised without thread support (MPI_Init): there
  sends and receives share the default stream, in an order that alternates with the rank's parity
  so that no two neighbours wait on each other.
- "all_sum": one all_sum of the whole buffer, then this rank's slice: 2 (N - 1)/N of the buffer
  on the wire, twice the ring's, in one call to the backend's own pipelined all-reduce.

"auto" takes sum_scatter where the backend has it, else "ring", which bench/reduce_scatter.py
found the faster in all but one case (docs/sharding.md; 2 and 3 ranks, 1, 4 and 16 MiB of float32,
time over one all_sum of the same buffer, medians; measured with the ring's rounds evaluated one at
a time, before it became one graph):
- the 3-host test fleet, ring backend, each host's link limited by tc tbf: ring 0.34-0.51 at
  1 Gbit/s, 0.41-0.54 at 200 Mbit/s, moving (N - 1)/N of the buffer at 0.56-0.85 and 0.16-0.20
  Gbit/s (the wire, less TCP's and the rounds' overhead); "all_sum" 0.91-1.03 of one all_sum.
- loopback, ranks sharing 2 busy cores (load 8), ring backend: ring 0.06-0.59; MPI over TCP:
  ring 0.19-0.76 except 1 MiB on 3 ranks (ring 1.10, "all_sum" 0.67: 2.7 against 1.7 ms).

A collective cannot be bounded from inside: an evaluation here waits as long as the backend does.
The bound is outside the rank (the supervisor's progress watchdog kills a rank that stops moving),
as for every all_sum of the step.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx

from mlx_train.rank import ring_scatter

# Backends whose sum_scatter exists (MLX 0.32.1+): it is one collective of (N - 1)/N of the bytes.
NATIVE_BACKENDS = frozenset({"nccl", "jaccl"})
STRATEGIES = ("native", "ring", "all_sum")


def has_sum_scatter(backend: Optional[str]) -> bool:
    return backend in NATIVE_BACKENDS


def padded_length(n: int, parts: int) -> int:
    """The least multiple of `parts` that holds `n` elements."""
    return -(-n // parts) * parts


def pad_flat(x: mx.array, parts: int) -> mx.array:
    """`x` (1-D) with zeros appended up to a multiple of `parts`; `x` itself when it is one."""
    extra = padded_length(x.size, parts) - x.size
    return x if extra == 0 else mx.concatenate([x, mx.zeros((extra,), dtype=x.dtype)])


def shard_bounds(length: int, parts: int, rank: int) -> Tuple[int, int]:
    """[start, stop) of rank `rank`'s slice of a flat buffer of `length` (a multiple of `parts`)."""
    if length % parts:
        raise ValueError(f"a flat buffer of {length} elements does not split in {parts} equal shards: pad it")
    chunk = length // parts
    return rank * chunk, (rank + 1) * chunk


def choose(backend: Optional[str]) -> str:
    """The strategy "auto" runs on `backend` (measured: see the module's docstring)."""
    return "native" if has_sum_scatter(backend) else "ring"


def reduce_scatter(x: mx.array, group: mx.distributed.Group, how: str = "auto", *,
                   backend: Optional[str] = None, lazy: bool = False) -> mx.array:
    """This rank's slice (`shard_bounds`) of the sum of every rank's `x`, a flat 1-D array whose
    length divides by the group's size. `backend` is the name the group was made with ("ring",
    "mpi", "nccl", "jaccl"); unknown (None), only "ring" and "all_sum" run. The result is lazy
    for "native" and "all_sum"; "ring" returns it evaluated unless `lazy` (then the caller evaluates
    it, with what it adds, before any other collective: its receives take the next bytes on their
    sockets)."""
    if x.ndim != 1:
        raise ValueError(f"reduce_scatter takes a flat 1-D buffer, not shape {x.shape}")
    n, r = group.size(), group.rank()
    lo, hi = shard_bounds(x.size, n, r)
    how = choose(backend) if how == "auto" else how
    if how not in STRATEGIES:
        raise ValueError(f"unknown reduce-scatter strategy {how!r} (one of auto, {', '.join(STRATEGIES)})")
    if how == "native" and not has_sum_scatter(backend):
        # Never tried: on ring it raises at best and hangs the group at worst.
        raise ValueError(f"sum_scatter is not available on the {backend or 'unnamed'} backend "
                         f"(only {', '.join(sorted(NATIVE_BACKENDS))}): use how='ring' or 'all_sum'")
    if n == 1:
        return x
    if how == "native":
        return mx.distributed.sum_scatter(x, group=group)
    if how == "all_sum":
        return mx.distributed.all_sum(x, group=group)[lo:hi]
    mine = ring_scatter.ring(ring_scatter.of_buffer(x, n), x.size // n, x.dtype, group, duplex=backend == "ring")
    return mine if lazy else _evaluated(mine)


def reduce_scatter_chunks(chunk: ring_scatter.Piece, size: int, dtype: mx.Dtype, group: mx.distributed.Group, *,
                          backend: Optional[str] = None, lazy: bool = False) -> mx.array:
    """reduce_scatter("ring") of a flat buffer that is never whole: `chunk(i, a, b, after)` builds
    elements [a, b) of chunk i (the buffer's elements [i * size + a, i * size + b)) of this rank's
    buffer, lazily, its computation waiting for the arrays `after` (mx.depends on its inputs): the
    ring asks for each piece in the step that adds it, after the step before, so at most a few
    pieces exist at once, and cutting one (a copy out of the gradient tree) runs beside the
    sends and receives in flight. The same steps and the same additions as reduce_scatter(x,
    how="ring") of the whole buffer: the same bits. Evaluated, as "ring" is, unless `lazy`."""
    if group.size() == 1:
        return chunk(0, 0, size, [])
    mine = ring_scatter.ring(chunk, size, dtype, group, duplex=backend == "ring")
    return mine if lazy else _evaluated(mine)


def _evaluated(x: mx.array) -> mx.array:
    # Here, on every rank: a ring left lazy holds receives that wait for peers forever if another
    # collective is evaluated first.
    mx.eval(x)
    return x


def all_gather_flat(shard: mx.array, group: mx.distributed.Group) -> mx.array:
    """Every rank's `shard` (1-D, the same length everywhere) concatenated in rank order: the
    inverse of reduce_scatter's split. Lazy."""
    if shard.ndim != 1:
        raise ValueError(f"all_gather_flat takes a flat 1-D shard, not shape {shard.shape}")
    if group.size() == 1:
        return shard
    return mx.distributed.all_gather(shard, group=group)
