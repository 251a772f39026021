"""Predicted against measured peak memory of one training step on pretrained (llama-family) models.

Builds a random llama model directory offline (tests/tiny_llama.py, 4 layers, width 256) and its
4-bit build, runs two `Stepper.step`s per configuration in a fresh process, and prints
`mx.get_peak_memory()` of the second beside the planner's `step_memory` peak:

    python bench/lm_memory.py [--json]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (weights, fine-tune, batch, seq_len, checkpointing, precision)
CONFIGS = [("fp", "full", 4, 128, False, "fp32"), ("fp", "lora", 4, 128, False, "fp32"),
           ("fp", "dora", 4, 128, False, "fp32"), ("4bit", "lora", 4, 128, False, "fp32"),
           ("fp", "lora", 8, 256, False, "fp32"), ("fp", "full", 2, 64, False, "fp32"),
           ("fp", "lora", 4, 128, True, "fp32"), ("fp", "full", 4, 128, False, "bf16")]

_ONE = """
import sys, json
import mlx.core as mx, numpy as np
from mlx_train.config import FineTuneConfig, ModelConfig, OptimConfig
from mlx_train.planning.memory import LMShape, step_memory
from mlx_train.rank import hf
from mlx_train.rank.step import Stepper, make_optimizer
path, mode, B, T, ckpt, precision = json.loads(sys.argv[1])
ft = FineTuneConfig(mode=mode, lora_layers=-1)
mx.random.seed(0)
model = hf.load_model(ModelConfig(name=path, seq_len=T), ft, ckpt)
opt = make_optimizer(OptimConfig(), 10)
st = Stepper(model, hf.masked_lm_loss, opt, precision, 1.0, None)
opt.init(st.params)
mx.eval(st.params, opt.state)
x = np.random.default_rng(0).integers(0, 512, (B, T + 1)).astype(np.int32)
st.step([(x[:, :-1], x[:, 1:])])
mx.reset_peak_memory()
st.step([(x[:, :-1], x[:, 1:])])
pred = step_memory(LMShape.from_model_dir(path, T, ft), B, 1, ckpt, precision)
print(json.dumps({"measured": mx.get_peak_memory(), "predicted": pred.peak, "phase": pred.peak_phase}))
"""


def build(root: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_llama import make_model_dir, quantize_model_dir

    fp = make_model_dir(root / "llama-256", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2)
    return {"fp": fp, "4bit": quantize_model_dir(fp, root / "llama-256-4bit")}


def measure(models: dict, configs=CONFIGS) -> list:
    rows = []
    for weights, mode, batch, seq, ckpt, precision in configs:
        arg = json.dumps([str(models[weights]), mode, batch, seq, ckpt, precision])
        out = subprocess.run([sys.executable, "-c", _ONE, arg], capture_output=True, text=True, timeout=600,
                             check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"weights": weights, "fine_tune": mode, "batch": batch, "seq_len": seq, "checkpointing": ckpt,
                     "precision": precision, **r, "error": r["predicted"] / r["measured"] - 1})
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(build(Path(tmp)))
    if "--json" in sys.argv:
        print(json.dumps(rows, indent=1))
        return
    print("| weights | fine-tune | batch | seq | ckpt | precision | measured MiB | predicted MiB | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['weights']} | {r['fine_tune']} | {r['batch']} | {r['seq_len']} | {'on' if r['checkpointing'] else 'off'}"
              f" | {r['precision']} | {r['measured'] / 2**20:.1f} | {r['predicted'] / 2**20:.1f} | {r['error']:+.1%} |")


if __name__ == "__main__":
    main()
