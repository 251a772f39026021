"""How one optimizer step is spread over the ranks: the one seam between this rank's gradients and
its updated parameters.

The Stepper computes this rank's gradients (micro-batches, accumulation, lanes) and hands them to
its Spread, chosen once when it is built (`choose`), in the same four calls whatever the strategy:

    held = spread.reduce(grads, loss)   communication: what this rank keeps of the summed gradients
    norm = spread.norm(held)            the global gradient norm (clipping; a non-finite step's skip)
    spread.update(held, norm)           AdamW on what this rank owns, the clipping factor folded in
    spread.publish()                    communication: every rank's parameters whole again

and, for checkpoints, the optimizer state in the unsharded layout (`full_state`, `layout`) and back
(`load`), so a checkpoint is the same files whatever wrote it and resumes under any strategy; a
save and a restore move them piece by piece (`whole_pieces`, `piece_keys`, `load_pieces`: one
piece of all in data parallel; the parameters, then each moment, at `optimizer` and `gradients`;
at `full` one group's parameters or one of its moments).

- DataParallel: today's step, bit for bit: the bucketed all_sum (`make_sync`), the norm over the
  gradient tree and AdamW per tensor; `publish` has nothing to do.
- Sharded("optimizer") (ZeRO-1) and Sharded("gradients") (ZeRO-2): the trainable parameters are
  seen as one flat buffer padded to a multiple of N; rank r owns the contiguous slice
  collectives.shard_bounds gives it and keeps AdamW's state only for that slice; the summed
  gradients reach it by reduce-scatter, the updated slices every rank by all-gather (data
  parallel's bytes).
- FullShard ("full", ZeRO-3, rank/fullshard.py): the parameters themselves are held in slices,
  one flat buffer per transformer block, gathered inside the forward and again in the backward
  (under LoRA the frozen base as well, gathered with its block, without a gradient).
  Its step holds shards, not the parameters (`own`), puts them into the model itself (`bind`),
  and gives the whole parameters only on demand (`whole_params`, a collective).

Two neighbours are not Spreads, for a reason. Unequal shares of the batch (--shares) change which
rows a rank computes, not what happens to its gradients: they live in the batcher and the loss's
token weights (rank/batcher.py, rank/balance.py) and work under every Spread. A pipeline
(rank/pipeline.py) changes the forward and backward themselves (a stage runs only its layers, with
send/recv between them), which a Spread never sees: it stands in for the whole Stepper, answering
the same calls, so the trainer's loop still does not branch on the strategy.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_train.errors import UserError
from mlx_train.rank import collectives

# One all_sum per bucket of this many bytes (mlx.nn.average_gradients packs small tensors together).
BUCKET_BYTES = 32 * 1024 * 1024
LEVELS = ("none", "optimizer", "gradients", "full")  # "full": rank/fullshard.py
_KEY = "shard"  # the sharded optimizer's one state entry: its slice of the flat buffer


class Spread:
    """The strategy's calls (see the module docstring). `scattered_bytes` and `gathered_bytes`: the
    flat buffers this rank reduce-scatters and all-gathers per step (it sends (N-1)/N of each)."""

    scattered_bytes = 0
    gathered_bytes = 0
    # Whether the forward/backward itself runs collectives (parameters gathered in it): then its
    # graphs must run on one thread (no lanes), and the model only runs on every rank together.
    collective_backward = False

    def __init__(self, level: str, optimizer: optim.Optimizer, grad_clip: float,
                 group: Optional[mx.distributed.Group], bucket_bytes: int = BUCKET_BYTES,
                 backend: Optional[str] = None):
        self.level, self.optimizer, self.grad_clip, self.group = level, optimizer, grad_clip, group
        self.world = group.size() if group is not None else 1
        self.bucket_bytes, self.backend = bucket_bytes, backend
        self.params: Any = None

    def own(self, model: Any, params: Any) -> Any:
        """What the step differentiates and updates, from the model and its whole trainable
        parameters: those parameters themselves unless they are sharded."""
        return params

    def bind(self, model: Any, params: Any, cast: Optional[Callable] = None) -> None:
        """Put `params` (own()'s tree, possibly traced) into the model before its forward."""
        model.update(tree_map(cast, params) if cast is not None else params)

    def whole_params(self) -> Any:
        """The whole trainable parameters, unsharded (a collective when sharded: every rank calls it)."""
        return self.params

    def param_layout(self) -> Any:
        """A tree shaped like whole_params(), its arrays possibly unevaluated (no collective)."""
        return self.params

    def init(self, params: Any) -> None:
        """A fresh optimizer state for `params`, the Stepper's tree (kept: updated in place)."""
        raise NotImplementedError

    def load(self, params: Any, full_state: dict) -> Any:
        """Take whole `params` and an optimizer state in the unsharded layout (a restore); return
        what the step holds of the parameters (own()'s tree)."""
        raise NotImplementedError

    def whole_pieces(self) -> Iterator[Tuple[List[tuple], List[tuple]]]:
        """The whole parameters and the optimizer state in the unsharded layout (step and
        learning_rate included), as (key, evaluated array) pairs, piece by piece, for a checkpoint:
        a caller that drops each piece before asking for the next holds one piece at a time. Here
        one piece of everything (a collective when sharded: every rank iterates it to the end)."""
        return whole_in_one(self.whole_params(), self.full_state())

    def piece_keys(self) -> List[List[str]]:
        """The checkpoint keys (the parameters' and the optimizer state's, step and learning_rate
        apart) that load_pieces takes together, piece after piece: here one piece of all."""
        return keys_in_one(self.param_layout(), self.layout())

    def load_pieces(self, pieces: Iterable[dict], extra: dict) -> Any:
        """load() from pieces: {checkpoint key: whole array} for each of piece_keys() in turn, and
        `extra` (step, learning_rate); returns what load returns. Here all joined, loaded at once."""
        return load_in_one(pieces, extra, self.param_layout(), self.layout(), self.load)

    def owned_checksum(self) -> Optional[int]:
        """The whole parameters' crc32 (keys sorted) where the step holds them in slices, from each
        owner's crcs of its own (no gather; every rank calls it); None where every rank holds a
        replica, which the trainer checksums itself so that the ranks' replicas are compared."""
        return None

    def build(self, compiled: bool) -> None:
        """(Re)trace the graphs around the current parameters and state."""
        raise NotImplementedError

    def full_state(self) -> dict:
        """The optimizer state as the unsharded optimizer holds it (a collective when sharded:
        every rank calls it)."""
        raise NotImplementedError

    def layout(self) -> dict:
        """A tree shaped like full_state(), its arrays possibly unevaluated (no collective)."""
        raise NotImplementedError

    def reduce(self, grads: Any, loss: mx.array) -> Any:
        raise NotImplementedError

    def norm(self, held: Any) -> mx.array:
        return self._norm(held)

    def update(self, held: Any, norm: mx.array) -> None:
        raise NotImplementedError

    def publish(self) -> None:
        """Nothing to do unless parameters were updated in slices."""

    def nudge(self, change: Callable[[mx.array], mx.array]) -> None:
        """Test-only (rank/inject.py's ulp switch): `change` the first leaf of what this rank's own
        update just computed, between `update` and `publish`: here every parameter, each rank its own."""
        flat = tree_flatten(self.params)
        flat[0] = (flat[0][0], change(flat[0][1]))
        _assign(self.params, tree_unflatten(flat))

    def _factor(self, norm: mx.array) -> Optional[mx.array]:
        """Clipping's factor on every gradient, or None without clipping (the same in every strategy)."""
        return mx.minimum(self.grad_clip / (norm + 1e-6), 1.0) if self.grad_clip > 0 else None

    def _adamw(self, grads: Any, norm: mx.array) -> None:
        """AdamW on the parameters this rank updates (all of them, or its slices), clipped by `norm`.
        Clipping is a factor inside each leaf's update (fused into AdamW's elementwise kernel), not
        a clipped copy of every gradient first: one pass over them fewer."""
        factor = self._factor(norm)
        if factor is not None:
            grads = tree_map(lambda g: g * factor.astype(g.dtype), grads)
        _assign(self.params, self.optimizer.apply_gradients(grads, self.params))

    def _set_graphs(self, norm: Callable, apply: Callable, compiled: bool) -> None:
        """The norm and the update as the step runs them: compiled with the parameters and the
        optimizer state as the update's state, or as plain functions."""
        if not compiled:
            self._norm, self._apply = norm, apply
            return
        state = [self.params, self.optimizer.state]
        self._norm = mx.compile(norm)
        self._apply = mx.compile(apply, inputs=state, outputs=state)


def choose(shard: str, optimizer: optim.Optimizer, grad_clip: float, group: Optional[mx.distributed.Group],
           bucket_bytes: int = BUCKET_BYTES, backend: Optional[str] = None,
           others: Optional[dict] = None) -> Spread:
    """The strategy for level `shard`; `others` maps further levels to their Spread classes (those
    built on this module, as rank/fullshard.py's: the Stepper passes them, so no import cycle)."""
    kinds = {"none": DataParallel, "optimizer": Sharded, "gradients": Sharded, **(others or {})}
    if shard not in kinds:
        raise UserError(f"unknown shard level {shard!r}: one of {', '.join(kinds)}")
    return kinds[shard](shard, optimizer, grad_clip, group, bucket_bytes, backend)


class DataParallel(Spread):
    """Every rank holds everything: the gradients all-reduced, AdamW per tensor on every rank."""

    def init(self, params: Any) -> None:
        self.params = params
        self.optimizer.init(params)

    def load(self, params: Any, full_state: dict) -> Any:
        self.params, self.optimizer.state = params, full_state
        return params

    def full_state(self) -> dict:
        return self.optimizer.state

    def layout(self) -> dict:
        return self.optimizer.state

    def build(self, compiled: bool) -> None:
        def norm(grads):
            return mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for g in _leaves(grads)))

        self._sync = make_sync(self.group, self.bucket_bytes, compiled=compiled)
        self._set_graphs(norm, self._adamw, compiled)

    def reduce(self, grads: Any, loss: mx.array) -> Any:
        if self.world == 1:
            return grads
        grads = self._sync(grads, loss)
        mx.eval(grads)
        return grads

    def update(self, held: Any, norm: mx.array) -> None:
        self._apply(held, norm)


