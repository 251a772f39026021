"""docs/sharding.md's "Which level the planner picks" table, from the memory model (planning/memory.py).

    PYTHONPATH=src python bench/shard_table.py

For each model size (a GPT-3-like shape, --seq-len 2048, vocabulary 32000, full fine-tune with AdamW)
and fleet (Macs x unified memory): the least memory per Mac at each shard level (batch 1 per device,
checkpointing, the lesser of fp32 and bf16: the smallest step, as check_fits judges a run) and the level `--shard auto` picks
for a global batch of --global-batch sequences. A Mac's GPU may use about --working-set of its memory
(Metal's recommended working set), and the planner keeps its safety share of that.
"""

from __future__ import annotations

import argparse

from mlx_train.config import SHARD_LEVELS
from mlx_train.planning.memory import ModelShape, step_memory
from mlx_train.planning.planner import MemoryOptimizer

GB = 10**9
SIZES = (1e9, 3e9, 8e9, 14e9)
FLEETS = ((2, 64), (4, 32), (8, 16))  # (Macs, GB each)


def table(global_batch: int, working_set: float) -> str:
    rows = ["| model | fleet | " + " | ".join(SHARD_LEVELS) + " | usable per Mac | planner picks |",
            "|---|---|" + "---|" * len(SHARD_LEVELS) + "---|---|"]
    for size in SIZES:
        shape = ModelShape.from_model_size(size)
        for macs, gb in FLEETS:
            least = [min(step_memory(shape, 1, 2, True, precision, n_params=int(size), num_devices=macs,
                                     shard=level).total for precision in ("fp32", "bf16"))
                     for level in SHARD_LEVELS]
            plan = MemoryOptimizer.suggest_config(model_size=size, num_devices=macs, global_batch_size=global_batch,
                                                  memory_per_device=gb * GB * working_set)
            pick = (f"{plan.shard} ({plan.suggested_batch_size} x {plan.gradient_accumulation}, "
                    f"{'checkpointing, ' if plan.activation_checkpointing else ''}{plan.precision}, "
                    f"{plan.breakdown.total / GB:.1f} GB)" if plan.fits else "nothing fits")
            rows.append(f"| {size / 1e9:g}B | {macs} x {gb} GB | " + " | ".join(f"{m / GB:.1f}" for m in least)
                        + f" | {plan.hardware.usable_memory / GB:.1f} | {pick} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--global-batch", type=int, default=32, help="sequences per optimizer step")
    ap.add_argument("--working-set", type=float, default=0.75, help="share of a Mac's memory its GPU may use")
    a = ap.parse_args()
    print(table(a.global_batch, a.working_set))


if __name__ == "__main__":
    main()
