"""A ring reduce-scatter that stays lazy: one graph, no evaluation per round.

rank/collectives.py's ring evaluates each round on its own, because a receive has no inputs: MLX
places an array without inputs in its evaluation wherever its consumers put it, so two rounds'
receives in one graph could run in either order and a later one take an earlier one's bytes.
Inside a backward (fullshard's gather vjp) no evaluation can happen, so here the order is made by
the graph. MLX 0.32's eval builds its tape from the outputs back (transforms.cpp eval_impl): an
array joins the tape only when every array that consumes it has been visited, and the tape runs
from its end, so an array runs before its consumers and, of two receives, the one whose consumer
is reached later from the outputs runs first. Round s's sum is `received + own chunk`, and that
own chunk is made to depend (mx.depends) on round s - 1's result and its send: round s - 1's
receive is then reachable only through round s's sum, so it runs first. On one stream (MPI) the
rank's parity orders a round's send and receive, as collectives.py's ring does (the even send
first; the odd receive first: its send takes the received array as a dependency), so that no two
neighbours wait on each other.

On the ring backend sends and receives run on two CPU streams of their own (each is a thread),
so a round's outgoing and incoming chunks travel at once. MPI is initialised without thread
support: there everything runs on the default stream. Each rank moves (N - 1)/N of the buffer,
half of an all_sum's 2 (N - 1)/N. A receive also waits, on its stream, behind an op that waits
for the buffer: queued early, it would otherwise run while the forward's all_gather is still on
the same sockets. The caller orders the whole against its other collectives (fullshard: through
the cotangents): two of these left unordered in one graph would share the streams in any order.

Belongs in rank/collectives.py beside its evaluated ring, once that module is free to change.

The result is this rank's slice, `collectives.shard_bounds`, of the sum of every rank's `x`: the
last round's sum, a new array (not a view of `x`). Three ranks sum in another order than the
backend's all_sum (rounding); two ranks add the same two numbers, the same bits.
"""

from __future__ import annotations

import mlx.core as mx

# The backends whose send/recv this runs on (neighbours only is enough: a ring).
BACKENDS = frozenset({"ring", "mpi"})

_STREAMS = None


def _streams():
    """The send and receive streams (made once, on the thread that first traces a ring)."""
    global _STREAMS
    if _STREAMS is None:
        _STREAMS = (mx.new_thread_local_stream(mx.cpu), mx.new_thread_local_stream(mx.cpu))
    return _STREAMS


def sum_scatter(x: mx.array, group: mx.distributed.Group, duplex: bool) -> mx.array:
    """This rank's slice of the sum over `group` of `x` (flat, its length a multiple of the group's
    size), lazy. `duplex`: sends and receives on two streams of their own (the ring backend);
    else on the default stream in the parity order (MPI)."""
    n, r = group.size(), group.rank()
    if n == 1:
        return x
    chunk = x.size // n
    right, left = (r + 1) % n, (r - 1) % n
    rows = x.reshape(n, chunk)
    # Each own chunk a copy (a one-row take), not a view: a sum may take an input's buffer over,
    # and a view's buffer is the whole cotangent, which the result would then keep to the update.
    piece = lambda i: mx.take(rows, mx.array([i % n]), axis=0).reshape(-1)  # noqa: E731
    send_stream, recv_stream = _streams() if duplex else (None, None)
    receive_first = not duplex and r % 2 == 1
    # Round s sends the partial sum of chunk r - s - 1 (its own copy at s = 0) and receives that of
    # chunk r - s - 2, which has then passed through s + 1 ranks; after N - 1 rounds the chunk
    # received is chunk r, through all N.
    outgoing = piece(r - 1)
    for s in range(n - 1):
        # The receive stream runs its work in order: the receive waits behind an op on it that
        # waits for what was sent before (`x` itself, then the previous round's sum), so it cannot
        # take the bytes of a collective that runs before this one on another stream (the
        # forward's all_gather, still on the wire when the cotangent's first op is queued; measured:
        # 3 ranks, 4 MB chunks, hung without it). A reshape to another shape: to its own shape it
        # is the array itself, no op on the stream.
        gate = mx.reshape(outgoing, (1, chunk), stream=recv_stream) if duplex else outgoing
        got = mx.distributed.recv((chunk,), x.dtype, left, group=group, stream=recv_stream)
        if receive_first:
            outgoing = mx.depends(outgoing, got)
        sent = mx.distributed.send(outgoing, right, group=group, stream=send_stream)
        # The own chunk waits for this round's send and the previous round's sum: the order of
        # the receives (the module's docstring), and every send in the graph.
        outgoing = got + mx.depends(piece(r - s - 2), [sent, outgoing, gate])
    return outgoing
