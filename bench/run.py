"""`make bench`: run the benchmarks and write their figures into README.md's Performance section.

Every figure is a ratio against a baseline measured in the same run (the machines are shared and
noisy); absolute times are shown for context only.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
RESULTS = HERE / "results.json"


def _run(script: str, env_extra: dict, args: dict | None = None) -> dict:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, str(HERE / script), json.dumps(args or {})], env=env, capture_output=True,
                         text=True, timeout=1200)
    if out.returncode:
        raise SystemExit(f"{script} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from mlx_train.rank import blas

    fast = blas.rank_env(ranks_on_host=1)
    ref = {"MLX_TRAIN_NO_OPENBLAS": "1"}
    res = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "blas": fast.get("LD_PRELOAD", "reference only")}
    print("step overhead (OpenBLAS) ...", flush=True)
    res["step"] = _run("step_overhead.py", fast)
    print("step overhead (reference BLAS) ...", flush=True)
    res["step_refblas"] = _run("step_overhead.py", ref, {"rounds": 3, "steps_per_round": 2})
    print("gradient sync, 2 ranks ...", flush=True)
    two = blas.rank_env(ranks_on_host=2)  # two ranks share this host's cores
    res["sync"] = _run("sync_overhead.py", two)
    res["sync_large"] = _run("sync_overhead.py", two, {"width": 256, "layers": 8, "rounds": 9, "reps": 8})
    # The default model at batch 8 on one device: the baseline `monitor --performance` scales against.
    from mlx_train.config import TrainConfig
    from mlx_train.planning.perf import record_baseline

    record_baseline(TrainConfig(), res["step"]["tokens_per_s"])
    RESULTS.write_text(json.dumps(res, indent=1))
    write_readme(res)
    print(table(res))


def table(res: dict) -> str:
    s, r, y, yl = res["step"], res["step_refblas"], res["sync"], res["sync_large"]
    return "\n".join([
        f"Measured {res['when']} on {res['machine']} (Linux CPU build of MLX), `make bench`:",
        "",
        "| benchmark | baseline (same run) | trainer | ratio | goal |",
        "|---|---|---|---|---|",
        f"| optimizer step, {s['model']}, 1 process | bare MLX loop {s['bare_step_s'] * 1e3:.1f} ms | "
        f"{s['trainer_step_s'] * 1e3:.1f} ms | **{s['ratio']:.3f}** | >= 0.97 |",
        f"| gradient sync, 2 ranks ring/loopback, {y['grad_bytes'] / 2**20:.1f} MiB in {y['tensors']} tensors | "
        f"one all_sum of one buffer {y['single_all_sum_s'] * 1e3:.2f} ms | {y['trainer_sync_s'] * 1e3:.2f} ms | "
        f"**{y['ratio']:.3f}** | >= 0.9 |",
        f"| gradient sync, 2 ranks, {yl['grad_bytes'] / 2**20:.1f} MiB in {yl['tensors']} tensors | "
        f"{yl['single_all_sum_s'] * 1e3:.2f} ms | {yl['trainer_sync_s'] * 1e3:.2f} ms | **{yl['ratio']:.3f}** | >= 0.9 |",
        f"| BLAS: trainer tokens/s with OpenBLAS vs the wheel's reference BLAS | {r['tokens_per_s']:,.0f} tok/s | "
        f"{s['tokens_per_s']:,.0f} tok/s | **{s['tokens_per_s'] / r['tokens_per_s']:.1f}x** | - |",
        "",
        "Ratios are baseline time / trainer time, medians of interleaved rounds (1.0 = no overhead).",
    ])


def write_readme(res: dict) -> None:
    text = README.read_text()
    block = f"<!-- bench:start -->\n{table(res)}\n<!-- bench:end -->"
    new = re.sub(r"<!-- bench:start -->.*?<!-- bench:end -->", lambda _: block, text, flags=re.S)
    README.write_text(new)


if __name__ == "__main__":
    main()