class Sharded(Spread):
    """ZeRO-1 ("optimizer") and ZeRO-2 ("gradients") over the flat buffer of the trainable parameters.

    Both levels move what data parallel moves: the gradients are reduce-scattered (rank/collectives.py),
    so a rank holds only its slice of their sum, and the updated slices all-gathered, (N - 1)/N of
    the buffer each way, as the two halves of data parallel's all-reduce. The norm is sqrt(all_sum
    of each slice's sum of squares). Each rank updates its slice with AdamW's state for that slice
    only; AdamW is elementwise, so its update of a slice is the per-tensor update of those elements;
    the schedule and bias correction read the optimizer's one step count, as unsharded. The
    parameters stay whole (fp32 master weights on every rank, as ZeRO-1/2 keep them); what is
    spread is m and v, 8 of AdamW's 16 bytes per parameter.

    Where the levels differ is the gradients on their way to the sum. optimizer: the gradient tree
    is packed into one whole flat buffer (ZeRO-1's contiguous gradient buffer), which the
    reduce-scatter works in: a whole copy of the gradients beside the tree the backward made.
    gradients: on the ring strategy the buffer is never whole: each piece the reduce-scatter sends
    or adds is cut out of the gradient tree in its step, after the step before
    (reduce_scatter_chunks), so beyond the backward's own tree only a few pieces of a 1/N chunk and
    the summed slice exist (the same additions in the same order: the same bits as `optimizer`).
    The ring is one lazy graph (rank/ring_scatter.py), evaluated with the norm's all_sum of the
    slices' sums of squares: one evaluation, which `norm` then hands over (its all_sum reads the
    ring's result, so it runs after every send and receive). Where sum_scatter is native (NCCL,
    JACCL) or with the "all_sum" strategy, it takes the whole buffer at both levels.

    Against data parallel: with 2 ranks a sum of two terms is the same in either order, so the same
    bits unless clipping acts (the norm is summed slice by slice, not tensor by tensor); with 3 or
    more the ring adds in another order than the all-reduce: within rounding (1e-5 relative).
    """

    def init(self, params: Any) -> None:
        self._shape(params)
        self.optimizer.init({_KEY: mx.zeros((self.hi - self.lo,), self.dtype)})

    def _shape(self, params: Any) -> None:
        self.params = params
        flat = tree_flatten(params)
        dtypes = {v.dtype for _, v in flat}
        if len(dtypes) != 1:
            raise UserError(f"--shard needs the trainable parameters in one dtype, not {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop()
        self.keys = [k for k, _ in flat]
        self.shapes = [v.shape for _, v in flat]
        self.sizes = [v.size for _, v in flat]
        self.total = sum(self.sizes)
        self.padded = collectives.padded_length(self.total, self.world)
        rank = self.group.rank() if self.group is not None else 0
        self.lo, self.hi = collectives.shard_bounds(self.padded, self.world, rank)
        self.chunk = self.padded // self.world
        self._offsets = np.concatenate([[0], np.cumsum(self.sizes)]).tolist()
        self.cuts = [self._cut(*collectives.shard_bounds(self.padded, self.world, c)) for c in range(self.world)]
        self.pieces, self.pad = self.cuts[rank]
        itemsize = mx.zeros((1,), self.dtype).itemsize
        many = self.world > 1
        self.gathered_bytes = self.scattered_bytes = self.padded * itemsize if many else 0

    def _cut(self, lo: int, hi: int) -> Tuple[List[Tuple[int, int, int]], int]:
        """Elements [lo, hi) of the flat buffer as the pieces of the leaves that fall in them ((leaf
        index, start, stop) within the leaf) and the count of zeros past the last parameter."""
        offsets = self._offsets
        pieces = [(i, max(lo - a, 0), min(hi, b) - a) for i, (a, b) in
                  enumerate(zip(offsets[:-1], offsets[1:])) if a < hi and b > lo]
        return pieces, hi - max(lo, min(hi, self.total))

    def _slice(self, leaves: List[mx.array], cut: Optional[Tuple[List[Tuple[int, int, int]], int]] = None) -> mx.array:
        """This rank's slice of the flat buffer of `leaves` (in the parameters' order), or the
        elements `cut` (_cut) names."""
        pieces, pad = cut if cut is not None else (self.pieces, self.pad)
        parts = [leaves[i].reshape(-1)[a:b] for i, a, b in pieces]
        if pad:
            parts.append(mx.zeros((pad,), leaves[0].dtype if leaves else self.dtype))
        return mx.concatenate(parts) if len(parts) > 1 else parts[0]

    def _whole(self, flat: mx.array) -> List[mx.array]:
        """The leaves of a whole (gathered, padded) flat buffer, shaped as the parameters (views)."""
        offsets = np.cumsum(self.sizes)[:-1].tolist()
        return [p.reshape(s) for p, s in zip(mx.split(flat[:self.total], offsets), self.shapes)]

    def _names(self) -> List[str]:
        return sorted(self.optimizer.state[_KEY])

    def full_state(self) -> dict:
        rest = {k: v for k, v in self.optimizer.state.items() if k != _KEY}
        flat = []
        for name in self._names():
            whole = collectives.all_gather_flat(self.optimizer.state[_KEY][name], self.group) \
                if self.group is not None else self.optimizer.state[_KEY][name]
            flat += [(f"{k}.{name}", v) for k, v in zip(self.keys, self._whole(whole))]
        mx.eval([v for _, v in flat])  # here, on every rank: a gather left lazy would wait for peers forever
        return {**tree_unflatten(flat), **rest}

    def whole_pieces(self) -> Iterator[Tuple[List[tuple], List[tuple]]]:
        """The parameters (held whole: no gather), then each moment gathered on its own; last, step
        and learning_rate. A rank holds one moment whole at a time, not m and v at once."""
        yield tree_flatten(self.params), []
        for name in self._names():
            mine = self.optimizer.state[_KEY][name]
            whole = collectives.all_gather_flat(mine, self.group) if self.group is not None else mine
            pairs = [(f"{k}.{name}", v) for k, v in zip(self.keys, self._whole(whole))]
            del whole, mine
            mx.eval([v for _, v in pairs])  # on every rank: a gather left lazy would wait for peers forever
            yield [], pairs
            del pairs  # the generator's own reference would keep the moment alive through the next gather
        yield [], [(k, v) for k, v in self.optimizer.state.items() if k in ("step", "learning_rate")]

    def piece_keys(self) -> List[List[str]]:
        """The parameters, then each moment: what whole_pieces gives."""
        return [list(self.keys)] + [[f"{k}.{name}" for k in self.keys] for name in self._names()]

    def load_pieces(self, pieces: Iterable[dict], extra: dict) -> Any:
        """The parameters kept whole, each moment sliced and evaluated before the next is asked for."""
        names = self._names()
        it = iter(pieces)  # not zip or enumerate: their reused tuple would hold the previous piece
        piece = next(it)
        self._shape(tree_unflatten([(k, piece[k]) for k in self.keys]))
        del piece
        mine = {}
        for name in names:
            piece = next(it)
            # A one-row take, a new array: a slice inside one leaf is a view, which mx.contiguous
            # leaves as it is, and which would keep the whole moment alive (fullshard.Flat.slice).
            part = self._slice([piece[f"{k}.{name}"] for k in self.keys])
            mine[name] = mx.take(part.reshape(1, -1), mx.array([0]), axis=0).reshape(-1)
            mx.eval(mine[name])  # the slice alone stays: the whole moment it came from is freed
            del part
            del piece
        self.optimizer.state = {**extra, _KEY: mine}
        return self.params

    def layout(self) -> dict:
        rest = {k: v for k, v in self.optimizer.state.items() if k != _KEY}
        flat = [(f"{k}.{name}", mx.zeros(s, self.dtype)) for name in self._names()
                for k, s in zip(self.keys, self.shapes)]  # never evaluated: no memory
        return {**tree_unflatten(flat), **rest}

    def load(self, params: Any, full_state: dict) -> Any:
        self._shape(params)
        names = self._names()
        flat = dict(tree_flatten(full_state))
        mine = {name: mx.contiguous(self._slice([flat[f"{k}.{name}"] for k in self.keys])) for name in names}
        mx.eval(mine)  # the slice alone stays: the whole state it came from is freed
        rest = {k: v for k, v in full_state.items() if k in ("step", "learning_rate")}
        self.optimizer.state = {**rest, _KEY: mine}
        return params

    def build(self, compiled: bool) -> None:
        group = self.group

        def poison(grads, loss):
            # A rank whose loss is not finite poisons its smallest gradient, as make_sync does: the
            # all_sum of the slices' squares then makes the norm non-finite on every rank, and all
            # skip the step alike.
            leaves = _leaves(grads)
            i = min(range(len(leaves)), key=lambda j: leaves[j].size)
            leaves[i] = leaves[i] * mx.where(mx.isfinite(loss), 1.0, float("nan")).astype(leaves[i].dtype)
            return leaves

        def flatten(grads, loss):
            leaves = poison(grads, loss)
            extra = self.padded - self.total
            return pack(leaves + ([mx.zeros((extra,), self.dtype)] if extra else []))

        def shard_norm(shard):
            squares = mx.sum(mx.square(shard.astype(mx.float32)))
            return mx.sqrt(mx.distributed.all_sum(squares, group=group) if self.world > 1 else squares)

        def apply(grad, norm):
            factor = self._factor(norm)
            if factor is not None:
                grad = grad * factor.astype(grad.dtype)
            mine = self._slice(_leaves(self.params))
            return self.optimizer.apply_gradients({_KEY: grad}, {_KEY: mine})[_KEY]

        def gather(mine):
            whole = collectives.all_gather_flat(mine, group) if self.world > 1 else mine
            return tree_unflatten(list(zip(self.keys, self._whole(whole))))

        # The ring's pieces cut out of the gradient tree in its steps (`gradients`), or the
        # whole buffer packed first (`optimizer`; and at every level where the strategy is not
        # the ring: sum_scatter and all_sum take one whole buffer).
        self._rs_backend = None if self.backend == "any" else self.backend
        self._chunked = (self.level == "gradients" and self.world > 1
                         and collectives.choose(self._rs_backend) == "ring")
        self._cutters = {}  # (chunk, start, stop) within the chunk: the leaves it reads, its function of them
        self._held_norm = None
        self._compiled = compiled
        if not compiled:
            self._poison, self._flatten = poison, flatten
            self._norm, self._apply, self._gather = shard_norm, apply, gather
            return
        state = [self.params, self.optimizer.state]
        self._poison, self._flatten = mx.compile(poison), mx.compile(flatten)
        self._norm, self._gather = mx.compile(shard_norm), mx.compile(gather)
        self._apply = mx.compile(apply, inputs=state, outputs=[self.optimizer.state])

    def reduce(self, grads: Any, loss: mx.array) -> Any:
        lazy = collectives.choose(self._rs_backend) == "ring"  # the ring's own graph, evaluated here
        if not self._chunked:
            flat = self._flatten(grads, loss)
            if self.world == 1:
                return flat
            mine = collectives.reduce_scatter(flat, self.group, backend=self._rs_backend, lazy=lazy)
        else:
            leaves = self._poison(grads, loss)
            mine = collectives.reduce_scatter_chunks(lambda c, a, b, after: self._piece(leaves, c, a, b, after),
                                                     self.chunk, self.dtype, self.group,
                                                     backend=self._rs_backend, lazy=lazy)
        # The norm's all_sum of one scalar in the same evaluation as the reduce-scatter: one call
        # into the backend fewer that waits for every rank (norm() hands it over).
        self._held_norm = (mine, self._norm(mine))
        mx.eval(self._held_norm)
        return mine

    def norm(self, held: Any) -> mx.array:
        mine, norm = self._held_norm if self._held_norm is not None else (None, None)
        self._held_norm = None
        return norm if mine is held else self._norm(held)

    def _piece(self, leaves: List[mx.array], chunk: int, a: int, b: int, after: List[mx.array]) -> mx.array:
        """Elements [a, b) of chunk `chunk` of the gradients' flat buffer, cut out of `leaves` once
        `after` is done (only the leaves it reads wait: the ring cuts its pieces one step at a time)."""
        key = (chunk, a, b)
        if key not in self._cutters:
            cut = self._cut(chunk * self.chunk + a, chunk * self.chunk + b)
            used = sorted({i for i, _, _ in cut[0]})
            local = ([(used.index(i), lo, hi) for i, lo, hi in cut[0]], cut[1])
            fn = functools.partial(self._slice, cut=local)
            self._cutters[key] = (used, mx.compile(fn) if self._compiled else fn)
        used, fn = self._cutters[key]
        mine = [leaves[i] for i in used]
        if not after:
            return fn(mine)
        return fn(mx.depends(mine, after)) if mine else mx.depends(fn(mine), after)  # all padding: waits all the same

    def update(self, held: Any, norm: mx.array) -> None:
        self._mine = self._apply(held, norm)

    def nudge(self, change: Callable[[mx.array], mx.array]) -> None:
        """Sharded, what this rank computed is its slice alone, which publish gathers into every rank."""
        self._mine = change(self._mine)

    def publish(self) -> None:
        mine, self._mine = self._mine, None
        if mine is not None:
            _assign(self.params, self._gather(mine))
            mx.eval(self.params)


def _assign(dst: Any, src: Any) -> None:
    """Copy the leaves of tree `src` into the same places of tree `dst`, in place (a compiled
    graph's captured state is its containers, so they must be kept, not replaced)."""
    items = dst.items() if isinstance(dst, dict) else enumerate(dst)
    for key, value in list(items):
        if isinstance(value, mx.array):
            dst[key] = src[key]
        elif isinstance(value, (dict, list)) and _has(src, key):  # an empty container has no leaves to send
            _assign(value, src[key])


def _has(tree: Any, key: Any) -> bool:
    return key in tree if isinstance(tree, dict) else key < len(tree)


def make_sync(group: Optional[mx.distributed.Group], bucket_bytes: int = BUCKET_BYTES,
              compiled: bool = True) -> Callable[[Any, mx.array], Any]:
    """The gradient all-reduce as one function of (gradient tree, this rank's loss); compiled, its
    packing, all_sums and unpacking replay from C++ without rebuilding the graph in Python every step.

    A rank whose loss is not finite multiplies its smallest gradient by NaN before the sum, so every
    rank's summed gradient norm is non-finite and all skip that update together (Stepper.step).
    """
    def sync(grads, loss):
        flat = tree_flatten(grads)
        i = min(range(len(flat)), key=lambda j: flat[j][1].size)
        key, g = flat[i]
        flat[i] = (key, g * mx.where(mx.isfinite(loss), 1.0, float("nan")).astype(g.dtype))
        return sum_gradients(tree_unflatten(flat), group, bucket_bytes)

    return mx.compile(sync) if compiled else sync


def sum_gradients(grads: Any, group: mx.distributed.Group, bucket_bytes: int = BUCKET_BYTES) -> Any:
    """All-reduce (sum) a gradient tree, at most `bucket_bytes` per all_sum: small tensors packed
    together into one buffer (mlx.nn.average_gradients' idea, minus its division: the trainer's
    gradients arrive pre-scaled), a larger tensor summed in even pieces (views) and put back together."""
    flat = tree_flatten(grads)
    out: dict = {}
    bucket: List[Tuple[str, mx.array]] = []
    filled = 0

    def flush() -> None:
        if len({g.dtype for _, g in bucket}) > 1:  # mixed dtypes cannot share a buffer
            out.update((k, mx.distributed.all_sum(g, group=group)) for k, g in bucket)
        elif bucket:
            summed = mx.distributed.all_sum(pack([g for _, g in bucket]), group=group)
            out.update(zip((k for k, _ in bucket), unpack(summed, [g for _, g in bucket])))
        bucket.clear()

    for key, g in flat:
        if g.nbytes > bucket_bytes:
            whole = g.reshape(-1)
            n = -(-whole.size // -(-g.nbytes // bucket_bytes))
            pieces = [mx.distributed.all_sum(whole[i:i + n], group=group) for i in range(0, whole.size, n)]
            out[key] = mx.concatenate(pieces).reshape(g.shape)
            continue
        if filled + g.nbytes > bucket_bytes:
            flush()
            filled = 0
        bucket.append((key, g))
        filled += g.nbytes
    flush()
    return tree_unflatten([(k, out[k]) for k, _ in flat])


def whole_in_one(params: Any, state: dict) -> Iterator[Tuple[List[tuple], List[tuple]]]:
    """Spread.whole_pieces for a step that holds (or gathers) everything at once: one piece."""
    yield tree_flatten(params), tree_flatten(state)


def keys_in_one(param_layout: Any, state_layout: dict) -> List[List[str]]:
    """Spread.piece_keys of one piece: every parameter's key, then the optimizer state's."""
    return [[k for k, _ in tree_flatten(param_layout)] +
            [k for k, _ in tree_flatten(state_layout) if k not in ("step", "learning_rate")]]


def load_in_one(pieces: Iterable[dict], extra: dict, param_layout: Any, state_layout: dict,
                load: Callable[[Any, dict], Any]) -> Any:
    """Spread.load_pieces at once: the pieces joined in the layouts' order (the order the norm
    sums in), `extra` (step, learning_rate) last, handed to `load`."""
    got: dict = {}
    for piece in pieces:
        got.update(piece)
    order = [k for k, _ in tree_flatten(param_layout)]
    state_order = [k for k, _ in tree_flatten(state_layout) if k in got]
    return load(tree_unflatten([(k, got[k]) for k in order]),
                {**tree_unflatten([(k, got[k]) for k in state_order]), **extra})


def pack(arrays: List[mx.array]) -> mx.array:
    """One flat buffer holding `arrays` in order (one collective instead of one per array)."""
    return mx.concatenate([a.reshape(-1) for a in arrays])


def unpack(flat: mx.array, like: List[mx.array]) -> List[mx.array]:
    """The pieces of `flat` shaped like `like` (views, no copies)."""
    offsets = np.cumsum([a.size for a in like])[:-1].tolist()
    return [part.reshape(a.shape) for a, part in zip(like, mx.split(flat, offsets))]


def _leaves(tree) -> list:
    return [v for _, v in tree_flatten(tree)]
