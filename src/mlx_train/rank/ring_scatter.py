"""The ring reduce-scatter, built from send/recv inside one lazy graph: no evaluation per round.

The one implementation of the ring: rank/collectives.py's "ring" strategy (the `optimizer` and
`gradients` levels: `ring`, evaluated there) and fullshard's gather vjp (`sum_scatter`, left lazy
inside the backward, where no evaluation can happen) both build it here.

A receive has no inputs: MLX places an array without inputs in its evaluation wherever its
consumers put it, so two receives in one graph could run in either order and a later one take an
earlier one's bytes. Here the order is made by the graph. MLX 0.32's eval builds its tape from the
outputs back (transforms.cpp eval_impl): an array joins the tape only when every array that consumes
it has been visited, and the tape runs from its end, so an array runs before its consumers and, of
two receives, the one whose consumer is reached later from the outputs runs first. Each step's sum
is `received + own piece`, and that own piece is made to depend (mx.depends, on its inputs) on the
previous step's sum and on its own step's send: the previous step's receive is then reachable only
through this step's sum, so it runs first, and every send is reachable from the result. On one
stream (MPI) the rank's parity orders a round's send and receive (the even send first; the odd
receive first: its send takes the received array as a dependency), so that no two neighbours wait
on each other.

On the ring backend sends and receives run on CPU streams of their own (each is a thread: the
backend's socket threads do the I/O), a send stream and a receive stream for each way round the
ring, so outgoing and incoming bytes travel at once. MPI is initialised without thread support:
there everything runs on the default stream, one way round, one piece per round.

Pipelined, on the ring backend (`ring(..., pieces=True)`): as MLX's own all_sum does, from 3 ranks
half of each chunk goes the other way round the ring (to r - 1, from r + 1), and each way's half is
cut in a few sub-pieces (`PIECE_BYTES` each, at most `MAX_PIECES`): a sub-piece's partial sum is sent
on as soon as it is received and added, while the next sub-piece is still arriving, so the link
does not idle while a round's last bytes are added. Only the first receive of each way is gated (it
waits, on its stream, behind an op that waits for the buffer: queued early, it would otherwise run
while a collective before this one, such as the forward's all_gather, is still on the same sockets);
the receives after it follow it on the stream, in order. The own pieces wait for the previous step's
sum, so they are cut out of their source (a gradient tree) one step at a time, never all at once.

Each rank moves (N - 1)/N of the buffer, half of an all_sum's 2 (N - 1)/N. The caller orders the
whole against its other collectives (fullshard: through the cotangents): two of these left unordered
in one graph would share the streams in any order.

The result is this rank's slice, `collectives.shard_bounds`, of the sum of every rank's buffer, a new
array (not a view of it). Three ranks sum in another order than the backend's all_sum (rounding); two
ranks add the same two numbers, the same bits.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx

# The backends whose send/recv this runs on (neighbours only is enough: a ring).
BACKENDS = frozenset({"ring", "mpi"})
# Sub-pieces of each way's share of a chunk (pipelining, ring backend only): a piece small enough
# that the next is on the wire while one is added, large enough that the per-op cost stays small.
PIECE_BYTES = 1 << 20
MAX_PIECES = 4

# (chunk index, start, stop within the chunk, arrays its computation must wait for) -> those
# elements of this rank's buffer, as a new array.
Piece = Callable[[int, int, int, List[mx.array]], mx.array]

_STREAMS = None


def _streams():
    """Each way's send and receive streams (made once, on the thread that first traces a ring)."""
    global _STREAMS
    if _STREAMS is None:
        _STREAMS = tuple(mx.new_thread_local_stream(mx.cpu) for _ in range(4))
    return _STREAMS


