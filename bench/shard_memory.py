"""The memory model's peak per rank at each shard level against the peak measured on real ring ranks.

    PYTHONPATH=src python bench/shard_memory.py [--ranks 2,3] [--json bench/shard_memory.json]

For each world size it starts that many ring ranks on loopback (MLX_HOSTFILE/MLX_RANK). Each rank
builds, one configuration and level at a time (a fresh model, optimizer and Stepper, the cache
cleared), the built-in GPT and a pretrained llama-family model made offline (tests/tiny_llama.py),
runs one step (tracing, the optimizer state's first allocation), resets the peak, runs a second
step and reports `mx.get_peak_memory()`: the measured peak of a step, what
planning/memory.step_memory's `peak` predicts. The row's measured value is the largest over the
ranks (a rank's slice can be one pad element larger). It prints a markdown table (predicted,
measured, ratio) and with --json writes the rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 0.15
LEVELS = ("none", "optimizer", "gradients", "full")
# (name, model, batch, seq_len): a GPT whose state outweighs a small batch's activations, and a llama
# (full fine-tuning) of the same kind. "llama" stands for the model directory made at run time.
CONFIGS = [("gpt", dict(n_layers=4, d_model=256, n_heads=4), 2, 64),
           ("llama", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2), 2, 64)]


def measure_rank(group, configs, levels, llama_dir) -> list:
    """This rank's measured and predicted peak of one step for each (configuration, level)."""
    import mlx.core as mx
    import numpy as np

    from mlx_train.config import FineTuneConfig, ModelConfig, OptimConfig
    from mlx_train.planning.memory import LMShape, ModelShape, step_memory
    from mlx_train.rank import hf
    from mlx_train.rank.model import build_model
    from mlx_train.rank.step import Stepper, make_optimizer

    n, r = group.size(), group.rank()
    rows = []
    for name, dims, batch, seq in configs:
        for level in levels:
            gc.collect()
            mx.clear_cache()
            mx.random.seed(0)
            if name == "gpt":
                cfg = ModelConfig(**dims, seq_len=seq)
                model, loss_fn = build_model(cfg)
                shape, vocab = ModelShape.from_config(cfg), cfg.vocab_size
            else:
                model = hf.load_model(ModelConfig(name=str(llama_dir), seq_len=seq), FineTuneConfig(mode="full"))
                loss_fn = hf.masked_lm_loss
                shape = LMShape.from_model_dir(llama_dir, seq, FineTuneConfig(mode="full"))
                vocab = shape.vocab_size
            s = Stepper(model, loss_fn, make_optimizer(OptimConfig(), 10), "fp32", 1.0, group, shard=level,
                        backend="ring")
            x = np.random.default_rng(r).integers(0, vocab, (batch, seq + 1)).astype(np.int32)
            s.step([(x[:, :-1], x[:, 1:])])
            mx.reset_peak_memory()
            s.step([(x[:, :-1], x[:, 1:])])
            measured = mx.get_peak_memory()
            pred = step_memory(shape, batch, 1, False, "fp32", num_devices=n, shard=level)
            rows.append({"model": name, "level": level, "ranks": n, "rank": r, "batch": batch, "seq_len": seq,
                         "measured": int(measured), "predicted": int(pred.peak), "phase": pred.peak_phase})
            del s, model
    return rows


def combine(per_rank: list) -> list:
    """One row per (model, level, ranks): the largest peak over the ranks, and predicted / measured."""
    out = {}
    for rows in per_rank:
        for row in rows:
            key = (row["model"], row["level"], row["ranks"])
            if key not in out or row["measured"] > out[key]["measured"]:
                out[key] = {k: v for k, v in row.items() if k != "rank"}
    for row in out.values():
        row["ratio"] = row["predicted"] / row["measured"]
    return list(out.values())


def make_llama(root: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_llama import make_model_dir

    llama = next(dims for name, dims, _, _ in CONFIGS if name == "llama")
    return make_model_dir(root / "llama", **llama)


def _rank(args) -> None:
    import mlx.core as mx

    group = mx.distributed.init(backend="ring", strict=True)
    rows = measure_rank(group, CONFIGS, tuple(args.levels.split(",")), Path(args.llama))
    Path(args.out, f"rank-{group.rank()}.json").write_text(json.dumps(rows))


def run(ranks: int, levels: str, llama: Path, out: Path) -> list:
    ports = []
    for _ in range(ranks):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    hostfile = out / "hostfile.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in ports]))
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, "--rank", "--levels", levels, "--llama", str(llama), "--out", str(out)]
    procs = [subprocess.Popen(cmd, env={**env, "MLX_RANK": str(r)}) for r in range(ranks)]
    if max(p.wait() for p in procs):
        raise SystemExit(f"a rank of {ranks} failed")
    return combine([json.loads((out / f"rank-{r}.json").read_text()) for r in range(ranks)])


def table(rows: list) -> str:
    lines = ["| model | ranks | level | predicted MiB | measured MiB | predicted / measured |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["ranks"], LEVELS.index(r["level"]))):
        lines.append(f"| {r['model']} | {r['ranks']} | {r['level']} | {r['predicted'] / 2**20:.1f} | "
                     f"{r['measured'] / 2**20:.1f} | {r['ratio']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="2,3", help="world sizes, comma-separated")
    p.add_argument("--levels", default=",".join(LEVELS))
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--llama", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank:
        _rank(args)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        llama = make_llama(Path(tmp))
        for n in (int(v) for v in args.ranks.split(",")):
            out = Path(tmp, f"ranks-{n}")
            out.mkdir()
            rows += run(n, args.levels, llama, out)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(abs(r["ratio"] - 1) <= TOLERANCE for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
