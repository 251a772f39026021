"""Reduce-scatter on every backend, and its inverse: the two collectives a sharded step needs.

MLX 0.32 has `mx.distributed.sum_scatter` only on NCCL and JACCL: the ring backend raises "[ring]
sum_scatter not supported", MPI does not implement it, and an MLX issue reports the ring's hanging
on some versions. So it is chosen by the backend's name, never by trying it. Elsewhere it is built
from what the backend has:

- "ring": N - 1 rounds; in each, a rank sends one chunk to r + 1 and receives one from r - 1 (the
  only peers the ring backend reaches), adding its own copy of the chunk it received. Each rank
  moves (N - 1)/N of the buffer. On the ring backend, from 3 ranks on, half of each chunk goes
  the other way round (to r - 1, from r + 1), as the backend's own all_sum and all_gather split
  theirs; each send and receive of a round runs on a stream of its own (each CPU stream is a
  thread; the backend's socket threads do the I/O), so they all travel at once. The buffer may
  also be given piece by piece (reduce_scatter_chunks), never whole. MPI is initialised without thread
  support (MPI_Init), so there a round is two evaluations, send and receive in an order that
  alternates with the rank's parity so that no two neighbours wait on each other.
- "all_sum": one all_sum of the whole buffer, then this rank's slice: 2 (N - 1)/N of the buffer
  on the wire, twice the ring's, in one call to the backend's own pipelined all-reduce.

"auto" takes sum_scatter where the backend has it, else "ring", which bench/reduce_scatter.py
found the faster in all but one case (docs/sharding.md; 2 and 3 ranks, 1, 4 and 16 MiB of float32,
time over one all_sum of the same buffer, medians):
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

from typing import Callable, Optional, Tuple

import mlx.core as mx

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
                   backend: Optional[str] = None) -> mx.array:
    """This rank's slice (`shard_bounds`) of the sum of every rank's `x`, a flat 1-D array whose
    length divides by the group's size. `backend` is the name the group was made with ("ring",
    "mpi", "nccl", "jaccl"); unknown (None), only "ring" and "all_sum" run. The result is lazy
    for "native" and "all_sum"; "ring" returns it evaluated, a round being at least one
    evaluation (a receive takes the next bytes on its socket: rounds must not be reordered)."""
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
    chunk = x.size // n
    return _ring(lambda i, a, b: x[i * chunk + a:i * chunk + b], chunk, x.dtype, group, duplex=backend == "ring")


def reduce_scatter_chunks(chunk: Callable[[int, int, int], mx.array], size: int, dtype: mx.Dtype,
                          group: mx.distributed.Group, *, backend: Optional[str] = None) -> mx.array:
    """reduce_scatter("ring") of a flat buffer that is never whole: `chunk(i, a, b)` builds
    elements [a, b) of chunk i (the buffer's elements [i * size + a, i * size + b)) of this rank's
    buffer, lazily, and the ring asks for each piece in the round that adds it, so at most a
    round's few pieces exist at once, and building one (a copy out of the gradient tree) runs
    beside that round's sends and receives. The same rounds and the same additions as
    reduce_scatter(x, how="ring") of the whole buffer: the same bits. Evaluated, as "ring" is."""
    if group.size() == 1:
        return chunk(0, 0, size)
    return _ring(chunk, size, dtype, group, duplex=backend == "ring")


def _ring(piece: Callable[[int, int, int], mx.array], chunk: int, dtype: mx.Dtype, group: mx.distributed.Group,
          duplex: bool) -> mx.array:
    n, r = group.size(), group.rank()
    if not duplex:
        return _ring_alternating(lambda i: piece(i % n, 0, chunk), chunk, dtype, group)
    # The ring backend's all_sum and all_gather run half their bytes each way round the ring: so
    # does this, from 3 ranks on (with 2 both ways are the same one socket pair). In direction d,
    # round s sends the partial sum of chunk r - d(s + 1) (its own copy at s = 0) to r + d and
    # receives that of chunk r - d(s + 2) from r - d, which has then passed through s + 1 ranks;
    # after N - 1 rounds the chunk received is chunk r, through all N. Each send and receive has
    # a stream (a thread) of its own, so all four travel at once.
    # One evaluation per round: a receive has no inputs to order it by, and MLX may schedule
    # a later round's receive first, which would take this round's bytes.
    ways = [(1, 0, chunk)] if n == 2 or chunk < 2 else [(1, 0, chunk // 2), (-1, chunk // 2, chunk)]
    streams = _streams()
    outgoing = [piece((r - d) % n, a, b) for d, a, b in ways]
    for s in range(n - 1):
        sent = []
        for k, (d, a, b) in enumerate(ways):
            sent.append(mx.distributed.send(outgoing[k], (r + d) % n, group=group, stream=streams[2 * k]))
            got = mx.distributed.recv((b - a,), dtype, (r - d) % n, group=group, stream=streams[2 * k + 1])
            outgoing[k] = got + piece((r - d * (s + 2)) % n, a, b)
        mx.eval(sent, outgoing)
    if len(outgoing) == 1:
        return outgoing[0]
    mine = mx.concatenate(outgoing)
    mx.eval(mine)
    return mine


def _ring_alternating(piece: Callable[[int], mx.array], chunk: int, dtype: mx.Dtype,
                      group: mx.distributed.Group) -> mx.array:
    """One way round the ring, a round's send and receive in two evaluations (MPI)."""
    n, r = group.size(), group.rank()
    right, left = (r + 1) % n, (r - 1) % n
    outgoing = piece(r - 1)
    for s in range(n - 1):
        if r % 2 == 0:
            mx.eval(mx.distributed.send(outgoing, right, group=group))
            got = mx.distributed.recv((chunk,), dtype, left, group=group)
        else:
            got = mx.distributed.recv((chunk,), dtype, left, group=group)
            mx.eval(got)
            mx.eval(mx.distributed.send(outgoing, right, group=group))
        outgoing = got + piece(r - s - 2)
        mx.eval(outgoing)
    return outgoing


_STREAMS = None


def _streams():
    """The ring rounds' streams, a send's and a receive's for each way round: made once, each
    thread gets its own."""
    global _STREAMS
    if _STREAMS is None:
        _STREAMS = tuple(mx.new_thread_local_stream(mx.cpu) for _ in range(4))
    return _STREAMS


def all_gather_flat(shard: mx.array, group: mx.distributed.Group) -> mx.array:
    """Every rank's `shard` (1-D, the same length everywhere) concatenated in rank order: the
    inverse of reduce_scatter's split. Lazy."""
    if shard.ndim != 1:
        raise ValueError(f"all_gather_flat takes a flat 1-D shard, not shape {shard.shape}")
    if group.size() == 1:
        return shard
    return mx.distributed.all_gather(shard, group=group)
