"""One optimizer step: micro-batch gradients, bucketed all-reduce, clipping, AdamW update.

Parameters live outside the model as an fp32 tree (the master weights); the model is only the
function. With bf16 the forward and backward run on a down-cast copy, and the gradients come back
in fp32 through the cast.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_train.config import OptimConfig

# One all_sum per bucket of this many bytes (mlx.nn.average_gradients packs small tensors together).
BUCKET_BYTES = 32 * 1024 * 1024


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optim.Optimizer:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay = optim.cosine_decay(cfg.lr, max(total_steps - warmup, 1), cfg.lr * cfg.min_lr_ratio)
    schedule = decay if warmup == 0 else optim.join_schedules(
        [optim.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])
    return optim.AdamW(learning_rate=schedule, betas=[cfg.beta1, cfg.beta2], weight_decay=cfg.weight_decay)


def make_grad_fn(model: nn.Module, loss_fn: Callable, precision: str) -> Callable:
    compute_dtype = mx.bfloat16 if precision == "bf16" else None

    def cast(p: mx.array) -> mx.array:
        return p.astype(compute_dtype) if mx.issubdtype(p.dtype, mx.floating) else p

    def loss_of(params, inputs, targets, scale):
        model.update(tree_map(cast, params) if compute_dtype else params)
        return loss_fn(model, inputs, targets) * scale

    return mx.value_and_grad(loss_of)


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    compute_s: float
    comm_s: float
    skipped: bool = False  # the guard refused the update (see Stepper.guard)


class Stepper:
    """Runs optimizer steps for one rank of `group` (size 1 for a single process)."""

    def __init__(self, model: nn.Module, loss_fn: Callable, optimizer: optim.Optimizer, precision: str,
                 grad_clip: float, group: Optional[mx.distributed.Group] = None):
        self.model = model
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.group = group
        self.loss_fn = loss_fn
        self.grad_fn = make_grad_fn(model, loss_fn, precision)
        self.params = model.trainable_parameters()
        # Optional: guard(loss, grad_norm) -> bool, called before the update; False skips it (the
        # optimizer's step count still advances, so the schedule and a resume stay in step).
        self.guard: Optional[Callable[[mx.array, mx.array], bool]] = None

    def step(self, micro_batches: Iterable[Tuple[Any, Any]]) -> StepStats:
        t0 = time.perf_counter()
        micro_batches = list(micro_batches)
        world = self.group.size() if self.group is not None else 1
        # The mean over micro-batches and ranks is folded into the loss, so the backward pass
        # yields already-averaged gradients and the all-reduce is a bare sum (no extra pass).
        scale = mx.array(1.0 / (len(micro_batches) * world))
        grads, loss = None, mx.array(0.0)
        for inputs, targets in micro_batches:
            micro_loss, micro_grads = self.grad_fn(self.params, mx.array(inputs), mx.array(targets), scale)
            grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
            loss = loss + micro_loss
            # Evaluate per micro-batch so accumulation bounds activation memory to one micro-batch.
            mx.eval(grads, loss)
        loss = loss * world  # this rank's mean loss
        t1 = time.perf_counter()
        if world > 1:
            grads = sum_gradients(grads, self.group)
            mx.eval(grads)
        t2 = time.perf_counter()
        if self.grad_clip > 0:
            grads, norm = optim.clip_grad_norm(grads, self.grad_clip)
        else:
            norm = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for g in _leaves(grads)))
        if self.guard is not None and not self.guard(loss, norm):
            self.optimizer.state["step"] = self.optimizer.step + 1
            mx.eval(self.optimizer.state, norm)
            t3 = time.perf_counter()
            return StepStats(float(loss.item()), float(norm.item()), (t1 - t0) + (t3 - t2), t2 - t1, skipped=True)
        self.params = self.optimizer.apply_gradients(grads, self.params)
        mx.eval(self.params, self.optimizer.state, norm)
        t3 = time.perf_counter()
        return StepStats(float(loss.item()), float(norm.item()), (t1 - t0) + (t3 - t2), t2 - t1)

    def evaluate(self, batches: Iterable[Tuple[Any, Any]]) -> mx.array:
        """Mean loss over `batches` with the current fp32 weights, as a lazy scalar."""
        self.model.update(self.params)
        losses = [self.loss_fn(self.model, mx.array(x), mx.array(y)) for x, y in batches]
        return mx.mean(mx.stack(losses))


def sum_gradients(grads: Any, group: mx.distributed.Group, bucket_bytes: int = BUCKET_BYTES) -> Any:
    """All-reduce (sum) a gradient tree with one all_sum per bucket of about `bucket_bytes`.

    Like mlx.nn.average_gradients, minus its division: the trainer's gradients arrive pre-scaled.
    """
    flat = tree_flatten(grads)
    buckets, current, size = [], [], 0
    for key, g in flat:
        current.append((key, g))
        size += g.nbytes
        if size >= bucket_bytes:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    out = []
    for bucket in buckets:
        if len({g.dtype for _, g in bucket}) > 1:  # mixed dtypes cannot share a buffer
            out += [(k, mx.distributed.all_sum(g, group=group)) for k, g in bucket]
            continue
        summed = mx.distributed.all_sum(pack([g for _, g in bucket]), group=group)
        out += list(zip((k for k, _ in bucket), unpack(summed, [g for _, g in bucket])))
    return tree_unflatten(out)


def pack(arrays: List[mx.array]) -> mx.array:
    """One flat buffer holding `arrays` in order (one collective instead of one per array)."""
    return mx.concatenate([a.reshape(-1) for a in arrays])


def unpack(flat: mx.array, like: List[mx.array]) -> List[mx.array]:
    """The pieces of `flat` shaped like `like` (views, no copies)."""
    offsets = np.cumsum([a.size for a in like])[:-1].tolist()
    return [part.reshape(a.shape) for a, part in zip(like, mx.split(flat, offsets))]


def current_lr(optimizer: optim.Optimizer) -> float:
    lr = optimizer.learning_rate
    return float(lr.item()) if isinstance(lr, mx.array) else float(lr)


def _leaves(tree) -> list:
    return [v for _, v in tree_flatten(tree)]
