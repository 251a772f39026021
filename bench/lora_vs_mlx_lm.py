"""Per-process tokens/s of a LoRA (or full) fine-tune: mlx-train against mlx-lm's own trainer.

Same model (a random llama made offline by tests/tiny_llama.py, 4 layers, width 256), same data
(text lines longer than the sequence, so both trainers see full rows), same batch and sequence
length, one process each, the same BLAS environment as a mlx-train rank. Prints one line per
trainer and their ratio:

    python bench/lora_vs_mlx_lm.py [--fine-tune lora|full] [--steps 60] [--batch 4] [--seq-len 256]

`make bench` (bench/run.py) calls it with one JSON argument instead and reads one JSON line back.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from timing import mlx_lm_windows, mlx_train_windows  # noqa: E402

_MLX_LM = """
import json, sys, types
from pathlib import Path
import mlx.core as mx, mlx.optimizers as optim
from mlx_lm import load
from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train
from mlx_lm.tuner.utils import linear_to_lora_layers
model_dir, data_dir, mode, steps, batch, seq, out = sys.argv[1:]
steps, batch, seq = int(steps), int(batch), int(seq)
mx.random.seed(0)
model, tok = load(model_dir)
if mode == "lora":
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 20.0, "dropout": 0.0})
train_set, valid_set, _ = load_local_dataset(Path(data_dir), tok, types.SimpleNamespace(mask_prompt=False))
import time
reports = []
class Cb(TrainingCallback):
    def on_train_loss_report(self, info):
        reports.append((time.perf_counter(), {k: float(info[k]) for k in ("tokens_per_second", "trained_tokens")}))
args = TrainingArgs(batch_size=batch, iters=steps, val_batches=1, steps_per_report=10, steps_per_eval=10**6,
                    steps_per_save=10**6, max_seq_length=seq + 1, adapter_file=out + "/adapters.safetensors")
train(model, optim.AdamW(learning_rate=1e-4), CacheDataset(train_set), CacheDataset(valid_set), args=args,
      training_callback=Cb())
print(json.dumps(reports))
"""


def make_data(out: Path, n: int = 300, chars: int = 3000) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / f).read_text() for f in ("textwrap.py", "argparse.py", "string.py"))
    lines = [json.dumps({"text": text[(i * chars) % (len(text) - chars):][:chars]}) for i in range(n)]
    (out / "train.jsonl").write_text("\n".join(lines[:-20]) + "\n")
    (out / "valid.jsonl").write_text("\n".join(lines[-20:]) + "\n")
    return out


def rank_env() -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from mlx_train.rank import blas

    return {**os.environ, **blas.rank_env(1)}


def run_mlx_lm(model: Path, data: Path, mode: str, steps: int, batch: int, seq: int, tmp: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _MLX_LM, str(model), str(data), mode, str(steps), str(batch),
                          str(seq), str(tmp)], env=rank_env(), capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise SystemExit(f"mlx-lm trainer failed:\n{out.stderr[-3000:]}")
    return mlx_lm_windows(json.loads(out.stdout.strip().splitlines()[-1]))


def run_mlx_train(model: Path, data: Path, mode: str, steps: int, batch: int, seq: int, tmp: Path) -> dict:
    run = tmp / "run"
    args = ["train", "--model", str(model), "--data", str(data), "--fine-tune", mode, "--lora-layers", "-1",
            "--steps", str(steps), "--batch-size", str(batch), "--seq-len", str(seq), "--log-every", "10",
            "--eval-every", str(10 ** 6), "--checkpoint-every", str(10 ** 6), "--lr", "1e-4", "--no-live",
            "--run-dir", str(run)]
    env = {**os.environ, "MLX_TRAIN_CACHE": str(tmp / "cache"), "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-m", "mlx_train.cli", *args], env=env, capture_output=True, text=True,
                         timeout=1800)
    if out.returncode:
        raise SystemExit(f"mlx-train failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return mlx_train_windows([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                              if line.strip()])


def measure(fine_tune: str = "lora", steps: int = 60, batch: int = 4, seq_len: int = 256, rounds: int = 2) -> dict:
    """Both trainers on the same offline llama and data, alternating round by round (the machine's
    noise hits both alike), one process each. The ratio is of wall-clock tokens/s: mlx-lm's own
    figure leaves out the time it spends batching data and reporting, ours the time logging."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_llama import make_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model_dir(tmp / "llama-256", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2)
        data = make_data(tmp / "data")
        ours, theirs = {"own": [], "wall": []}, {"own": [], "wall": []}
        for r in range(rounds):
            for side, run, name in ((ours, run_mlx_train, "ours"), (theirs, run_mlx_lm, "theirs")):
                (tmp / f"{name}{r}").mkdir()
                got = run(model, data, fine_tune, steps, batch, seq_len, tmp / f"{name}{r}")
                side["own"] += got["own"]
                side["wall"] += got["wall"]
    o, t = statistics.median(ours["wall"]), statistics.median(theirs["wall"])
    own = statistics.median(ours["own"]) / statistics.median(theirs["own"])
    return {"fine_tune": fine_tune, "steps": steps, "batch": batch, "seq_len": seq_len, "rounds": rounds,
            "mlx_train_windows": ours, "mlx_lm_windows": theirs, "mlx_train_tokens_per_s": o,
            "mlx_lm_tokens_per_s": t, "ratio": o / t, "own_clock_ratio": own}


def main() -> None:
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        print(json.dumps(measure(**json.loads(sys.argv[1]))))
        return
    p = argparse.ArgumentParser()
    p.add_argument("--fine-tune", choices=["lora", "full"], default="lora")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    r = measure(a.fine_tune, a.steps, a.batch, a.seq_len, a.rounds)
    print(f"{a.fine_tune}, batch {a.batch} x seq {a.seq_len}, {a.steps} steps, one process each")
    for who, key in (("mlx-train", "mlx_train"), ("mlx-lm trainer", "mlx_lm")):
        windows = ", ".join(f"{x:,.0f}" for x in r[f"{key}_windows"]["wall"])
        print(f"  {who:<18} {r[f'{key}_tokens_per_s']:10,.0f} tokens/s  (wall-clock windows: {windows})")
    print(f"  ratio mlx-train / mlx-lm (wall clock): {r['ratio']:.3f}; by each trainer's own clock: "
          f"{r['own_clock_ratio']:.3f}")


if __name__ == "__main__":
    main()
