"""Trainer step vs a bare hand-written MLX loop, same model, batch and optimizer, in one process.

Interleaves the two (ABAB...) so that machine noise hits both alike; reports the median of the
per-round ratios bare_time / trainer_time (1.0 = no overhead; goal >= 0.97).
Run by bench/run.py; prints one JSON object.
"""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlx_train.config import ModelConfig, OptimConfig
from mlx_train.rank.model import build_model
from mlx_train.rank.step import Stepper, make_optimizer
from timing import interleaved


def main(width=128, layers=4, seq=128, batch=8, rounds=7, steps_per_round=5) -> dict:
    cfg = ModelConfig(n_layers=layers, d_model=width, n_heads=4, seq_len=seq)
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(0, 256, (batch, seq)).astype(np.int32))
    y = mx.array(rng.integers(0, 256, (batch, seq)).astype(np.int32))

    mx.random.seed(0)
    model_t, loss_fn = build_model(cfg)
    trainer = Stepper(model_t, loss_fn, make_optimizer(OptimConfig(), 1000), "fp32", 1.0, None)

    mx.random.seed(0)
    model_b, _ = build_model(cfg)
    opt_b = make_optimizer(OptimConfig(), 1000)
    grad_b = nn.value_and_grad(model_b, loss_fn)

    def bare_step():
        loss, grads = grad_b(model_b, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt_b.update(model_b, grads)
        mx.eval(model_b.parameters(), opt_b.state, loss)

    def trainer_step():
        trainer.step([(x, y)])

    r = interleaved(bare_step, trainer_step, rounds, steps_per_round)
    return {"model": f"gpt L{layers} D{width} T{seq} B{batch}", "bare_step_s": r["baseline_s"],
            "trainer_step_s": r["candidate_s"], "ratio": r["ratio"], "tokens_per_s": batch * seq / r["candidate_s"]}


if __name__ == "__main__":
    print(json.dumps(main(**json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})))
