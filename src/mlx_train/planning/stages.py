"""Pipeline stages from the hosts' memory (docs/pipeline.md): how many stages a run takes
(`--pipeline-stages auto`), each stage's share of the layers, and whether each stage fits its host.

A stage's share of the layers is in proportion to the memory budget of the rank that holds it
(rank_budget_for that host: the cluster file's memory, or --memory-budget for all), so equal hosts
get equal stages and a host with twice the memory twice the layers. Ranks sit on the hosts in blocks
(fleet/hosts.with_devices) and rank = replica x S + stage (rank/pipeline.py Placement); a stage's
budget is the tightest of its replicas'.

What a stage needs (`stage_need`) is the memory model's (planning/memory.py) for the part of the
model the stage holds: its layers' weights, the embeddings on the first stage, the final norm and
the head on the last (a tied head: the embeddings again, on the last stage too); the trainable
state (weights, gradients, AdamW moments, the update's copies) in proportion to the trainable
parameters the stage holds; the activations of its layers for each micro-batch it has in flight
under 1F1B (S - s on stage s, at most M), the logits on the last stage only.

For the built-in GPT's full fp32 training without checkpointing, `stage_memory` is the finer
model (the accumulator, 1F1B's forwards in flight with their saved tensors, the update's copies,
whichever peak is higher), checked against real ring ranks by bench/pipeline_memory.py (within
±15% on 12 stages, docs/pipeline.md "Memory per stage"); `stage_need` takes it there. A stage
must also hold its state while its checkpoint goes by piece by piece (`checkpoint_need`: the
largest piece in flight), which `plan` counts.

For --optimize-memory (controller/run.py plan_for_budget): `fewest` stages at which a run that fits
no device unpipelined fits, `fit_at` a given S's micro-batch, and `prefer`, pipeline or shard where
both fit, by the scaling model of each (`pipeline_step_s`, `shard_step_s`; docs/pipeline.md "When to
pipeline and when to shard", bench/pipeline_table.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from mlx_train.config import TrainConfig
from mlx_train.errors import UserError
from mlx_train.planning.memory import (ACTIVATIONS, LOGITS_FP32_COPIES, OPTIMIZER_STATE_COPIES, RUNTIME_OVERHEAD,
                                       UPDATE_TEMPORARIES, UPDATE_WEIGHT_AND_GRAD_COPIES, LMShape, MemoryBreakdown,
                                       ModelShape, activation_bytes, step_memory)
from mlx_train.rank.device import rank_budget_for
from mlx_train.units import human

AUTO = 0  # --pipeline-stages auto, before the controller resolves it (config.parse_stages)


def rank_hosts(hosts: Sequence[Any]) -> list:
    """The host of every rank, by rank: ranks on the hosts in blocks, as with_devices places them."""
    return [h for h in hosts for _ in range(h.slots)]


def stage_budgets(cfg: TrainConfig, hosts: Sequence[Any], stages: int) -> List[int]:
    """Each stage's memory budget: the tightest host among the ranks holding it (one per replica)."""
    by_rank = rank_hosts(hosts)
    if len(by_rank) % stages:
        raise UserError(f"{len(by_rank)} devices do not split into {stages} pipeline stages: the devices are "
                        "stages x replicas (pass --devices, or another --pipeline-stages)")
    return [min(rank_budget_for(cfg, [by_rank[r]]) for r in range(s, len(by_rank), stages)) for s in range(stages)]


def stage_weights(cfg: TrainConfig, hosts: Sequence[Any], stages: int) -> Optional[Tuple[float, ...]]:
    """The layers' shares (DistributedConfig.stage_weights): the stages' budgets, in GiB; None when they
    are equal (equal stages, exactly as without weights)."""
    budgets = stage_budgets(cfg, hosts, stages)
    if stages < 2 or len(set(budgets)) < 2:
        return None
    return tuple(round(b / 2**30, 4) for b in budgets)


