"""ZeRO-3 / FSDP's full shard over any backend: the parameters themselves held in slices.

The trainable parameters fall into groups: one per transformer block (the model's `blocks`, or
mlx-lm's `layers`), and one of everything else (embeddings, final norm, head). Each group is a
flat fp32 buffer padded to a multiple of N; rank r holds only its contiguous slice of each
(collectives.shard_bounds), and AdamW's m and v for that slice: 16/N bytes per parameter at rest.

The step differentiates the slices. Each block is replaced in its list by a wrapper (`_Gathered`)
whose call gathers the block's buffer (mx.distributed.all_gather), shapes it into the block's
tensors, casts them to the compute dtype, runs the block, and is wrapped whole in mx.checkpoint:
the gathered weights are not kept for the backward, which gathers them again (FSDP's second
gather), so at most one block is whole at a time (plus the other group, gathered once per
forward). The gather's vjp is the reduce-scatter of the cotangent: MLX's own all_gather vjp keeps
the own slice of the own cotangent, no sum (checked on 0.32.4), so a custom one sums. On ring and
MPI it is a ring of send/recv held in the backward's lazy graph (rank/ring_scatter.py: its
receives ordered by dependencies, since a receive has no inputs), (N-1)/N of the bytes; where the
backend has sum_scatter (NCCL, JACCL) that one collective; on a backend of unknown name this
rank's slice of an all_sum, 2(N-1)/N (`scatter_of`, by the backend's name). The order of every
collective against the others (the ring's two streams run beside the default one) is the
wrapper's: each block's gathers wait for what comes before them, and the cotangent it passes on
for its reduce-scatter. The gradients arrive already summed over the ranks, one slice per group:
the norm is sqrt(all_sum of each slice's sum of squares), AdamW updates the slices, and nothing is
gathered after the update (the next forward does).

Under LoRA/DoRA/QLoRA the frozen base is held in slices too: each group's frozen leaves are one
flat buffer per dtype (a quantized base's packed uint32 weights apart from its float scales and
biases), sliced as the trainable ones, gathered with them (the block's inside its call, the rest's
in `bind`) and passed through stop_gradient: no gradient, so nothing to reduce-scatter, and no
cast (the base keeps its own dtype, as unsharded). A block with nothing to train (--lora-layers
fewer than the blocks) has only its base gathered. The adapters are the trainable groups, as for a
full fine-tune; checkpoints and adapters hold them alone, as unsharded.

Checkpoints keep the unsharded layout, so a checkpoint resumes at any level and world size, and
move it a piece at a time (one group's parameters, or one of its moments): `whole_pieces` gathers
them one by one for a save, `load_pieces` slices them one by one at a restore, so no rank holds
the whole at once, rank 0 included (it streams the files a piece at a time, rank/checkpoint.py).
`whole_params`, `full_state` and `load` still gather or slice everything at once, but neither a
save nor a checksum calls them: the log steps' checksum combines each owner's crcs of its own
slices (`owned_checksum`). The gathers in the forward are fp32 (the master weights; cast after),
so the arithmetic of a bf16 step is data parallel's: the bf16 gradients come back through the
cast in fp32 and are summed in fp32, as data parallel's all-reduce sums them.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_train.errors import UserError
from mlx_train.rank import checkpoint, collectives, ring_scatter
from mlx_train.rank.spread import Spread, _leaves

REST = "rest"  # the group of the parameters outside the blocks
BLOCKS = "blocks"
# How a trainable group's gradient is reduce-scattered (scatter_of): the backend's sum_scatter, a
# ring of send/recv inside the backward's graph (ring_scatter.py), or one all_sum keeping a slice.
SUM_SCATTER, RING, ALL_SUM = "sum_scatter", "ring", "all_sum"


class Flat:
    """One group's parameters as a flat buffer padded to a multiple of the world size, and this
    rank's [lo, hi) slice of it; `keys` name the leaves (in order) relative to `prefix`."""

    def __init__(self, prefix: str, leaves: List[tuple], world: int, rank: int,
                 group: Optional[mx.distributed.Group], scatter: Optional[str] = ALL_SUM,
                 backend: Optional[str] = None):
        self.prefix, self.group, self.world = prefix, group, world
        self.keys = [k for k, _ in leaves]
        self.shapes = [v.shape for _, v in leaves]
        self.sizes = [v.size for _, v in leaves]
        dtypes = {v.dtype for _, v in leaves}
        if len(dtypes) != 1:
            raise UserError(f"--shard full needs the trainable parameters in one dtype, not {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop()
        self.total = sum(self.sizes)
        self.padded = collectives.padded_length(self.total, world)
        self.lo, self.hi = collectives.shard_bounds(self.padded, world, rank)
        self.nbytes = self.padded * self.dtype.size
        # scatter None: a frozen group (a LoRA base), gathered with no gradient to send back.
        self.scatter = scatter
        if world == 1:
            self.gather = (lambda s: s) if scatter else mx.stop_gradient
        elif scatter is None:
            self.gather = lambda s: mx.stop_gradient(mx.distributed.all_gather(s, group=group))
        else:
            self.gather = _gatherer(group, self.lo, self.hi, scatter, duplex=backend == "ring")

    @property
    def full_keys(self) -> List[str]:
        return [f"{self.prefix}{k}" for k in self.keys]

    def slice(self, leaves: List[mx.array]) -> mx.array:
        """This rank's slice of the flat buffer of whole `leaves` (a copy: the whole can be freed).
        A one-row take, as in the gather's vjp: mx.contiguous of a slice that is already
        contiguous is the view itself, which keeps the whole buffer alive (measured: a frozen
        base's slices, never replaced by an update, held the whole base)."""
        flat = mx.concatenate([v.reshape(-1) for v in leaves] +
                              ([mx.zeros((self.padded - self.total,), self.dtype)] if self.padded > self.total else []))
        chunk = self.hi - self.lo
        return mx.take(flat.reshape(-1, chunk), mx.array([self.lo // chunk]), axis=0).reshape(-1)

    def whole(self, flat: mx.array) -> List[mx.array]:
        """The leaves of a whole (gathered, padded) flat buffer, shaped as the parameters (views)."""
        offsets = np.cumsum(self.sizes)[:-1].tolist()
        return [p.reshape(s) for p, s in zip(mx.split(flat[:self.total], offsets), self.shapes)]

    def gathered(self, shard: mx.array) -> List[mx.array]:
        """The whole leaves from this rank's slice, outside a gradient (all_gather_flat)."""
        return self.whole(collectives.all_gather_flat(shard, self.group) if self.world > 1 else shard)

    def pairs(self, shard: mx.array, cast: Optional[Callable]) -> List[tuple]:
        """(relative key, whole leaf) of the group, gathered through its gather (gradient-aware
        when trainable); `cast` (the compute dtype) only for trainable groups: a frozen base
        keeps its own dtype, as unsharded."""
        leaves = self.whole(self.gather(shard))
        if cast is not None and self.scatter is not None:
            leaves = [cast(v) for v in leaves]
        return list(zip(self.keys, leaves))

    def blank(self) -> List[tuple]:
        return [(k, mx.zeros((0,), self.dtype)) for k in self.keys]


def scatter_of(backend: Optional[str]) -> str:
    """How the gather's vjp reduce-scatters on `backend` (the name the group was made with):
    the backend's own sum_scatter where it has one (NCCL, JACCL); on ring and MPI a ring of
    send/recv in the backward's graph ((N - 1)/N of the bytes, rank/ring_scatter.py); else an
    all_sum keeping this rank's slice. Chosen by name, never by trying it (rank/collectives.py:
    sum_scatter on ring raises at best and hangs at worst); an unknown name ("any", None) takes
    the all_sum, which runs everywhere."""
    if collectives.has_sum_scatter(backend):
        return SUM_SCATTER
    return RING if backend in ring_scatter.BACKENDS else ALL_SUM


def _frozen_flats(prefix: str, leaves: List[tuple], world: int, rank: int,
                  group: Optional[mx.distributed.Group]) -> List[Flat]:
    """The frozen leaves of a group as one Flat per dtype (a quantized base mixes packed uint32
    weights with float scales and biases), in the order the dtypes first appear."""
    by_dtype: dict = {}
    for k, v in leaves:
        by_dtype.setdefault(v.dtype, []).append((k, v))
    return [Flat(prefix, part, world, rank, group, scatter=None) for part in by_dtype.values()]


def _gatherer(group: mx.distributed.Group, lo: int, hi: int, scatter: str,
              duplex: bool = False) -> Callable[[mx.array], mx.array]:
    """all_gather whose vjp is the reduce-scatter of the cotangent: the backend's sum_scatter
    (`scatter` SUM_SCATTER), a ring of send/recv (RING; `duplex`: on the ring backend, sends and
    receives on streams of their own), or this rank's slice of its all_sum (ALL_SUM)."""
    @mx.custom_function
    def gather(shard):
        return mx.distributed.all_gather(shard, group=group)

    @gather.vjp
    def gather_vjp(primals, cotangent, output):
        # A new array, not a view: a view keeps the whole summed buffer alive until the update (a
        # whole model's gradients again), and so, compiled, does an elementwise copy (it takes the
        # view's buffer over) or a sum over a length-1 axis. A gather of one row allocates its own.
        if scatter == SUM_SCATTER:
            return (mx.distributed.sum_scatter(cotangent, group=group),)  # a new array of the slice alone
        if scatter == RING:
            return (ring_scatter.sum_scatter(cotangent, group, duplex),)  # the last round's sum: a new array
        summed = mx.distributed.all_sum(cotangent, group=group).reshape(-1, hi - lo)
        return (mx.take(summed, mx.array([lo // (hi - lo)]), axis=0).reshape(-1),)

    return gather


class _Gathered(nn.Module):
    """A block whose weights are gathered from this rank's slices at each call, inside gradient
    checkpointing: its trainable ones (`flat`, None when it has none, as a block --lora-layers
    leaves unadapted) through the gradient-aware gather, its frozen ones (`frozen`, a LoRA base,
    one Flat per dtype, their slices `frozen_shards`) with no gradient. The block stays a child
    (train/eval reach it) with its parameters frozen and blanked between calls: they live in the
    slices."""

    def __init__(self, block: nn.Module, flat: Optional[Flat], frozen: List[Flat], frozen_shards: List[mx.array]):
        super().__init__()
        self.block = block
        object.__setattr__(self, "_flat", flat)
        object.__setattr__(self, "_frozen", list(zip(frozen, frozen_shards)))
        object.__setattr__(self, "_bound", (None, None))
        blank = (flat.blank() if flat is not None else []) + [p for f in frozen for p in f.blank()]
        object.__setattr__(self, "_blank", tree_unflatten(blank))
        block.update(self._blank)
        block.freeze()

    def bind(self, shard: Optional[mx.array], cast: Optional[Callable]) -> None:
        object.__setattr__(self, "_bound", (shard, cast))

    def __getattr__(self, key: str):
        # The model may read its blocks' attributes (mlx-lm's `use_sliding`, ...): the block's.
        try:
            return super().__getattr__(key)
        except AttributeError:
            if "block" not in self:
                raise
            return getattr(self["block"], key)

    def __call__(self, x, *args, **kwargs):
        shard, cast = self._bound
        flat, frozen, block, blank = self._flat, self._frozen, self.block, self._blank
        if flat is not None and shard is None:
            raise RuntimeError("a fully sharded block called before its slice was bound (Spread.bind)")

        def run(shard, x, after):
            # The frozen slices' gathers wait for `after` as the trainable one does (see below).
            pairs = flat.pairs(shard, cast) if flat is not None else []
            for f, s in frozen:
                pairs += f.pairs(mx.depends(s, after), None)
            block.update(tree_unflatten(pairs))
            out = block(x, *args, **kwargs)
            block.update(blank)  # no reference to the gathered weights outlives the call
            return out

        # Gradient checkpointing by hand (mx.checkpoint's recompute, plus order): a gather has no
        # input but the slice, so MLX would run every block's gather first and hold the whole
        # model at once. The forward's gathers wait for the block's input, the backward's for
        # the block's cotangent, and the cotangent passed on waits for the block's gradient sum.
        # The primals are [shard, x], or [x] for a block with nothing to train.
        @mx.custom_function
        def gathered_block(primals):
            if flat is None:
                return run(None, primals[0], primals[0])
            shard, x = primals
            return run(mx.depends(shard, x), x, x)

        @gathered_block.vjp
        def gathered_block_vjp(primals, cotangent, output):
            if flat is None:
                _, (d_x,) = mx.vjp(lambda x: run(None, x, cotangent), [primals[0]], [cotangent])
                return [d_x]
            shard, x = primals
            _, (d_shard, d_x) = mx.vjp(lambda s, x: run(s, x, cotangent), [mx.depends(shard, cotangent), x],
                                       [cotangent])
            return [d_shard, mx.depends(d_x, d_shard)]

        return gathered_block([x] if flat is None else [shard, x])


def _held(flat: Flat, whole: dict) -> mx.array:
    """This rank's slice of a frozen group, evaluated, so the whole leaves it came from can go."""
    shard = flat.slice([whole[k] for k in flat.full_keys])
    mx.eval(shard)
    return shard


def _block_list(model: nn.Module) -> list:
    for name in ("blocks", "layers"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, list) and blocks and all(isinstance(b, nn.Module) for b in blocks):
            return blocks
    raise UserError(f"--shard full gathers parameters block by block: {type(model).__name__} has no list of "
                    "blocks as `blocks` or `layers`; use --shard gradients")


class FullShard(Spread):
    """ZeRO-3 (see the module docstring). Its step holds {"blocks": [slice, ...], "rest": slice}."""

    collective_backward = True

    def own(self, model: nn.Module, params: Any) -> Any:
        rank = self.group.rank() if self.group is not None else 0
        whole = tree_flatten(params)
        self.order = [k for k, _ in whole]  # the model's own key order, for checkpoints and checksums
        trainable = set(self.order)
        # The frozen parameters (a LoRA/DoRA/QLoRA base; none in a full fine-tune) are held in
        # slices too, and gathered with the block they belong to.
        frozen = [(k, v) for k, v in tree_flatten(model.parameters()) if k not in trainable]
        self.scatter = scatter_of(self.backend)
        blocks = _block_list(model)
        names = {id(m): name for name, m in model.named_modules()}
        self.flats: List[Flat] = []  # the trainable groups of the blocks that have some, in order
        index: List[Optional[int]] = []  # each block's index in self.flats, or None
        block_frozen: List[List[Flat]] = []
        inside = set()
        for block in blocks:
            prefix = names[id(block)] + "."
            leaves = [(k[len(prefix):], v) for k, v in whole if k.startswith(prefix)]
            fixed = [(k[len(prefix):], v) for k, v in frozen if k.startswith(prefix)]
            if not leaves and not fixed:
                raise UserError(f"--shard full: block {prefix[:-1]} has no parameters")
            inside.update(prefix + k for k, _ in leaves + fixed)
            index.append(len(self.flats) if leaves else None)
            if leaves:
                self.flats.append(Flat(prefix, leaves, self.world, rank, self.group, self.scatter, self.backend))
            block_frozen.append(_frozen_flats(prefix, fixed, self.world, rank, self.group))
        if not self.flats:
            raise UserError("--shard full: no block has trainable parameters (--lora-layers 0?)")
        rest = [(k, v) for k, v in whole if k not in inside]
        self.rest = Flat("", rest, self.world, rank, self.group, self.scatter, self.backend) if rest else None
        self.rest_frozen = _frozen_flats("", [(k, v) for k, v in frozen if k not in inside], self.world, rank,
                                         self.group)
        frozen_whole = dict(frozen)
        self.frozen_shards = [_held(f, frozen_whole) for f in self.rest_frozen]
        frozen_shards = [[_held(f, frozen_whole) for f in fs] for fs in block_frozen]
        # Gathered bytes per step: each block twice (forward, and again in the backward), the rest
        # once; scattered: every trainable group's gradient once per micro-batch (frozen: none).
        many = self.world > 1
        block_bytes = sum(f.nbytes for f in self.flats)
        frozen_block_bytes = sum(f.nbytes for fs in block_frozen for f in fs)
        rest_bytes = self.rest.nbytes if self.rest else 0
        frozen_rest_bytes = sum(f.nbytes for f in self.rest_frozen)
        self.gathered_bytes = 2 * (block_bytes + frozen_block_bytes) + rest_bytes + frozen_rest_bytes if many else 0
        self.scattered_bytes = block_bytes + rest_bytes if many else 0
        # What this rank holds of the frozen parameters between steps (their slices).
        self.frozen_held_bytes = sum(s.nbytes for s in self.frozen_shards) + \
            sum(s.nbytes for ss in frozen_shards for s in ss)
        shards = self._slices(dict(whole))
        for i, block in enumerate(blocks):
            flat = self.flats[index[i]] if index[i] is not None else None
            blocks[i] = _Gathered(block, flat, block_frozen[i], frozen_shards[i])
        blank = (self.rest.blank() if self.rest else []) + [p for f in self.rest_frozen for p in f.blank()]
        if blank:
            model.update(tree_unflatten(blank))
        self.wrappers = list(blocks)
        self.index = index
        return shards

    def _slices(self, whole: dict) -> dict:
        out = {BLOCKS: [f.slice([whole[k] for k in f.full_keys]) for f in self.flats]}
        if self.rest is not None:
            out[REST] = self.rest.slice([whole[k] for k in self.rest.full_keys])
        mx.eval(out)  # the slices alone stay: the whole parameters they came from are freed
        return out

    def _groups(self) -> list:
        return list(zip(self.flats, range(len(self.flats)))) + ([(self.rest, None)] if self.rest else [])

    @staticmethod
    def _of(tree: dict, index: Optional[int]) -> Any:
        return tree[REST] if index is None else tree[BLOCKS][index]

    def bind(self, model: nn.Module, params: Any, cast: Optional[Callable] = None) -> None:
        pairs = self.rest.pairs(params[REST], cast) if self.rest is not None else []
        for flat, shard in zip(self.rest_frozen, self.frozen_shards):
            pairs += flat.pairs(shard, None)
        if pairs:
            model.update(tree_unflatten(pairs))
        for wrapper, i in zip(self.wrappers, self.index):
            wrapper.bind(params[BLOCKS][i] if i is not None else None, cast)

    def init(self, params: Any) -> None:
        self.params = params
        self.optimizer.init(params)

    def _whole_tree(self, of: Callable[[Any], mx.array]) -> dict:
        """{full key: whole leaf} from each group's gathered slice of(flat, index)."""
        out = {}
        for flat, index in self._groups():
            out.update(zip(flat.full_keys, flat.gathered(of(index))))
        return out

    def whole_params(self) -> Any:
        flat = self._whole_tree(lambda i: self._of(self.params, i))
        mx.eval(list(flat.values()))  # here, on every rank: a gather left lazy would wait for peers forever
        return tree_unflatten([(k, flat[k]) for k in self.order])

    def param_layout(self) -> Any:
        shapes = {k: (s, f.dtype) for f, _ in self._groups() for k, s in zip(f.full_keys, f.shapes)}
        return tree_unflatten([(k, mx.zeros(*shapes[k])) for k in self.order])  # never evaluated: no memory

    def _names(self) -> List[str]:
        return sorted(self.optimizer.state[REST] if self.rest else self.optimizer.state[BLOCKS][0])

    def full_state(self) -> dict:
        flat = []
        for name in self._names():
            whole = self._whole_tree(lambda i: self._of(self.optimizer.state, i)[name])
            flat += [(f"{k}.{name}", whole[k]) for k in self.order]
        mx.eval([v for _, v in flat])
        rest = {k: v for k, v in self.optimizer.state.items() if k in ("step", "learning_rate")}
        return {**tree_unflatten(flat), **rest}

    def layout(self) -> dict:
        layout = self.param_layout()
        flat = [(f"{k}.{name}", v) for name in self._names() for k, v in tree_flatten(layout)]
        rest = {k: v for k, v in self.optimizer.state.items() if k in ("step", "learning_rate")}
        return {**tree_unflatten(flat), **rest}

    def whole_pieces(self) -> Iterator[Tuple[List[tuple], List[tuple]]]:
        """One group at a time: its whole parameters, then each of its moments (m, v), each
        gathered and evaluated on its own; last, step and learning_rate. A rank that drops each
        piece before the next holds one group's whole beside its slices, never the model."""
        names = self._names()
        for flat, index in self._groups():
            pairs = list(zip(flat.full_keys, flat.gathered(self._of(self.params, index))))
            mx.eval([v for _, v in pairs])  # on every rank: a gather left lazy would wait for peers forever
            yield pairs, []
            del pairs  # the generator's own reference would keep the group alive through the next gather
            for name in names:
                moment = flat.gathered(self._of(self.optimizer.state, index)[name])
                pairs = [(f"{k}.{name}", v) for k, v in zip(flat.full_keys, moment)]
                del moment
                mx.eval([v for _, v in pairs])
                yield [], pairs
                del pairs
        yield [], [(k, v) for k, v in self.optimizer.state.items() if k in ("step", "learning_rate")]

    def piece_keys(self) -> List[List[str]]:
        """Per group, its parameters, then each of its moments: one group's one tensor set at a time."""
        return [keys for flat, _ in self._groups()
                for keys in [flat.full_keys] + [[f"{k}.{name}" for k in flat.full_keys] for name in self._names()]]

    def owned_checksum(self) -> int:
        """The crc32 of the whole parameters, keys sorted (a replica's checksum, the save's), with
        no parameter gathered: each rank takes the crc of each leaf's part in its own slices, the
        ranks all_gather those (one int per leaf), and every rank combines the owners' parts in
        the leaves' and the ranks' order (checkpoint.combined_crc). Each slice is checked by its
        owner alone: there is no replica to compare it with."""
        rank = self.group.rank() if self.group is not None else 0
        mine, leaves = [], []  # this rank's crc per leaf (0: none of it here); (key, its Flat, start, stop)
        for flat, index in self._groups():
            view = checkpoint.bytes_of(self._of(self.params, index))
            offsets = np.concatenate([[0], np.cumsum(flat.sizes)]).tolist()
            for key, a, b in zip(flat.full_keys, offsets[:-1], offsets[1:]):
                lo, hi = max(a, flat.lo) - flat.lo, min(b, flat.hi) - flat.lo
                mine.append(zlib.crc32(view[lo * flat.dtype.size:hi * flat.dtype.size]) if lo < hi else 0)
                leaves.append((key, flat, a, b))
            del view
        crcs = mx.array(mine, dtype=mx.int64)
        if self.world > 1:
            crcs = mx.distributed.all_gather(crcs, group=self.group)
        crcs = np.array(crcs).reshape(self.world, -1)
        parts = []
        for j in sorted(range(len(leaves)), key=lambda i: leaves[i][0]):
            _, flat, a, b = leaves[j]
            for r in range(self.world):
                lo, hi = collectives.shard_bounds(flat.padded, self.world, r)
                if min(b, hi) > max(a, lo):
                    parts.append((int(crcs[r, j]), (min(b, hi) - max(a, lo)) * flat.dtype.size))
        return checkpoint.combined_crc(parts)

    def load_pieces(self, pieces: Iterable[dict], extra: dict) -> Any:
        """Each piece (a group's parameters, or one of its moments) sliced and evaluated before the
        next is asked for, and each group's slices put in place of its old ones (so those go too):
        one piece whole at a time, never the model, and never two sets of slices."""
        names = self._names()
        shards, state = self.params, self.optimizer.state
        it = iter(pieces)  # not zip or enumerate: their reused tuple would hold the previous piece
        for flat, index in self._groups():
            held = {}
            for name in [None] + names:
                piece = next(it)
                keys = flat.full_keys if name is None else [f"{k}.{name}" for k in flat.full_keys]
                held[name] = flat.slice([piece[k] for k in keys])
                mx.eval(held[name])
                del piece  # the whole piece goes before the next arrives
            shard = held.pop(None)
            if index is None:
                shards[REST], state[REST] = shard, held
            else:
                shards[BLOCKS][index], state[BLOCKS][index] = shard, held
            del shard, held
        state.update(extra)
        return shards

    def load(self, params: Any, full_state: dict) -> Any:
        names = self._names()
        whole = dict(tree_flatten(params))
        state = dict(tree_flatten(full_state))
        shards = self._slices(whole)
        moments = {name: self._slices({k: state[f"{k}.{name}"] for k in self.order}) for name in names}
        per_group = {BLOCKS: [{name: moments[name][BLOCKS][i] for name in names} for i in range(len(self.flats))]}
        if self.rest is not None:
            per_group[REST] = {name: moments[name][REST] for name in names}
        rest = {k: v for k, v in full_state.items() if k in ("step", "learning_rate")}
        self.optimizer.state = {**rest, **per_group}
        self.params = shards
        return shards

    def build(self, compiled: bool) -> None:
        group = self.group

        def norm(held):
            grads, ok = held
            squares = sum(mx.sum(mx.square(g.astype(mx.float32))) for g in _leaves(grads))
            # A rank whose loss is not finite (or over its limit) makes the sum non-finite on every
            # rank, so all skip the update alike, as make_sync's poisoned gradient does.
            squares = squares * ok
            return mx.sqrt(mx.distributed.all_sum(squares, group=group) if self.world > 1 else squares)

        self._set_graphs(norm, self._adamw, compiled)

    def reduce(self, grads: Any, loss: mx.array) -> Any:
        # Nothing left to send: the backward's gathers reduce-scattered the gradients already.
        return grads, mx.where(mx.isfinite(loss), 1.0, float("nan"))

    def update(self, held: Any, norm: mx.array) -> None:
        self._apply(held[0], norm)
