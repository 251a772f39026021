"""docs/sharding.md's "Which level the planner picks" table, from the memory model (planning/memory.py),
and its "Step time on a desk of Macs" table, from the scaling model (planning/perf.py).

    PYTHONPATH=src python bench/shard_table.py [--steps]

For each model size (a GPT-3-like shape, --seq-len 2048, vocabulary 32000, full fine-tune with AdamW)
and fleet (Macs x unified memory): the least memory per Mac at each shard level (batch 1 per device,
checkpointing, the lesser of fp32 and bf16: the smallest step, as check_fits judges a run) and the level `--shard auto` picks
for a global batch of --global-batch sequences. A Mac's GPU may use about --working-set of its memory
(Metal's recommended working set), and the planner keeps its safety share of that.

--steps prints the second table instead: per model and fleet, the plan `--shard auto` picks (at
the longest of --seq-len, 1024, 512, 256 that fits anywhere), and over each link of LINKS the step
time the scaling model predicts: each Mac's compute of its share of the global batch (6 FLOPs per
parameter per token, 8 with the forward recomputed: checkpointing, and always at `full`) at an
assumed sustained rate (MACS: --mfu of the GPU's fp32 peak), plus the level's communication
(perf.shard_sync_s: what this code moves per step, `full` per micro-batch; fp32 gradients), nothing
overlapped (perf.MLX_OVERLAPS). The update (AdamW over 1/N of the parameters, memory-bound) is left out.
"""

from __future__ import annotations

import argparse

from mlx_train.config import SHARD_LEVELS
from mlx_train.planning import perf
from mlx_train.planning.memory import ModelShape, step_memory
from mlx_train.planning.planner import MemoryOptimizer

GB = 10**9
SIZES = (1e9, 3e9, 8e9, 14e9)
FLEETS = ((2, 64), (4, 32), (8, 16))  # (Macs, GB each)
# An assumption, not a measurement (this project has no Macs): the Mac a fleet of that memory is
# likely made of, and its GPU's fp32 peak, GPU cores x 128 FP32 lanes x 2 (FMA) x its clock (~1.8 GHz).
MACS = {64: ("M4 Max, 40-core GPU", 18.4e12), 32: ("M4, 10-core GPU", 4.6e12), 16: ("M4, 10-core GPU", 4.6e12)}
STEP_LINKS = ("10gbe", "tb4", "tb5-rdma")  # perf.LINKS: 10 GbE, Thunderbolt ring over TCP, TB5 RDMA (JACCL)
SEQ_LENS = (2048, 1024, 512, 256)


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


def _plan(size: float, macs: int, gb: int, global_batch: int, working_set: float):
    """The plan `--shard auto` picks at the longest sequence of SEQ_LENS that fits, or None."""
    for seq in SEQ_LENS:
        plan = MemoryOptimizer.suggest_config(model_size=size, num_devices=macs, global_batch_size=global_batch,
                                              memory_per_device=gb * GB * working_set, seq_len=seq)
        if plan.fits:
            return seq, plan
    return None


def step_table(global_batch: int, working_set: float, mfu: float) -> str:
    links = [perf.LINKS[k] for k in STEP_LINKS]
    rows = ["| model | fleet | planner picks | compute s | " + " | ".join(f"{lk.name}: step s (sync)" for lk in links)
            + " |", "|---|---|---|---|" + "---|" * len(links)]
    for size in SIZES:
        for macs, gb in FLEETS:
            found = _plan(size, macs, gb, global_batch, working_set)
            if found is None:
                more = next((m for m in (4, 8, 16, 32) if m > macs and _plan(size, m, gb, global_batch, working_set)),
                            None)
                need = f"fits on {more} such Macs" if more else "fits on none of 4, 8, 16, 32 such Macs"
                rows.append(f"| {size / 1e9:g}B | {macs} x {gb} GB | nothing fits, at any level or T >= "
                            f"{SEQ_LENS[-1]}; `full` {need} | - | " + " | ".join("-" for _ in links) + " |")
                continue
            seq, plan = found
            tokens = plan.suggested_batch_size * plan.gradient_accumulation * seq  # per Mac per step
            recompute = plan.activation_checkpointing or plan.shard == "full"
            compute = perf.train_flops(plan.n_params, tokens, recompute) / (MACS[gb][1] * mfu)
            cells = []
            for link in links:
                sync = perf.shard_sync_s(4 * plan.n_params, macs, link, plan.shard, plan.gradient_accumulation,
                                         plan.model.n_layers + 1)
                cells.append(f"{compute + sync:.1f} ({sync / (compute + sync):.0%})")
            rows.append(f"| {size / 1e9:g}B | {macs} x {gb} GB | {plan.shard}, T{seq}, {plan.suggested_batch_size} x "
                        f"{plan.gradient_accumulation}{', ckpt' if plan.activation_checkpointing else ''}, "
                        f"{plan.breakdown.total / GB:.1f} GB | {compute:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--global-batch", type=int, default=32, help="sequences per optimizer step")
    ap.add_argument("--working-set", type=float, default=0.75, help="share of a Mac's memory its GPU may use")
    ap.add_argument("--steps", action="store_true", help="the step-time table (scaling model) instead")
    ap.add_argument("--mfu", type=float, default=0.35, help="assumed sustained share of a Mac GPU's fp32 peak")
    a = ap.parse_args()
    print(step_table(a.global_batch, a.working_set, a.mfu) if a.steps else table(a.global_batch, a.working_set))


if __name__ == "__main__":
    main()