def _adapted_in(shape: LMShape, layers: range) -> int:
    """Blocks of `layers` with adapters: LoRA adapts the model's last --lora-layers blocks."""
    n = shape.n_layers
    adapted = n if shape.lora_layers == -1 else min(shape.lora_layers, n)
    return max(0, layers.stop - max(layers.start, n - adapted))


def _trainable_share(shape, layers: range, first: bool, last: bool) -> float:
    """The stage's share of the model's trainable parameters."""
    n = shape.n_layers
    if isinstance(shape, LMShape) and shape.fine_tune != "full":
        adapted = n if shape.lora_layers == -1 else min(shape.lora_layers, n)
        return _adapted_in(shape, layers) / max(1, adapted)
    d, vocab = shape.d_model, shape.vocab_size
    if isinstance(shape, LMShape):
        block = (shape.n_params - vocab * d * (1 if shape.tied_embeddings else 2) - d) / n
        ends = (vocab * d if first else 0) + ((d + (0 if shape.tied_embeddings else vocab * d)) if last else 0)
    else:
        block = 12 * d * d + 9 * d
        ends = ((vocab + shape.seq_len) * d if first else 0) + (vocab * d + 2 * d if last else 0)
    return (len(layers) * block + ends) / shape.n_params


def _frozen(shape, layers: range, first: bool, last: bool) -> int:
    """The frozen base's bytes on the stage (a LoRA/DoRA/QLoRA base: its layers, embeddings, head)."""
    if not isinstance(shape, LMShape) or shape.fine_tune == "full":
        return 0
    d = shape.d_model
    block = shape._held([(i, i * o) for i, o in shape._linears().values()]) + 2 * d * shape.dtype_bytes
    table = shape._held([(d, shape.vocab_size * d)])
    ends = (table if first else 0) + ((table if not (shape.tied_embeddings and first) else 0) + d * shape.dtype_bytes
                                      if last else 0)
    return int(len(layers) * block + ends)


def stage_need(cfg: TrainConfig, shape, layers: range, stage: int, stages: int) -> int:
    """Predicted peak bytes (mx.get_peak_memory's, no runtime overhead) of `stage` holding `layers`."""
    first, last = stage == 0, stage == stages - 1
    d = cfg.dist
    if isinstance(shape, ModelShape) and cfg.precision == "fp32" and not cfg.grad_checkpoint:
        return stage_memory(shape, stages, stage, d.batch_size_per_device, d.gradient_accumulation,
                            layers=len(layers)).peak
    whole = step_memory(shape, d.batch_size_per_device, d.gradient_accumulation, cfg.grad_checkpoint, cfg.precision)
    frozen_whole = shape.frozen_bytes
    acts_whole = whole.activations
    trainable = (whole.peak - frozen_whole - acts_whole) * _trainable_share(shape, layers, first, last)
    sub = dataclasses.replace(shape, n_layers=len(layers),
                              **({"lora_layers": _adapted_in(shape, layers)} if isinstance(shape, LMShape) else {}))
    if not last:  # the logits and the loss are the last stage's
        sub = dataclasses.replace(sub, vocab_size=1)
    acts = activation_bytes(sub, d.batch_size_per_device, cfg.grad_checkpoint, cfg.precision)
    # What one backward works in (a layer's internals, recomputed ones under checkpointing, the
    # logits) is live once; what each forward in flight keeps for its backward (its layers' saved
    # tensors) is held per micro-batch in flight, as stage_memory counts the GPT's.
    def at(n: int) -> int:  # the counts are linear in the layers: what is left at none is live
        return activation_bytes(dataclasses.replace(sub, n_layers=n, **({"lora_layers": 0} if isinstance(sub, LMShape)
                                                                        else {})),
                                d.batch_size_per_device, cfg.grad_checkpoint, cfg.precision)

    live = max(0, 2 * at(1) - at(2))
    in_flight = min(stages - stage, d.gradient_accumulation)
    return int(_frozen(shape, layers, first, last) + trainable + (acts - live) * in_flight + live)