def sum_scatter(x: mx.array, group: mx.distributed.Group, duplex: bool) -> mx.array:
    """This rank's slice of the sum over `group` of `x` (flat, its length a multiple of the group's
    size), lazy: one way round the ring, one piece per round (fullshard's backward, whose memory
    model counts its copies). `duplex`: sends and receives on streams of their own (ring backend)."""
    n = group.size()
    if n == 1:
        return x
    return ring(of_buffer(x, n), x.size // n, x.dtype, group, duplex, pieces=False)


def of_buffer(x: mx.array, n: int) -> Piece:
    """The pieces of a whole flat buffer `x` of n chunks, each a copy (a one-row take), not a view:
    a sum may take an input's buffer over, and a view's buffer is the whole `x`, which the result
    would then keep."""
    chunk = x.size // n

    def piece(i: int, a: int, b: int, after: List[mx.array]) -> mx.array:
        rows = (mx.depends(x, after) if after else x).reshape(n, chunk)[:, a:b]
        return mx.take(rows, mx.array([i]), axis=0).reshape(-1)

    return piece


def ring(piece: Piece, chunk: int, dtype: mx.Dtype, group: mx.distributed.Group, duplex: bool,
         pieces: bool = True) -> mx.array:
    """This rank's chunk (r) of the sum over `group` of every rank's buffer of n chunks of `chunk`
    elements, whose elements `piece` builds; lazy. `duplex`: the ring backend (streams of their
    own); `pieces`: there, both ways round and in sub-pieces (the module's docstring)."""
    n, r = group.size(), group.rank()
    if n == 1:
        return piece(0, 0, chunk, [])
    itemsize = mx.zeros((1,), dtype).itemsize
    if duplex and pieces and n > 2 and chunk >= 2:
        ways = [(1, 0, chunk // 2), (-1, chunk // 2, chunk)]
    else:
        ways = [(1, 0, chunk)]
    streams = _streams() if duplex else (None,) * 4
    out: List[mx.array] = []
    for w, (d, a, b) in enumerate(ways):
        count = max(1, min(MAX_PIECES, -(-(b - a) * itemsize // PIECE_BYTES))) if duplex and pieces else 1
        bounds = [(a + (b - a) * k // count, a + (b - a) * (k + 1) // count) for k in range(count)]
        out += _one_way(piece, d, [(lo, hi) for lo, hi in bounds if hi > lo], dtype, group,
                        streams[2 * w], streams[2 * w + 1], receive_first=not duplex and r % 2 == 1)
    return out[0] if len(out) == 1 else mx.concatenate(out)


def _one_way(piece: Piece, d: int, bounds: Sequence[Tuple[int, int]], dtype: mx.Dtype,
             group: mx.distributed.Group, send_stream: Optional[mx.Stream], recv_stream: Optional[mx.Stream],
             receive_first: bool) -> List[mx.array]:
    """Direction d (+1: to r + 1, from r - 1) of the ring over elements `bounds` of each chunk.
    Round s sends the partial sum of chunk r - d(s + 1) (its own copy at s = 0) and receives that of
    chunk r - d(s + 2), which has then passed through s + 1 ranks; after N - 1 rounds the chunk
    received is chunk r, through all N. The steps, (round, sub-piece) in order, form one chain."""
    n, r = group.size(), group.rank()
    right, left = (r + d) % n, (r - d) % n
    outgoing = [piece((r - d) % n, lo, hi, []) for lo, hi in bounds]
    last = None  # the previous step's sum
    for s in range(n - 1):
        for j, (lo, hi) in enumerate(bounds):
            after = []
            if last is None:
                # The first receive waits, on its stream (which runs its work in order), behind an
                # op that waits for the buffer (a reshape to another shape: to its own shape it is
                # the array itself, no op on the stream); measured: 3 ranks, 4 MB chunks after a
                # forward all_gather, hung without it. MPI's one stream orders it already.
                if send_stream is not None:
                    after.append(mx.reshape(outgoing[j], (1, hi - lo), stream=recv_stream))
            else:
                after.append(last)
            got = mx.distributed.recv((hi - lo,), dtype, left, group=group, stream=recv_stream)
            if receive_first:
                outgoing[j] = mx.depends(outgoing[j], got)
            after.append(mx.distributed.send(outgoing[j], right, group=group, stream=send_stream))
            outgoing[j] = last = got + piece((r - d * (s + 2)) % n, lo, hi, after)
    return outgoing
