"""docs/pipeline.md's "When to pipeline and when to shard" tables, from the memory model
(planning/memory.py, planning/stages.py) and the scaling model (planning/perf.py, stages.py).

    PYTHONPATH=src python bench/pipeline_table.py [--write]

For each model and fleet of docs/sharding.md's tables (Macs x unified memory; the same assumed Macs,
GPU working set and planner safety share as bench/shard_table.py), at the longest sequence of 2048,
1024, 512, 256 at which either fits:

- unpipelined: the plan `--shard auto` picks (data parallel, else the least shard level, in the
  planner's order: level, then fp32 / checkpointing / bf16, then the largest micro-batch), its memory
  per Mac, and its step time: one Mac's compute of its rows plus the level's sync (perf.shard_sync_s;
  at `full` under LoRA the frozen base is gathered too, twice per micro-batch);
- pipelined: the fewest stages S (dividing the Macs; the rest data-parallel replicas) at which every
  stage fits (its step and its state while its checkpoint goes by piece by piece, stages.plan's
  test), the planner's modes in order and the largest micro-batch, its largest stage's memory,
  and its step (stages.pipeline_step_s): one Mac's compute of a replica's rows over S stages, times
  1F1B's (M+S-1)/M, plus an activation forward and a gradient back per schedule slot at the link's
  rate, plus the replicas' all_sum of the whole model's gradients when R > 1.

Per link the faster of the two is in bold: what `--optimize-memory` picks when it can predict both
(the hosts' measured speeds in the cluster file and --link-gbps); without them it takes sharding
when that fits, the pipeline when only it does (the "picks" column). The full fine-tuning rows are the
sharding table's GPT-3-like shapes (vocabulary 32000, AdamW); the LoRA/QLoRA rows Llama-3-8B,
Qwen2.5-14B and Llama-3-70B's published shapes (bf16, or 4-bit with groups of 64; rank 8 on the
last 16 blocks, mlx-lm's default), where the frozen base is what does not fit. The third table is
Llama-3-70B in 4 bits again with the GPU's working set raised to 90% of a Mac's memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shard_table import FLEETS, GB, MACS, STEP_LINKS  # noqa: E402  (the same fleets, Macs and links)

from mlx_train.config import SHARD_LEVELS, TrainConfig, from_dict  # noqa: E402
from mlx_train.planning import perf, stages  # noqa: E402
from mlx_train.planning.memory import RUNTIME_OVERHEAD, SAFETY_FRACTION, LMShape, ModelShape, step_memory  # noqa: E402

SIZES = (1e9, 3e9, 8e9, 14e9)
SEQ_LENS = (2048, 1024, 512, 256)
MODES = stages.PLANNER_MODES
DOC = Path(__file__).resolve().parent.parent / "docs" / "pipeline.md"
# Published config.json shapes: (name, layers, hidden, intermediate, heads, kv heads, vocab, tied).
LMS = (("Llama-3-8B", 32, 4096, 14336, 32, 8, 128256, False),
       ("Qwen2.5-14B", 48, 5120, 13824, 40, 8, 152064, False),
       ("Llama-3-70B", 80, 8192, 28672, 64, 8, 128256, False))
LORA_FLEETS = ((2, 32),) + FLEETS
RAISED_WORKING_SET = 0.9  # the third table's: a Mac's GPU allowed 90% of its memory


@dataclasses.dataclass(frozen=True)
class Option:
    what: str       # e.g. "full, 1 x 8, ckpt, bf16" or "2 stages, 1 x 16, ckpt"
    memory: float   # bytes per Mac (the largest stage's for a pipeline), runtime overhead included
    step: dict      # link key -> predicted seconds


def _cfg(batch: int, accumulation: int, devices: int, stages_: int, precision: str, ckpt: bool) -> TrainConfig:
    # Only the split, precision and checkpointing are read by stage_need: the shape is passed apart.
    return from_dict(TrainConfig, {"dist": {"num_devices": devices, "batch_size_per_device": batch,
                                            "gradient_accumulation": accumulation, "pipeline_stages": stages_},
                                   "precision": precision, "grad_checkpoint": ckpt})


def _flops(shape, n_params: float, tokens: float, recompute: bool) -> float:
    """A step's FLOPs: 2 per parameter and token forward, 2 for the inputs' gradients, 2 for the weights'
    (full fine-tuning only: a frozen base has none), 2 more when the forward runs again (checkpointing)."""
    full = not isinstance(shape, LMShape) or shape.fine_tune == "full"
    return (4 + 2 * full + 2 * recompute) * n_params * tokens


def _divisors_desc(n: int):
    return [d for d in range(n, 0, -1) if n % d == 0]


def unpipelined(shape, n_params: Optional[int], macs: int, g: int, usable: float) -> Optional[tuple]:
    """The planner's unpipelined plan (suggest_config's order), or None: (level, batch, acc, prec, ckpt, total)."""
    for level in SHARD_LEVELS:
        for prec, ckpt in MODES:
            for b in _divisors_desc(g // macs):
                total = step_memory(shape, b, g // macs // b, ckpt, prec, n_params=n_params, num_devices=macs,
                                    shard=level).total
                if total <= usable:
                    return level, b, g // macs // b, prec, ckpt, total
    return None


def pipelined(shape, macs: int, g: int, usable: float) -> Optional[tuple]:
    """The fewest stages that fit (stages.fit_at's order), or None: (S, batch, M, prec, ckpt, largest stage)."""
    from mlx_train.rank.pipeline import stage_layers

    for s in (s for s in range(2, min(macs, shape.n_layers) + 1) if macs % s == 0):
        rows = g // (macs // s)
        layers = stage_layers(shape.n_layers, [1.0] * s)
        for prec, ckpt in MODES:
            for b in _divisors_desc(rows):
                cfg = _cfg(b, rows // b, macs, s, prec, ckpt)
                need = max(max(stages.stage_need(cfg, shape, r, i, s), stages.checkpoint_need(shape, r, i, s))
                           for i, r in enumerate(layers)) + RUNTIME_OVERHEAD
                if need <= usable:
                    return s, b, rows // b, prec, ckpt, need
    return None


def options(shape, n_params: int, macs: int, gb: int, g: int, working_set: float, mfu: float):
    """(T, unpipelined Option or None, pipelined Option or None) at the longest T where either fits."""
    usable = gb * GB * working_set * SAFETY_FRACTION
    flops_per_s = MACS[gb][1] * mfu
    links = {k: perf.LINKS[k] for k in STEP_LINKS}
    exact = n_params if isinstance(shape, ModelShape) else None
    grad = 4 * (shape.trainable if isinstance(shape, LMShape) else n_params)
    frozen = shape.frozen_bytes
    for seq in SEQ_LENS:
        sh = dataclasses.replace(shape, seq_len=seq)
        if isinstance(shape, ModelShape):
            sh = ModelShape.from_model_size(n_params, seq, shape.vocab_size)
        un, pipe = unpipelined(sh, exact, macs, g, usable), pipelined(sh, macs, g, usable)
        if un is None and pipe is None:
            continue
        a = b = None
        if un:
            level, mb, acc, prec, ckpt, total = un
            compute = _flops(sh, n_params, g * seq, ckpt or level == "full") / flops_per_s  # one Mac, all rows
            a = Option(f"{'data parallel' if level == 'none' else level}, {mb} x {acc}{', ckpt' if ckpt else ''}"
                       f"{', bf16' if prec == 'bf16' else ''}", total,
                       {k: stages.shard_step_s(compute, macs, level, acc, grad, sh.n_layers, lk, frozen)
                        for k, lk in links.items()})
        if pipe:
            s, mb, m, prec, ckpt, need = pipe
            r = macs // s
            compute = _flops(sh, n_params, g // r * seq, ckpt) / flops_per_s  # one Mac, a replica's rows
            act = mb * seq * sh.d_model * (2 if prec == "bf16" else 4)
            b = Option(f"{s} stages{f' x {r} replicas' if r > 1 else ''}, {mb} x {m}{', ckpt' if ckpt else ''}"
                       f"{', bf16' if prec == 'bf16' else ''}", need,
                       {k: stages.pipeline_step_s(compute, s, m, act, lk, r, grad) for k, lk in links.items()})
        return seq, a, b
    return None


def _cell(a: Optional[Option], b: Optional[Option], key: str) -> str:
    sa = f"{a.step[key]:.1f}" if a else "-"
    sb = f"{b.step[key]:.1f}" if b else "-"
    if a and b:
        if a.step[key] <= b.step[key]:
            sa = f"**{sa}**"
        else:
            sb = f"**{sb}**"
    return f"{sa} / {sb}"


def rows(label: str, shape, n_params: int, fleets, g: int, working_set: float, mfu: float) -> list:
    out = []
    for macs, gb in fleets:
        found = options(shape, n_params, macs, gb, g, working_set, mfu)
        if found is None:
            out.append(f"| {label} | {macs} x {gb} GB | - | nothing fits | nothing fits | - | "
                       + " | ".join("-" for _ in STEP_LINKS) + " |")
            continue
        seq, a, b = found
        pick = (a or b).what.split(",")[0]  # without speeds: unpipelined whenever it fits
        out.append(f"| {label} | {macs} x {gb} GB | {seq} | "
                   f"{f'{a.what} ({a.memory / GB:.1f} GB)' if a else 'nothing fits'} | "
                   f"{f'{b.what} ({b.memory / GB:.1f} GB)' if b else 'nothing fits'} | {pick} | "
                   + " | ".join(_cell(a, b, k) for k in STEP_LINKS) + " |")
    return out


def header() -> list:
    names = [perf.LINKS[k].name for k in STEP_LINKS]
    return ["| model | fleet | T | unpipelined: plan (per Mac) | pipelined: plan (largest stage) | picks without "
            "speeds | " + " | ".join(f"{n}: step s, unpipelined / pipelined" for n in names) + " |",
            "|---|---|---:|---|---|---|" + "---|" * len(names)]


def tables(g: int, working_set: float, mfu: float) -> str:
    full = header()
    for size in SIZES:
        shape = ModelShape.from_model_size(size)
        full += rows(f"{size / 1e9:g}B full", shape, int(size), FLEETS, g, working_set, mfu)
    lora = header()
    for name, layers, d, inter, heads, kv, vocab, tied in LMS:
        for bits, what in ((0, "LoRA"), (4, "QLoRA 4-bit")):
            shape = LMShape(n_layers=layers, d_model=d, n_heads=heads, seq_len=2048, vocab_size=vocab, n_kv_heads=kv,
                            head_dim=d // heads, intermediate_size=inter, tied_embeddings=tied, dtype_bytes=2,
                            quant_bits=bits, fine_tune="lora", lora_rank=8, lora_layers=16)
            lora += rows(f"{name} {what}", shape, shape.n_params, LORA_FLEETS, g, working_set, mfu)
            if name == "Llama-3-70B" and bits:
                raised = shape
    # The headline case again with the GPU's working set raised (sysctl iogpu.wired_limit_mb).
    headline = header() + rows("Llama-3-70B QLoRA 4-bit", raised, raised.n_params, LORA_FLEETS, g, RAISED_WORKING_SET,
                               mfu)
    return "\n\n".join("\n".join(t) for t in (full, lora, headline))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--global-batch", type=int, default=32, help="sequences per optimizer step")
    ap.add_argument("--working-set", type=float, default=0.75, help="share of a Mac's memory its GPU may use")
    ap.add_argument("--mfu", type=float, default=0.35, help="assumed sustained share of a Mac GPU's fp32 peak")
    ap.add_argument("--write", action="store_true", help="replace the tables in docs/pipeline.md")
    a = ap.parse_args()
    text = tables(a.global_batch, a.working_set, a.mfu)
    if not a.write:
        print(text)
        return
    doc = DOC.read_text()
    start, end = "<!-- pipeline-table:start -->\n", "<!-- pipeline-table:end -->"
    before, rest = doc.split(start, 1)
    DOC.write_text(before + start + text + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
