"""mlx-train vs mlx-lm's own trainer on the same small llama (mlx_lm.models.llama), same random
tokens, batch and sequence length; plus the model FLOPs utilization of each.

Both sides run as a new user would: mlx-train through its CLI (`--model llama_bench:build`, the
factory below), mlx-lm through `mlx_lm.tuner.trainer.train` (its compiled step, the gradient average
inside). They alternate, round by round, so machine noise hits both alike; each figure is the
median wall-clock tokens/s of the logging windows after the first (which holds the compile),
bench/timing.py says why the wall clock; each trainer's own figure is kept beside it. Nothing is
downloaded: random weights, random tokens.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from timing import mlx_lm_windows, mlx_train_windows  # noqa: E402
SHAPE = {"layers": 4, "width": 256, "heads": 4, "seq": 256, "batch": 8, "vocab": 1024, "ffn": 688}


def llama_args(layers: int, width: int, heads: int, vocab: int, ffn: int):
    from mlx_lm.models import llama

    return llama.ModelArgs(model_type="llama", hidden_size=width, num_hidden_layers=layers, intermediate_size=ffn,
                           num_attention_heads=heads, rms_norm_eps=1e-5, vocab_size=vocab)


def build(cfg):
    """mlx-train's factory (docs/model_development.md): mlx-lm's llama on the CLI's shape."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama

    model = llama.Model(llama_args(cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.vocab_size, SHAPE["ffn"]))

    def loss(model, inputs, targets):
        return nn.losses.cross_entropy(model(inputs).astype(mx.float32), targets, reduction="mean")

    return model, loss


def flops_per_token(layers: int, width: int, heads: int, seq: int, vocab: int, ffn: int, **_) -> int:
    """Training FLOPs per token: 6 x the parameters that take part in matmuls (the tied head counts
    once, the embedding lookup is free) + attention's scores and weighted sum (12 x layers x seq x width)."""
    matmul_params = layers * (4 * width * width + 3 * width * ffn) + vocab * width
    return 6 * matmul_params + 12 * layers * seq * width


def tokens_file(directory: Path, n_tokens: int = 400_000) -> Path:
    path = directory / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, SHAPE["vocab"], n_tokens).astype(np.int32))
    return path


# -- mlx-lm's side ----------------------------------------------------------------------------------
def mlxlm_rank(tokens: str, steps: int, report_every: int, batch: int) -> None:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.models import llama
    from mlx_lm.tuner import trainer
    from mlx_lm.tuner.callbacks import TrainingCallback

    mx.random.seed(0)
    model = llama.Model(llama_args(SHAPE["layers"], SHAPE["width"], SHAPE["heads"], SHAPE["vocab"], SHAPE["ffn"]))
    ids = np.load(tokens)
    span = SHAPE["seq"] + 1
    data = [(ids[i:i + span].tolist(), 0) for i in range(0, len(ids) - span, span)]
    reports = []

    class Keep(TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append((time.perf_counter(), info))

    args = trainer.TrainingArgs(batch_size=batch, iters=steps, steps_per_report=report_every, steps_per_eval=10**9,
                                steps_per_save=10**9, max_seq_length=span,
                                adapter_file=os.path.join(tempfile.mkdtemp(), "a.safetensors"))
    with open(os.devnull, "w") as quiet:  # its progress UI
        old, sys.stdout = sys.stdout, quiet
        try:
            trainer.train(model, optim.AdamW(learning_rate=1e-4), data, None, args, training_callback=Keep())
        finally:
            sys.stdout = old
    if mx.distributed.init().rank() == 0:
        print(json.dumps(medians(mlx_lm_windows(reports))))


def run_mlxlm(tokens: Path, ranks: int, steps: int, report_every: int, env: dict) -> dict:
    args = json.dumps({"tokens": str(tokens), "steps": steps, "report_every": report_every,
                       "batch": SHAPE["batch"]})
    cmd = [sys.executable, __file__, "--mlxlm", args]
    if ranks > 1:
        from ring import run_ranks  # bench/ is this script's directory

        return run_ranks(cmd, ranks, env, "mlx-lm run")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if out.returncode:
        raise SystemExit(f"mlx-lm run failed: {out.returncode}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- mlx-train's side -------------------------------------------------------------------------------
def run_mlx_train(tokens: Path, ranks: int, steps: int, report_every: int, work: Path, cpu_threads: int) -> dict:
    run = Path(tempfile.mkdtemp(dir=work, prefix="run-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "mlx_train.cli", "train", "--model", "llama_bench:build", "--data", str(tokens),
           "--layers", str(SHAPE["layers"]), "--width", str(SHAPE["width"]), "--heads", str(SHAPE["heads"]),
           "--seq-len", str(SHAPE["seq"]), "--batch-size", str(SHAPE["batch"] // ranks), "--devices", str(ranks),
           "--steps", str(steps), "--log-every", str(report_every), "--eval-every", str(10**6),
           "--checkpoint-every", str(10**6), "--run-dir", str(run / "r"), "--no-live", "--cpu-threads", str(cpu_threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if out.returncode:
        raise SystemExit(f"mlx-train run failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    metrics = [json.loads(line) for line in (run / "r" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    lanes = re.search(r"(\d+) threads? per micro-batch", (run / "r" / "logs" / "rank-0.log").read_text())
    return {**medians(mlx_train_windows(metrics)), "lanes": int(lanes.group(1)) if lanes else 1}


def medians(windows: dict) -> dict:
    return {"tokens_per_s": statistics.median(windows["wall"]), "own_tokens_per_s": statistics.median(windows["own"])}


def main(rounds=3, steps=25, report_every=5, ranks=1, cpu_threads=0) -> dict:
    from mlx_train.rank import blas

    env = {**os.environ, **blas.rank_env(ranks_on_host=ranks)}
    with tempfile.TemporaryDirectory(prefix="mlx-train-bench-") as tmp:
        work = Path(tmp)
        tokens = tokens_file(work)
        ours, theirs = [], []
        for _ in range(rounds):
            ours.append(run_mlx_train(tokens, ranks, steps, report_every, work, cpu_threads))
            theirs.append(run_mlxlm(tokens, ranks, steps, report_every, env))
    wall = lambda side: [r["tokens_per_s"] for r in side]  # noqa: E731
    return {"shape": SHAPE, "ranks": ranks, "lanes": ours[0]["lanes"], "mlx_train_tokens_per_s": statistics.median(wall(ours)),
            "mlx_lm_tokens_per_s": statistics.median(wall(theirs)),
            "ratio": statistics.median(o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(ours, theirs)),
            "own_clock_ratio": statistics.median(o["own_tokens_per_s"] / t["own_tokens_per_s"]
                                                 for o, t in zip(ours, theirs)),
            "rounds": {"mlx_train": ours, "mlx_lm": theirs}, "flops_per_token": flops_per_token(**SHAPE)}


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--mlxlm":
        mlxlm_rank(**json.loads(sys.argv[2]))
    else:
        print(json.dumps(main(**json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})))
