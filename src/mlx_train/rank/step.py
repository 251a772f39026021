"""One optimizer step: micro-batch gradients, then the step spread over the ranks (rank/spread.py:
the all-reduce or reduce-scatter, the global norm, AdamW with clipping folded in, the gather).

Parameters live outside the model as an fp32 tree (the master weights); the model is only the
function. With bf16 the forward and backward run on a down-cast copy, and the gradients come back
in fp32 through the cast.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from mlx_train.config import OptimConfig
from mlx_train.rank import spread
from mlx_train.rank.fullshard import FullShard
from mlx_train.rank.lanes import Lanes, shards
# Where they lived before the step's spreading over the ranks had its own module (rank/spread.py).
from mlx_train.rank.spread import BUCKET_BYTES, _assign, make_sync, pack, sum_gradients, unpack  # noqa: F401


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optim.Optimizer:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay = optim.cosine_decay(cfg.lr, max(total_steps - warmup, 1), cfg.lr * cfg.min_lr_ratio)
    schedule = decay if warmup == 0 else optim.join_schedules(
        [optim.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])
    return optim.AdamW(learning_rate=schedule, betas=[cfg.beta1, cfg.beta2], weight_decay=cfg.weight_decay)


def make_grad_fn(model: nn.Module, loss_fn: Callable, precision: str,
                 bind: Optional[Callable] = None) -> Callable:
    """value_and_grad of the scaled loss in the parameters the step holds; `bind(model, params,
    cast)` puts them into the model (Spread.bind: a fully sharded step binds slices)."""
    compute_dtype = mx.bfloat16 if precision == "bf16" else None

    def cast(p: mx.array) -> mx.array:
        return p.astype(compute_dtype) if mx.issubdtype(p.dtype, mx.floating) else p

    def loss_of(params, inputs, targets, scale):
        if bind is not None:
            bind(model, params, cast if compute_dtype else None)
        else:
            model.update(tree_map(cast, params) if compute_dtype else params)
        return loss_fn(model, inputs, targets) * scale

    return mx.value_and_grad(loss_of)


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    compute_s: float
    comm_s: float
    skipped: bool = False  # the update was not finite and was not applied (on every rank)
    # Of compute_s, the forward and backward passes alone: the part that grows with the rank's rows
    # (--shares auto measures a rank's speed by it, and the rest, the update, as the rank's fixed part).
    grad_s: float = 0.0
    # A pipeline stage's (rank/pipeline.py): of comm_s, its waits inside the 1F1B schedule (for its
    # neighbours' activations and gradients, the transfers included): its share of the bubble.
    idle_s: float = 0.0


class Stepper:
    """Runs optimizer steps for one rank of `group` (size 1 for a single process).

    The step is compiled (mx.compile, as mlx-lm's trainer does) in graphs evaluated one after the
    other: a micro-batch's forward/backward plus accumulation, the bucketed all-reduce, the gradient
    norm, and AdamW with the clipping factor folded in. Each graph is traced once and then replayed
    from C++ with its elementwise chains fused; the boundaries keep compute and communication
    separately timed, let the host decide to skip a non-finite update before it is applied, and
    cost an extra evaluation each (microseconds): one graph for the whole step measured no faster
    (in-process, 1 process, a 3.4M-parameter llama: mlx-lm's step / ours 0.997; one graph 0.983),
    and would only pay off with its all-reduce on a communication stream (docs/performance.md). The
    parameters and the optimizer state are the graphs' captured state: they are updated in place,
    so `load` must be used to replace them. With `lanes` > 1 (a CPU rank, rank/lanes.py) each
    micro-batch's forward/backward runs as that many shards at once, on threads with their own
    streams and their own traced copies of the first graph, and their gradients are summed.
    What follows the gradients (their sum over the ranks, the norm, the update) is the strategy
    `shard` names (rank/spread.py: "none" is data parallel, "optimizer" and "gradients" ZeRO-1/2,
    "full" ZeRO-3, rank/fullshard.py, where `params` are this rank's slices, not the parameters);
    `backend` is the group's backend name, which decides how a reduce-scatter is built.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, optimizer: optim.Optimizer, precision: str,
                 grad_clip: float, group: Optional[mx.distributed.Group] = None, compile: bool = True,
                 bucket_bytes: int = BUCKET_BYTES, lanes: int = 1, shard: str = "none",
                 backend: Optional[str] = None):
        self.model = model
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.group = group
        self.world = group.size() if group is not None else 1
        self.loss_fn = loss_fn
        self.compiled = compile
        self.bucket_bytes = bucket_bytes
        # How the step is spread over the ranks (data parallel, sharded: rank/spread.py), chosen once.
        self.spread = spread.choose(shard, optimizer, grad_clip, group, bucket_bytes, backend,
                                    others={"full": FullShard})
        # What the step differentiates and updates: the trainable parameters, or (full) their slices.
        self.params = self.spread.own(model, model.trainable_parameters())
        self.spread.init(self.params)
        self.grad_fn = make_grad_fn(model, loss_fn, precision, self.spread.bind)
        # Lanes replay traced graphs only: an uncompiled step would run the model's Python in two
        # threads; and a backward with collectives in it must run on one thread, in one order.
        self.lanes = Lanes(lanes) if lanes > 1 and compile and not self.spread.collective_backward else None
        self._build()

    def load(self, params: Any, optimizer_state: dict) -> None:
        """Replace the parameters and optimizer state (a restore) and retrace around them. The state
        is in the unsharded layout (optimizer_state()'s); a sharded step keeps its slice of it."""
        self.params = self.spread.load(params, optimizer_state)
        self._build()

    def load_pieces(self, pieces, extra: dict) -> None:
        """load() piece by piece (Spread.load_pieces): a fully sharded step never holds the whole."""
        self.params = self.spread.load_pieces(pieces, extra)
        self._build()

    def whole_pieces(self):
        """whole_params() and optimizer_state() piece by piece (Spread.whole_pieces): every rank asks."""
        return self.spread.whole_pieces()

    def piece_keys(self) -> list:
        return self.spread.piece_keys()

    def whole_params(self) -> Any:
        """The whole trainable parameters (checkpoints, checksums). Fully sharded, they are gathered
        from every rank: every rank must call it."""
        return self.spread.whole_params()

    def param_layout(self) -> Any:
        """A tree shaped like whole_params(), with no collective (its arrays may be unevaluated)."""
        return self.spread.param_layout()

    def optimizer_state(self) -> dict:
        """The optimizer state in the unsharded layout, as a checkpoint holds it. Sharded, it is
        gathered from every rank: every rank must call it."""
        return self.spread.full_state()

    def optimizer_layout(self) -> dict:
        """A tree shaped like optimizer_state(), with no collective (its arrays may be unevaluated)."""
        return self.spread.layout()

    def set_params(self, params: Any) -> None:
        """Overwrite the held parameters' values (self.params' tree) in place (the compiled graphs keep their containers)."""
        _assign(self.params, params)

    def _grad_graphs(self) -> Tuple[Callable, Callable]:
        """A micro-batch's forward/backward (`first`), and the same plus adding to the accumulated
        gradients (`more`). Compiled, with the parameters and MLX's RNG state as captured inputs, so
        a model with dropout draws fresh masks every replay; each call makes new functions, so a
        lane's copy is traced apart from the others (rank/lanes.py: a trace belongs to its thread)."""
        first = lambda x, y, scale: self.grad_fn(self.params, x, y, scale)  # noqa: E731

        def more(x, y, scale, acc):
            loss, grads = self.grad_fn(self.params, x, y, scale)
            return loss, tree_map(mx.add, acc, grads)

        if not self.compiled:
            return first, more
        reads, rng = [self.params, mx.random.state], [mx.random.state]
        return mx.compile(first, inputs=reads, outputs=rng), mx.compile(more, inputs=reads, outputs=rng)

    def _build(self) -> None:
        self._first, self._more = self._grad_graphs()
        self.spread.build(self.compiled)
        if self.compiled and self.lanes is not None:
            self._lane_fns = [self._grad_graphs() for _ in range(len(self.lanes))]
            self._traced: set = set()
            self._merge = mx.compile(lambda trees: functools.reduce(lambda a, b: tree_map(mx.add, a, b), trees))

    def _gradients(self, micro_batches: List[Tuple[Any, Any]], shares: List[float]) -> Tuple[Any, mx.array]:
        """The micro-batches' summed gradients and loss, each micro-batch's scaled by its share."""
        grads, loss = None, mx.array(0.0)
        for (inputs, targets), share in zip(micro_batches, shares):
            x, y, scale = mx.array(inputs), mx.array(targets), mx.array(share)
            micro_loss, grads = self._first(x, y, scale) if grads is None else self._more(x, y, scale, grads)
            loss = loss + micro_loss
            # Evaluate per micro-batch so accumulation bounds activation memory to one micro-batch.
            mx.eval(grads, loss)
        return grads, loss

    def _lane_gradients(self, micro_batches: List[Tuple[Any, Any]], shares: List[float]) -> Tuple[Any, mx.array]:
        """As _gradients, each micro-batch split across the lanes. A lane's share of the scale is its
        share of the micro-batch's counted target tokens (those >= 0, as the trainer counts them),
        not of its rows: masked prompts and padding fall unevenly across the rows, and the loss is
        a mean over counted tokens. With every target counted the two are the same float."""
        n = len(self.lanes)
        mx.eval(self.params)  # a new model's, or a set_params's, weights may still be unevaluated here
        # Each lane's random state is seeded from this thread's (the trainer seeds it every step),
        # so dropout masks are fresh every step and the same on a replay of that step.
        seeds = mx.random.randint(0, 2**31 - 1, (len(micro_batches), n)).tolist()
        accs: List[Any] = [None] * n
        loss = mx.array(0.0)
        for m, (inputs, targets) in enumerate(micro_batches):
            x, y, share = mx.array(inputs), mx.array(targets), shares[m]
            parts = shards(x.shape[0], min(n, x.shape[0]))
            counted = np.asarray(targets) >= 0
            counts = [int(counted[p].sum()) for p in parts]
            whole = sum(counts)
            weights = [c / whole if whole else (p.stop - p.start) / x.shape[0] for c, p in zip(counts, parts)]
            args = [(x[p], y[p], mx.array(share * w, dtype=mx.float32)) for p, w in zip(parts, weights)]
            mx.eval(args)  # a lane's thread can only run its own stream's work
            seen = [(i, a[0].shape, a[0].dtype, a[1].shape, a[1].dtype, accs[i] is None) for i, a in enumerate(args)]
            jobs = [functools.partial(self._lane_job, i, seeds[m][i], *a, accs[i]) for i, a in enumerate(args)]
            # A lane that will trace does so alone: the traced Python (the model) is shared.
            results = self.lanes.run(jobs, together=all(k in self._traced for k in seen))
            self._traced.update(seen)
            for i, (lane_loss, grads) in enumerate(results):
                accs[i] = grads
                loss = loss + lane_loss
        grads = self._merge([a for a in accs if a is not None])
        mx.eval(grads, loss)
        return grads, loss

    def _lane_job(self, i: int, seed: int, x, y, scale, acc) -> Tuple[mx.array, Any]:
        first, more = self._lane_fns[i]
        mx.random.seed(seed)  # MLX's random state is per thread: this lane's, which its graphs capture
        loss, grads = first(x, y, scale) if acc is None else more(x, y, scale, acc)
        mx.eval(loss, grads)
        return loss, grads

    def step(self, micro_batches: Iterable[Tuple[Any, Any]], loss_limit: Optional[float] = None,
             tokens: Optional[Tuple[List[int], int]] = None) -> StepStats:
        """One optimizer step. A loss above `loss_limit` (--loss-spike) is treated as non-finite: the
        update is skipped on every rank alike, by the same path. `tokens` is (each micro-batch's
        counted target tokens, the global batch's): without it every micro-batch of every rank is an
        equal part of the global batch."""
        t0 = time.perf_counter()
        # An empty micro-batch (a rank with fewer rows than the micro-batches `full` makes every rank
        # take) still runs the forward and backward, and with them the collectives the other ranks
        # wait in: as one row of token 0 that weighs nothing (its share is 0, so are its gradients).
        micro_batches = [(x, y) if len(x) else (np.zeros((1, *np.shape(x)[1:]), np.asarray(x).dtype),
                                                 np.zeros((1, *np.shape(y)[1:]), np.asarray(y).dtype))
                         for x, y in micro_batches]
        # The mean over micro-batches and ranks is folded into the loss, so the backward pass
        # yields already-averaged gradients and the all-reduce is a bare sum (no extra pass).
        # Weighted by tokens, the sum over ranks is the global batch's token mean however unequal
        # the ranks' windows (--shares); with equal windows the shares are the equal split's, bit for bit.
        if tokens is None:
            shares, whole = [1.0 / (len(micro_batches) * self.world)] * len(micro_batches), float(self.world)
        else:
            counts, total = tokens
            shares, whole = [c / total for c in counts], total / max(sum(counts), 1)
        gradients = self._lane_gradients if self.lanes is not None else self._gradients
        grads, loss = gradients(micro_batches, shares)
        loss = loss * whole  # this rank's mean loss
        guard = loss if loss_limit is None else mx.where(loss > loss_limit, float("nan"), loss)
        t1 = time.perf_counter()
        held = self.spread.reduce(grads, guard)  # what this rank keeps of the summed gradients
        t2 = time.perf_counter()
        norm = self.spread.norm(held)
        # A non-finite update is skipped on every rank alike: one rank's non-finite loss made its
        # gradients non-finite before the sum (reduce), so the summed norm says so on every rank,
        # with no extra collective. The step count still advances, so the schedule and a resume
        # stay in step.
        finite = mx.isfinite(norm) if self.world > 1 else mx.logical_and(mx.isfinite(norm), mx.isfinite(guard))
        skipped = not bool(finite.item())
        if skipped:
            self.optimizer.state["step"] = self.optimizer.step + 1
        else:
            self.spread.update(held, norm)
        mx.eval(self.params, self.optimizer.state, norm)
        t3 = time.perf_counter()
        if not skipped:
            self.spread.publish()  # sharded: the updated slices gathered into every rank's parameters
        t4 = time.perf_counter()
        return StepStats(float(loss.item()), float(norm.item()), (t1 - t0) + (t3 - t2), (t2 - t1) + (t4 - t3),
                         skipped, t1 - t0)

    def evaluate(self, batches: Iterable[Tuple[Any, Any]]) -> mx.array:
        """Mean loss over `batches` with the current fp32 weights, as a lazy scalar (fully sharded:
        the blocks gather their weights in it, so every rank evaluates it)."""
        self.spread.bind(self.model, self.params)
        losses = [self.loss_fn(self.model, mx.array(x), mx.array(y)) for x, y in batches]
        return mx.mean(mx.stack(losses))


def all_sum_bytes(backend: str, world: int, cores: int, grad_bytes: int) -> int:
    """The most gradient bytes one all_sum carries.

    MLX's ring backend runs an all_sum of at least 2 x world x 256 KiB in both directions of the
    ring at once: two reducer threads, each with its sockets' busy-polling threads. A rank with
    fewer cores than those four threads has them fight its peer's for the cores, which costs each
    such all_sum milliseconds: on 2 cores, 2 ranks, one all_sum of 3.3 MiB took ~10 ms, four of
    0.8 MiB ~4 ms in all (bench/sync_overhead.py). When the whole gradient fits in four all_sums
    under that size, such a rank sends those; a larger one goes in 32 MiB buckets, as on other
    ranks and backends (at 24.7 MiB the copies that cutting needs cost more than it saves: 0.8 of
    one all_sum's speed at once, 0.55 cut).
    """
    one_direction = 2 * world * 256 * 1024 - 4096
    if backend == "ring" and world > 1 and cores < 4 and grad_bytes <= 4 * one_direction:
        return one_direction
    return BUCKET_BYTES


def current_lr(optimizer: optim.Optimizer) -> float:
    lr = optimizer.learning_rate
    return float(lr.item()) if isinstance(lr, mx.array) else float(lr)