def peak(cfg: TrainConfig) -> int:
    """The largest stage's predicted peak for a pipelined `cfg`, its layers split by its recorded
    stage_weights (the out-of-memory judge: what a rank of this run should have reached)."""
    from mlx_train.planning.planner import model_shape
    from mlx_train.rank.pipeline import stage_layers

    shape, stages = model_shape(cfg.model, cfg.fine_tune), cfg.dist.pipeline_stages
    layers = stage_layers(shape.n_layers, cfg.dist.stage_weights or [1.0] * stages)
    return max(stage_need(cfg, shape, r, s, stages) for s, r in enumerate(layers))


# A pipeline's checkpoint moves the whole trainable tree piece by piece (rank/pipeline.py
# whole_pieces: a layer's parameters, or one of its moments; a stage's embeddings or head apart),
# each piece one all_sum that every rank takes part in: beside the stage's own state, a rank holds
# three copies of the largest piece (its own values or -0.0, their packed buffer, its sum) and a
# writer (rank 0, and the mirror, on any stage) a fourth, the piece before, which its writer thread
# still writes. The stage's weights count twice outside the step: the step's parameters and the
# ones the model's modules still hold from the last forward. bench/pipeline_memory.py's save
# columns: the other ranks peak at exactly the state and three pieces, the writer at four (GPT D256
# and D128, S = 2 and 3); counted at four on every stage. Before, the whole model's weights and
# moments were gathered on every rank at once (the GPT L8 D256 T64 on 2 stages: 206.8 MB at the
# save on both ranks, against 61.3 and 57.8 MB a piece at a time).
CHECKPOINT_PIECE_COPIES = 4
STAGE_WEIGHT_COPIES = 2


def checkpoint_need(shape, layers: range, stage: int, stages: int) -> int:
    """Predicted peak bytes of a pipelined checkpoint on `stage` holding `layers`: its state and
    the largest piece (a block, the embeddings or the head: `largest_layer`) in flight."""
    first, last = stage == 0, stage == stages - 1
    trainable = shape.trainable if isinstance(shape, LMShape) else shape.n_params
    moments = OPTIMIZER_STATE_COPIES["adamw"] * 4 * trainable
    own = (STAGE_WEIGHT_COPIES * 4 * trainable + moments) * _trainable_share(shape, layers, first, last)
    return int(_frozen(shape, layers, first, last) + own + CHECKPOINT_PIECE_COPIES * 4 * shape.largest_layer)


@dataclass(frozen=True)
class StagePlan:
    """S stages: each one's layers, predicted need and budget (bytes)."""

    stages: int
    layers: Tuple[range, ...]
    needs: Tuple[int, ...]
    budgets: Tuple[int, ...]

    @property
    def fits(self) -> bool:
        return all(n <= b for n, b in zip(self.needs, self.budgets))

    def __str__(self) -> str:
        return "; ".join(f"stage {s}: layers {r.start}-{r.stop - 1}, {human(n)} of {human(b)}"
                         for s, (r, n, b) in enumerate(zip(self.layers, self.needs, self.budgets)))


def plan(cfg: TrainConfig, hosts: Sequence[Any], stages: int) -> StagePlan:
    """`stages` stages of `cfg`'s model on `hosts`: the memory-proportional split and each one's need."""
    from mlx_train.planning.planner import model_shape
    from mlx_train.rank.pipeline import stage_layers  # (MLX: imported by a pipelined run's controller only)

    shape = model_shape(cfg.model, cfg.fine_tune)
    budgets = stage_budgets(cfg, hosts, stages)
    # The ranks split by the recorded weights (rounded): the plan splits by the same ones.
    layers = stage_layers(shape.n_layers, stage_weights(cfg, hosts, stages) or [1.0] * stages) if stages > 1 \
        else [range(shape.n_layers)]
    # A stage must hold its step and its checkpoint's pieces, whichever is higher.
    needs = [max(stage_need(cfg, shape, r, s, stages), checkpoint_need(shape, r, s, stages))
             for s, r in enumerate(layers)] if stages > 1 \
        else [step_memory(shape, cfg.dist.batch_size_per_device, cfg.dist.gradient_accumulation,
                          cfg.grad_checkpoint, cfg.precision).peak]
    return StagePlan(stages, tuple(layers), tuple(needs), tuple(budgets))


