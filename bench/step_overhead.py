"""Trainer step vs bare hand-written MLX loops, same model, batch and optimizer, in one process.

Baselines: the best-practice loop (the whole step compiled with mx.compile, model and optimizer
state as its captured inputs/outputs, as mlx-lm's trainer does) and the plain uncompiled loop.
Interleaves them (ABAB...) so that machine noise hits all alike; reports the median of the
per-round ratios bare_time / trainer_time (1.0 = no overhead; goal >= 0.97 against the compiled one).
Run by bench/run.py; prints one JSON object.
"""

from __future__ import annotations

import json
import sys
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlx_train.config import ModelConfig, OptimConfig
from mlx_train.rank import blas, lanes
from mlx_train.rank.model import build_model
from mlx_train.rank.step import Stepper, make_optimizer
from timing import interleaved


def bare_loop(cfg: ModelConfig, loss_fn, x, y, compiled: bool):
    mx.random.seed(0)
    model, _ = build_model(cfg)
    opt = make_optimizer(OptimConfig(), 1000)
    grad = nn.value_and_grad(model, loss_fn)

    def step(x, y):
        loss, grads = grad(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return loss

    state = [model.state, opt.state, mx.random.state]
    fn = partial(mx.compile, inputs=state, outputs=state)(step) if compiled else step

    def run():
        loss = fn(x, y)
        mx.eval(state, loss)
    return run


def main(width=128, layers=4, seq=128, batch=8, rounds=7, steps_per_round=5) -> dict:
    cfg = ModelConfig(n_layers=layers, d_model=width, n_heads=4, seq_len=seq)
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(0, 256, (batch, seq)).astype(np.int32))
    y = mx.array(rng.integers(0, 256, (batch, seq)).astype(np.int32))

    mx.random.seed(0)
    model_t, loss_fn = build_model(cfg)
    trainer = Stepper(model_t, loss_fn, make_optimizer(OptimConfig(), 1000), "fp32", 1.0, None)
    compiled = bare_loop(cfg, loss_fn, x, y, compiled=True)
    eager = bare_loop(cfg, loss_fn, x, y, compiled=False)

    def trainer_step():
        trainer.step([(x, y)])

    r = interleaved(compiled, trainer_step, rounds, steps_per_round)
    e = interleaved(eager, trainer_step, max(3, rounds // 2), steps_per_round)
    out = {"model": f"gpt L{layers} D{width} T{seq} B{batch}", "bare_step_s": r["baseline_s"],
           "trainer_step_s": r["candidate_s"], "ratio": r["ratio"], "tokens_per_s": batch * seq / r["candidate_s"],
           "eager_step_s": e["baseline_s"], "eager_ratio": e["ratio"],
           "bare_tokens_per_s": batch * seq / r["baseline_s"],
           # what this process ran with, so that run.py can check the BLAS row's two sides differ in the BLAS only
           "blas_in_use": blas.in_use(), "allocator": blas.allocator_in_use()}
    # The trainer as a rank runs it by default (--cpu-threads 0): the micro-batch split across a lane
    # per core, BLAS on one core per lane; the bare loop keeps all cores for its matmuls.
    cores = blas.cores_of_rank()
    n = lanes.count(0, mx.default_device() == mx.cpu, cores, batch, 0, 1)
    if n > 1 and blas.set_threads(cores):
        mx.random.seed(0)
        model_l, _ = build_model(cfg)
        laned = Stepper(model_l, loss_fn, make_optimizer(OptimConfig(), 1000), "fp32", 1.0, None, lanes=n)

        def bare_all_cores():
            blas.set_threads(cores)
            compiled()

        def lanes_step():
            blas.set_threads(cores // n)
            laned.step([(x, y)])

        lr = interleaved(bare_all_cores, lanes_step, rounds, steps_per_round)
        blas.set_threads(cores)
        out.update(lanes=n, lanes_bare_step_s=lr["baseline_s"], lanes_step_s=lr["candidate_s"], lanes_ratio=lr["ratio"])
    return out


if __name__ == "__main__":
    print(json.dumps(main(**json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})))
