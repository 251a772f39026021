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
±15% on 12 stages, docs/pipeline.md "Memory per stage"); `stage_need` takes it there.
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
    acts = activation_bytes(sub, d.batch_size_per_device, cfg.grad_checkpoint, cfg.precision)
    if not last:  # the logits and the loss are the last stage's
        no_head = dataclasses.replace(sub, vocab_size=1)
        acts = activation_bytes(no_head, d.batch_size_per_device, cfg.grad_checkpoint, cfg.precision)
    in_flight = min(stages - stage, d.gradient_accumulation)
    return int(_frozen(shape, layers, first, last) + trainable + acts * in_flight)


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
    needs = [stage_need(cfg, shape, r, s, stages) for s, r in enumerate(layers)] if stages > 1 \
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