def choose(cfg: TrainConfig, hosts: Sequence[Any]) -> StagePlan:
    """`--pipeline-stages auto`: the least S (dividing the devices, at most the model's layers) at which
    every stage fits its host; S = 1 (no pipeline) when the whole model fits one. A UserError, one
    line, when no S does."""
    from mlx_train.planning.planner import model_shape

    n = sum(h.slots for h in hosts)
    layers = model_shape(cfg.model, cfg.fine_tune).n_layers
    tried = []
    for s in (s for s in range(1, min(n, layers) + 1) if n % s == 0):
        p = plan(cfg, hosts, s)
        if p.fits:
            return p
        tried.append(p)
    worst = tried[-1]
    raise UserError(f"--pipeline-stages auto: the model fits no split of its {layers} layers over {n} devices "
                    f"(at {worst.stages} stage{'s' * (worst.stages > 1)} the tightest needs "
                    f"{human(max(worst.needs))} of {human(min(worst.budgets))}): use more hosts, --fine-tune lora, "
                    "a quantized model or a smaller --batch-size / --seq-len")


def resolve(cfg: TrainConfig, hosts: Sequence[Any]) -> TrainConfig:
    """The config with its stages decided before launch: `auto` resolved (one line says what was
    chosen), and each stage's share of the layers from its host's memory (stage_weights)."""
    d = cfg.dist
    stages = d.pipeline_stages
    if stages == AUTO:
        if not cfg.model.kind.knows_shape:
            raise UserError(f"--pipeline-stages auto needs a model whose shape the planner knows ('gpt' or a "
                            f"pretrained model), not {cfg.model.name}: give the number of stages")
        chosen = choose(cfg, hosts)
        stages = chosen.stages
        print(f"--pipeline-stages auto: {stages} stage{'s' * (stages > 1)}"
              + (f" ({chosen})" if stages > 1 else " (the model fits one host)"), flush=True)
    weights = stage_weights(cfg, hosts, stages) if stages > 1 else None
    return dataclasses.replace(cfg, dist=dataclasses.replace(d, pipeline_stages=stages, stage_weights=weights))


def check_fits(cfg: TrainConfig, hosts: Sequence[Any]) -> None:
    """Before launch, with S > 1 stages: refuse in one line a stage its host cannot hold."""
    if not cfg.model.kind.knows_shape:
        return  # a model of your own: the planner does not know its shape
    p = plan(cfg, hosts, cfg.dist.pipeline_stages)
    if p.fits:
        return
    s = next(s for s, (n, b) in enumerate(zip(p.needs, p.budgets)) if n > b)
    raise UserError(f"pipeline stage {s} (layers {p.layers[s].start}-{p.layers[s].stop - 1}) needs about "
                    f"{human(p.needs[s])}, more than the {human(p.budgets[s])} a rank has there: use more "
                    "--pipeline-stages (or auto), more hosts, or a smaller --batch-size / --seq-len")


def stage_params(shape: ModelShape, layers: int, first: bool, last: bool) -> int:
    """The built-in GPT's parameters on a stage of `layers` blocks (ModelShape.n_params, split)."""
    d, v = shape.d_model, shape.vocab_size
    return layers * (12 * d * d + 9 * d) + (first and (v + shape.seq_len) * d) + (last and (v * d + 2 * d))


def stage_memory(shape: ModelShape, stages: int, stage: int, batch: int, micro: int, checkpointing: bool = False,
                 optimizer: str = "adamw", layers: Optional[int] = None) -> MemoryBreakdown:
    """Predicted peak of one fp32 pipelined step on `stage` of `stages` (equal layer weights), `micro`
    micro-batches of `batch` sequences; `layers` the stage's blocks where the split is not equal."""
    from mlx_train.rank.pipeline import stage_layers

    if layers is None:
        layers = len(stage_layers(shape.n_layers, [1.0] * stages)[stage])
    first, last = stage == 0, stage == stages - 1
    p = 4 * stage_params(shape, layers, first, last)
    state = OPTIMIZER_STATE_COPIES[optimizer] * p
    tokens = batch * shape.seq_len
    d = tokens * shape.d_model
    s = batch * shape.n_heads * shape.seq_len * shape.seq_len
    (saved_d, saved_s), (live_d, live_s) = ACTIVATIONS[bool(checkpointing)]
    one = 4 * (layers * (saved_d * d + saved_s * s) + d)  # its layers' saved tensors and its input
    in_flight = 1 if last else min(stages - stage, micro)
    head = 4 * LOGITS_FP32_COPIES[bool(checkpointing)] * tokens * shape.vocab_size if last else 0
    activations = int(in_flight * one + 4 * (live_d * d + live_s * s) + head)
    accumulator = p if micro > 1 else 0
    backward_peak = p + state + accumulator + activations
    largest = max(4 * shape.d_model * shape.d_model, shape.vocab_size * shape.d_model if first or last else 0)
    update_peak = int((UPDATE_WEIGHT_AND_GRAD_COPIES + OPTIMIZER_STATE_COPIES[optimizer]) * p
                      + UPDATE_TEMPORARIES * 4 * largest)
    peak = max(backward_peak, update_peak)
    return MemoryBreakdown(
        parameters=p, gradients=p + accumulator, optimizer_state=state, activations=activations,
        optimizer_step=max(0, update_peak - (2 * p + state)), runtime_overhead=RUNTIME_OVERHEAD,
        backward_peak=backward_peak, update_peak=update_peak, peak=peak, total=peak + RUNTIME_OVERHEAD,
        peak_phase="backward" if backward_peak >= update_peak else "update")


# ---------------------------------------------------------------- --optimize-memory and stages
#
# --optimize-memory plans an unpipelined run first (planner.split_for: data parallel, then the shard
# levels --shard allows). Where nothing fits there, a run the pipeline can take goes to the fewest
# stages at which every stage fits (`fewest`), instead of being refused. Where both fit and the state
# had to be sharded to fit, `prefer` decides: by the scaling model when it can predict both steps (each
# host's measured `speed` in the cluster file and --link-gbps), else sharding, which has no bubble.

PIPELINE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # rank/pipeline.py LLAMA_LIKE (no MLX import here)
PLANNER_MODES = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))  # the planner's order


def why_not_pipelined(cfg: TrainConfig) -> Optional[str]:
    """Why `cfg`'s run cannot be pipelined (None when it can): the built-in GPT or an mlx-lm model of a
    llama-like family whose shape the planner knows, on 2 devices or more, at --shard auto or none."""
    from mlx_train.config import ModelKind

    kind = cfg.model.kind
    if cfg.dist.num_devices < 2:
        return "one device"
    if cfg.shard not in ("auto", "none"):
        return f"--shard {cfg.shard} was chosen (a pipeline's stages are not sharded)"
    if kind is ModelKind.FACTORY:
        return "the planner does not know a model of your own's shape"
    if kind is ModelKind.PRETRAINED:
        import json
        from mlx_train.rank.hf import model_path

        try:
            config = json.loads((model_path(cfg.model.name) / "config.json").read_text())
        except (OSError, ValueError, UserError) as exc:
            return f"its config.json is not readable ({exc})"
        family = config.get("model_type")
        if family not in PIPELINE_FAMILIES:
            return f"the pipeline takes the {', '.join(PIPELINE_FAMILIES)} families, not {family}"
        if config.get("tie_word_embeddings") and cfg.fine_tune.mode == "full":
            return "tied embeddings train on the first and the last stage at once under full fine-tuning"
    return None


def at_stages(cfg: TrainConfig, hosts: Sequence[Any], stages: int, batch: int, accumulation: int,
              precision: str, checkpointing: bool) -> TrainConfig:
    """`cfg` as `stages` stages (the devices stages x replicas), the given split, the layers by memory."""
    dist = dataclasses.replace(cfg.dist, pipeline_stages=stages, batch_size_per_device=batch,
                               gradient_accumulation=accumulation, micro_caps=None, stage_weights=None)
    out = dataclasses.replace(cfg, dist=dist, precision=precision, grad_checkpoint=checkpointing, shard_level="none")
    return dataclasses.replace(out, dist=dataclasses.replace(dist, stage_weights=stage_weights(out, hosts, stages)
                                                             if stages > 1 else None))


def fit_at(cfg: TrainConfig, hosts: Sequence[Any], stages: int) -> Optional[Tuple[TrainConfig, StagePlan]]:
    """`cfg`'s global batch over `stages` stages: the first of the planner's modes (fp32, then
    checkpointing, then bf16) and in it the largest micro-batch dividing a replica's rows at which every
    stage fits its host; None when none does (or the devices or rows do not split)."""
    n, g = sum(h.slots for h in hosts), cfg.dist.global_batch_size
    if n % stages or g % (n // stages):
        return None
    rows = g // (n // stages)
    for precision, checkpointing in PLANNER_MODES:
        for batch in (b for b in range(rows, 0, -1) if rows % b == 0):
            staged = at_stages(cfg, hosts, stages, batch, rows // batch, precision, checkpointing)
            p = plan(staged, hosts, stages)
            if p.fits:
                return staged, p
    return None


def fewest(cfg: TrainConfig, hosts: Sequence[Any]) -> Optional[Tuple[TrainConfig, StagePlan]]:
    """The fewest stages S >= 2 (dividing the devices, at most the model's layers) at which `fit_at` fits."""
    from mlx_train.planning.planner import model_shape

    n = sum(h.slots for h in hosts)
    layers = model_shape(cfg.model, cfg.fine_tune).n_layers
    for s in (s for s in range(2, min(n, layers) + 1) if n % s == 0):
        found = fit_at(cfg, hosts, s)
        if found:
            return found
    return None


def described(cfg: TrainConfig, p: StagePlan) -> str:
    d = cfg.dist
    return (f"{p.stages} pipeline stages x {d.replicas} replica{'s' * (d.replicas != 1)}, {d.batch_size_per_device} "
            f"per micro-batch x {d.gradient_accumulation} micro-batches, checkpointing "
            f"{'on' if cfg.grad_checkpoint else 'off'}, {cfg.precision} ({p})")


def activation_bytes_on_wire(cfg: TrainConfig, shape) -> int:
    """One micro-batch's activation at a stage boundary (its gradient back is the same size): micro-batch
    x sequence x width in the compute dtype."""
    return cfg.dist.batch_size_per_device * shape.seq_len * shape.d_model * (2 if cfg.precision == "bf16" else 4)


def pipeline_step_s(compute_s: float, stages: int, micro: int, act_bytes: float, link, replicas: int = 1,
                    grad_bytes: float = 0.0) -> float:
    """The scaling model's step of a pipeline (docs/pipeline.md "When to pipeline and when to shard"):
    `compute_s`, one host's compute of a replica's rows through the whole model, split over the stages
    and stretched by 1F1B's bubble, (M+S-1)/(M S); each of the schedule's M+S-1 slots waits for one
    activation forward and one gradient back at the link's rate (the trainer does not overlap a transfer
    with compute); with R > 1 replicas one all_sum of the whole model's gradient buffer over every rank
    (rank/pipeline.py: S times a stage's bytes); the norm's all_sum, two numbers, at the link's latency."""
    from mlx_train.planning.perf import allreduce_s

    n = stages * replicas
    compute = compute_s * (micro + stages - 1) / (micro * stages)
    wire = (micro + stages - 1) * 2 * (link.latency_s + act_bytes / (link.gbps * 1e9 / 8 * link.efficiency))
    return compute + wire + (allreduce_s(grad_bytes, n, link) if replicas > 1 else 0.0) + 2 * (n - 1) * link.latency_s


def shard_step_s(compute_s: float, devices: int, level: str, accumulation: int, grad_bytes: float, layers: int,
                 link, frozen_bytes: float = 0.0) -> float:
    """The scaling model's step of data parallel at `level` (perf.shard_sync_s, bench/shard_table.py):
    `compute_s` (one host's compute of the global batch) over the devices, plus the level's sync; at
    `full` a frozen base (LoRA/QLoRA, `frozen_bytes` as held) is gathered too, for the forward and
    again for the backward of every micro-batch, (N-1)/N of it each time."""
    from mlx_train.planning.perf import shard_sync_s

    frozen = (accumulation * 2 * frozen_bytes * (devices - 1) / devices / (link.gbps * 1e9 / 8 * link.efficiency)
              if level == "full" and devices > 1 else 0.0)
    return compute_s / devices + shard_sync_s(grad_bytes, devices, link, level, accumulation, layers + 1) + frozen


def prefer(sharded: TrainConfig, staged: TrainConfig, hosts: Sequence[Any]) -> Tuple[bool, str]:
    """Whether to pipeline (`staged`) rather than shard (`sharded`, the planner's unpipelined split at a
    level above none) when both fit, and why, in a clause. The scaling model decides when it can
    predict both: every host's measured `speed` (rows per second per rank, the cluster file) and the
    link's rate (--link-gbps); else sharding, which has no bubble and whose speed the sharding bench
    measured. A pure function of the configs and the hosts."""
    from mlx_train.planning.perf import Link
    from mlx_train.planning.planner import model_shape

    from mlx_train.config import shard_level_of

    level = shard_level_of(sharded)
    speeds = [getattr(h, "speed", None) for h in hosts]
    gbps = sharded.dist.link_gbps
    if not gbps or not all(speeds):
        return False, (f"--shard {level} has no bubble (without each host's measured speed and --link-gbps the "
                       "scaling model cannot weigh the pipeline's bubble against sharding's traffic)")
    shape = model_shape(sharded.model, sharded.fine_tune)
    link = Link("--link-gbps", gbps, 0.85, 50e-6)
    grad = 4 * shape.trainable if hasattr(shape, "trainable") else 4 * shape.n_params
    g = sharded.dist.global_batch_size
    compute = g / min(float(s) for s in speeds)  # one host's seconds for the global batch
    d = staged.dist
    shard = shard_step_s(compute, sharded.dist.num_devices, level, sharded.dist.gradient_accumulation, grad,
                         shape.n_layers, link, getattr(shape, "frozen_bytes", 0))
    pipe = pipeline_step_s(compute / d.replicas, d.pipeline_stages, d.gradient_accumulation,
                           activation_bytes_on_wire(staged, shape), link, d.replicas, grad)
    full = level == "full"
    moves = ("1.5x the gradients' bytes per micro-batch" if full else "1x the gradients' bytes") + \
        (" and gathers a frozen base twice per micro-batch" if full and getattr(shape, "frozen_bytes", 0) else "")
    return pipe < shard, (f"the scaling model predicts {pipe:.3g} s a step pipelined against {shard:.3g} s at "
                          f"--shard {level} (a pipeline moves only activations; {level} moves {moves})")
