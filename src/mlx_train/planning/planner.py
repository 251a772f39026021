"""The planner: which per-device batch, accumulation, checkpointing and precision fit a device.

`MemoryOptimizer.suggest_config` searches the settings with the memory model (memory.py);
`split_for` is the one way a run's global batch is split over its hosts (--optimize-memory,
elastic resizes); `suggest_recovery_config` is the out-of-memory ladder (one step smaller, same
global batch). Each answer is a `Split` (config.py), which keeps the global batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

from mlx_train.config import (PRECISIONS, SHARD_CHOICES, SHARD_LEVELS, DistributedConfig, FineTuneConfig,
                              ModelConfig, ModelKind, Split, TrainConfig, check, model_kind, positive_int,
                              shard_level_of)
from mlx_train.errors import UserError
from mlx_train.planning.memory import (DEFAULT_SEQ_LEN, DEFAULT_VOCAB, MAX_BATCH_PER_DEVICE, OPTIMIZER_STATE_COPIES,
                                       RUNTIME_OVERHEAD, SAFETY_FRACTION, LMShape, MemoryBreakdown, ModelShape,
                                       _Record, step_memory)
from mlx_train.rank.batcher import split_rows
from mlx_train.rank.device import Shared, device_memory, rank_budget_for

# The out-of-memory ladder raises the shard level only when that saves at least this share of the
# predicted total: a rung that barely helps costs a relaunch and (at `full`) more traffic for nothing.
MIN_LEVEL_SAVING = 0.05
# split_for's safety fraction: the rank budget already leaves the device its margin (BUDGET_FRACTION).
SPLIT_SAFETY = 0.95


@dataclass(frozen=True)
class Hardware(_Record):
    memory_per_device: int   # bytes
    usable_memory: int       # memory_per_device * safety_fraction: what a plan may use
    safety_fraction: float
    source: str              # where memory_per_device came from


@dataclass(frozen=True)
class MemoryPlan(_Record):
    """The planner's answer; reads as a dict (`plan['fits']`) and as attributes (`plan.fits`)."""

    suggested_batch_size: int       # per device, per micro-batch
    gradient_accumulation: int
    global_batch_size: int
    num_devices: int
    activation_checkpointing: bool
    precision: str
    optimizer: str
    fits: bool
    hardware: Hardware
    breakdown: MemoryBreakdown
    model: Any                      # ModelShape, or LMShape for a pretrained model
    n_params: int
    assumptions: tuple = ()
    shard: str = "none"             # the level: what of the training state each device holds 1/N of

    @property
    def split(self) -> Split:
        return Split(self.global_batch_size, self.num_devices, self.suggested_batch_size, self.gradient_accumulation,
                     self.activation_checkpointing, self.precision, self.shard)

    def __str__(self) -> str:
        # `total`, the number compared: a peak alone just under the usable memory read as fitting.
        return (f"{'fits' if self.fits else 'does not fit'}: {self.num_devices} devices x {self.split}; needs "
                f"{self.breakdown.total / 2**20:.0f} of {self.hardware.usable_memory / 2**20:.0f} MiB usable: "
                f"{self.breakdown}")

    def to_distributed_config(self, backend: str = "ring") -> DistributedConfig:
        return DistributedConfig(num_devices=self.num_devices, batch_size_per_device=self.suggested_batch_size,
                                 gradient_accumulation=self.gradient_accumulation, backend=backend)

    def apply_to(self, cfg: TrainConfig) -> TrainConfig:
        """`cfg` with this plan's split (the same global batch only if the plan was made for `cfg`'s)."""
        return self.split.apply(cfg)


def model_shape(model: ModelConfig, fine_tune: Optional[FineTuneConfig] = None):
    """The memory model's shape for `model`: its config.json's for a pretrained model (read from the
    model directory; a hub id is fetched once), else the built-in GPT's."""
    if model.kind is not ModelKind.PRETRAINED:
        return ModelShape.from_config(model)
    from mlx_train.rank.hf import model_path

    return LMShape.from_model_dir(model_path(model.name), model.seq_len, fine_tune)


def split_for(cfg: TrainConfig, hosts: Iterable[Shared], keep_mode: bool = False) -> MemoryPlan:
    """The planner's split of `cfg`'s global batch over the devices of `hosts`, within the budget every
    rank gets there (rank_budget_for), for `cfg`'s model as it trains (full, LoRA or DoRA). With
    `keep_mode` the run's own precision and checkpointing are tried first (a resized run's numbers stay
    comparable), else the planner's order. A UserError when no split fits."""
    hosts = list(hosts)
    n, g = sum(h.slots for h in hosts), cfg.dist.global_batch_size
    if g % n:
        raise UserError(f"the global batch {g} cannot be split evenly over {n} devices: use a global batch "
                        f"(devices x --batch-size x --accumulation) that {n} divides")
    budget = rank_budget_for(cfg, hosts)
    # The budget bounds MLX's peak (what a rank checks); the planner also adds the runtime's overhead.
    # A level the user chose is the only one tried; `auto` raises the level before it cuts the micro-batch.
    common = dict(model=cfg.model, fine_tune=cfg.fine_tune, num_devices=n, global_batch_size=g,
                  memory_per_device=budget + RUNTIME_OVERHEAD, safety_fraction=SPLIT_SAFETY, shard=cfg.shard,
                  level_before_batch=True)
    plan = None
    if keep_mode:
        plan = MemoryOptimizer.suggest_config(**common, precision=cfg.precision,
                                              activation_checkpointing=cfg.grad_checkpoint)
    if plan is None or not plan.fits:
        plan = MemoryOptimizer.suggest_config(**common)
    if plan.fits and cfg.shard == "auto" and plan.shard == "none" and least_level(hosts) != "none":
        # A higher level holds less, so the plan still fits; its breakdown stays the unsharded one.
        plan = dataclasses.replace(plan, shard=least_level(hosts))
    if not plan.fits:
        full = "" if cfg.shard in ("auto", "full") or n == 1 else "--shard full or auto, "
        raise UserError(f"no split of the global batch {g} over {n} devices fits {budget / 2**20:.0f} MiB per "
                        f"device{_at(cfg.shard)}: use {full}more devices, a smaller model or --seq-len, or a larger "
                        "--memory-budget")
    return plan


def _at(shard: str) -> str:
    return " at any shard level" if shard == "auto" else f" with --shard {shard}"


def levels_allowed(shard: str, num_devices: int) -> tuple:
    """The levels a plan may use, least first: the one chosen, or with `auto` every level (only `none`
    on one device, where there is nothing to shard over)."""
    check(shard in SHARD_CHOICES, f"shard must be one of {', '.join(SHARD_CHOICES)}, got {shard!r}")
    if shard != "auto":
        return (shard,)
    return SHARD_LEVELS if num_devices > 1 else ("none",)


def resolve_shard(cfg: TrainConfig, hosts: Iterable[Shared]) -> str:
    """The shard level `cfg` runs at on `hosts`, decided before launch and recorded in config.yaml
    (TrainConfig.shard_level): the level chosen with --shard, or for `auto` the least level at which the
    run's own split fits the budget every rank gets there, judged as split_for judges it (so a split it
    planned keeps its level). `none` on one device or for a model of unknown shape, and never less than
    least_level (`optimizer` on unequal hardware). When no level fits the split (the out-of-memory ladder
    will cut it), the least level within MIN_LEVEL_SAVING of the smallest need."""
    hosts = list(hosts)
    n = sum(h.slots for h in hosts)
    if cfg.shard != "auto":
        return cfg.shard
    if n == 1:
        return "none"
    floor = least_level(hosts)
    if not cfg.model.kind.knows_shape:
        return floor
    levels = SHARD_LEVELS[SHARD_LEVELS.index(floor):]
    usable = (rank_budget_for(cfg, hosts) + RUNTIME_OVERHEAD) * SPLIT_SAFETY
    shape = model_shape(cfg.model, cfg.fine_tune)
    need = {level: step_memory(shape, cfg.dist.batch_size_per_device, cfg.dist.gradient_accumulation,
                               cfg.grad_checkpoint, cfg.precision, num_devices=n, shard=level).total
            for level in levels}
    fits = [level for level in levels if need[level] <= usable]
    if fits:
        return fits[0]
    least = min(need.values())
    return next(level for level in levels if need[level] - least <= MIN_LEVEL_SAVING * need[level])


# ---------------------------------------------------------------- unequal hardware
#
# Data-parallel ranks each apply AdamW to the same summed gradients: their parameters stay bit-identical
# only if their arithmetic is, and chips of different generations may round a reduction or a square root
# differently. The checksum comparison (controller/divergence.py) would then call every attempt
# diverged. On such a fleet the least level is `optimizer`: each parameter's update is computed once,
# by the rank that owns its slice, and gathered into every rank (rank/spread.py Sharded), so the
# replicas are identical by construction, at the cost of one all-gather of the parameters per step.
REPLICA_LEVEL = "optimizer"


def unequal_chips(hosts: Iterable[Any]) -> tuple:
    """The distinct processors the cluster file records for `hosts`, when there are several (else ()).
    A host without one (a file from before configure recorded it, a local run) is not counted."""
    chips = sorted({c for c in (getattr(h, "chip", None) for h in hosts) if c})
    return tuple(chips) if len(chips) > 1 else ()


def least_level(hosts: Iterable[Any]) -> str:
    """The least shard level `--shard auto` may choose on `hosts`: `optimizer` on unequal hardware."""
    return REPLICA_LEVEL if unequal_chips(hosts) else "none"


def replica_warning(cfg: TrainConfig, hosts: Iterable[Any]) -> Optional[str]:
    """The one line a run chosen at `--shard none` on unequal hardware prints before launch (None otherwise)."""
    hosts = list(hosts)
    chips = unequal_chips(hosts)
    if cfg.shard != "none" or not chips or sum(h.slots for h in hosts) < 2:
        return None
    return (f"warning: --shard none on unequal hardware ({', '.join(chips)}): every rank applies AdamW itself, "
            "and chips that round differently make the ranks' parameters differ, which the divergence check "
            f"reports as a divergence; --shard {REPLICA_LEVEL} (or auto) computes each update once and shares it")


def _divisors_desc(n: int) -> list:
    return [d for d in range(n, 0, -1) if n % d == 0]


class MemoryOptimizer:
    """Plans per-device batch, accumulation, checkpointing and precision against device memory."""

    @classmethod
    def suggest_config(
        cls,
        model_size: Optional[float] = None,
        num_devices: int = 1,
        *,
        model: Any = None,
        fine_tune: Any = None,
        n_layers: Optional[int] = None,
        d_model: Optional[int] = None,
        n_heads: Optional[int] = None,
        seq_len: Optional[int] = None,
        vocab_size: Optional[int] = None,
        precision: Optional[str] = None,
        optimizer: str = "adamw",
        activation_checkpointing: Optional[bool] = None,
        global_batch_size: Optional[int] = None,
        memory_per_device: Optional[float] = None,
        safety_fraction: float = SAFETY_FRACTION,
        shard: str = "auto",
        level_before_batch: bool = False,
    ) -> MemoryPlan:
        """The largest per-device batch that fits, trying in order: fp32 without checkpointing,
        fp32 with it, then bf16 without and with (`precision`/`activation_checkpointing` force a
        setting). Accumulation makes up `global_batch_size`; without one, per-device batches are
        powers of two up to MAX_BATCH_PER_DEVICE with no accumulation. When nothing fits, the
        smallest-memory attempt comes back with `fits=False`.

        `shard` ("none", "optimizer", "gradients", "full", or "auto": the least that fits) is the level
        of the training state each device holds a 1/num_devices slice of; with `auto` each level is
        searched in full before the next is tried, so a model that fits unsharded is planned as before.
        `level_before_batch` (split_for) instead tries every level at a per-device batch before a smaller
        batch: the micro-batch is cut only when no level holds it."""
        positive_int("num_devices", num_devices)
        levels = levels_allowed(shard, num_devices)
        check(precision is None or precision in PRECISIONS,
               f"precision must be one of {', '.join(PRECISIONS)} or None (let the planner choose), got {precision!r}")
        check(optimizer in OPTIMIZER_STATE_COPIES,
               f"optimizer must be one of {', '.join(OPTIMIZER_STATE_COPIES)}, got {optimizer!r}")
        check(activation_checkpointing in (None, True, False),
               f"activation_checkpointing must be True, False or None, got {activation_checkpointing!r}")
        check(isinstance(safety_fraction, (int, float)) and 0 < safety_fraction <= 1,
               f"safety_fraction must be in (0, 1], got {safety_fraction!r}")
        if isinstance(fine_tune, str):  # fine_tune="lora": the mode alone, the other settings their defaults
            fine_tune = FineTuneConfig(mode=fine_tune)
        check(fine_tune is None or isinstance(fine_tune, FineTuneConfig),
              f"fine_tune must be 'full', 'lora', 'dora' or a FineTuneConfig, got {type(fine_tune).__name__}")
        shape, n_params, assumptions = cls._resolve_model(model_size, model, n_layers, d_model, n_heads,
                                                          seq_len, vocab_size, fine_tune)
        hardware = cls._hardware(memory_per_device, safety_fraction)

        if global_batch_size is None:
            batches = [2 ** i for i in range(int(math.log2(MAX_BATCH_PER_DEVICE)), -1, -1)]
            per_device = None
            assumptions.append(f"no global batch asked for: per-device batch up to {MAX_BATCH_PER_DEVICE}, "
                               "no accumulation")
        else:
            positive_int("global_batch_size", global_batch_size)
            check(global_batch_size % num_devices == 0,
                   f"global_batch_size ({global_batch_size}) must be divisible by num_devices ({num_devices})")
            per_device = global_batch_size // num_devices
            batches = _divisors_desc(per_device)

        modes = [(p, c) for p in (PRECISIONS if precision is None else (precision,))
                 for c in ((False, True) if activation_checkpointing is None else (activation_checkpointing,))]
        if levels != ("none",):
            assumptions = [a for a in assumptions if not a.startswith("pure data parallel")]
            assumptions.append(f"shard levels tried: {', '.join(levels)} (optimizer state, then gradients, then "
                               "weights split over the devices; full gathers one layer's weights at a time)")
        if level_before_batch:
            order = [(lv, p, c, b) for p, c in modes for b in batches for lv in levels]
        else:
            order = [(lv, p, c, b) for lv in levels for p, c in modes for b in batches]
        closest = None
        for level, prec, ckpt, batch in order:
            accumulation = 1 if per_device is None else per_device // batch
            mem = step_memory(shape, batch, accumulation, ckpt, prec, optimizer, n_params, num_devices, level)
            plan = MemoryPlan(
                suggested_batch_size=batch, gradient_accumulation=accumulation,
                global_batch_size=batch * accumulation * num_devices, num_devices=num_devices,
                activation_checkpointing=ckpt, precision=prec, optimizer=optimizer,
                fits=mem.total <= hardware.usable_memory, hardware=hardware, breakdown=mem,
                model=shape, n_params=n_params, assumptions=tuple(assumptions), shard=level)
            if plan.fits:
                return plan
            # Ties go to the smaller batch of the earlier mode (and the lesser level): no change that
            # does not help.
            if closest is None or (mem.total, batch) < (closest.breakdown.total, closest.suggested_batch_size):
                closest = plan
        return closest

    @classmethod
    def estimate(cls, cfg: TrainConfig, optimizer: str = "adamw") -> int:
        """Predicted `mx.get_peak_memory()` of one training step with `cfg`, in bytes. Compare
        `estimate(cfg) + RUNTIME_OVERHEAD` with a device's budget (or use `breakdown(cfg).total`)."""
        return cls.breakdown(cfg, optimizer).peak

    @classmethod
    def breakdown(cls, cfg: TrainConfig, optimizer: str = "adamw") -> MemoryBreakdown:
        check(isinstance(cfg, TrainConfig), f"expected a TrainConfig, got {type(cfg).__name__}")
        return step_memory(model_shape(cfg.model, cfg.fine_tune), cfg.dist.batch_size_per_device,
                           cfg.dist.gradient_accumulation, cfg.grad_checkpoint, cfg.precision, optimizer,
                           num_devices=cfg.dist.num_devices, shard=shard_level_of(cfg))

    @staticmethod
    def suggest_recovery_config(current: Any) -> Any:
        """The next configuration to try after an out-of-memory failure, or None when nothing
        smaller is left. Steps: halve the per-device batch (the next smaller divisor if it is odd)
        with accumulation scaled up so the global batch is unchanged; at batch 1 turn on
        checkpointing; then switch to bf16. A TrainConfig with `shard: auto` on several devices first
        takes the next shard level wherever the memory model says it lowers the total at least as much
        as that step would (and once the steps run out), and by MIN_LEVEL_SAVING at least. Takes and returns a TrainConfig, a dict, or any
        dataclass with those fields; the input is not modified."""
        return _recovery(current)

    @staticmethod
    def _resolve_model(model_size, model, n_layers, d_model, n_heads, seq_len, vocab_size, fine_tune=None):
        """(shape, parameter count, assumptions) from whichever description was given."""
        if model_size is not None:
            check(isinstance(model_size, (int, float)) and not isinstance(model_size, bool) and model_size > 0,
                   f"model_size must be a positive parameter count, got {model_size!r}")
        assumptions = []
        kind = model.kind if isinstance(model, ModelConfig) else model_kind(model) if isinstance(model, str) else None
        if kind is ModelKind.PRETRAINED:
            # A model directory or hub id (or a ModelConfig naming one): the shape is its config.json's.
            check(all(v is None for v in (model_size, n_layers, d_model, n_heads, vocab_size)),
                   "a pretrained model gives its own shape: pass only seq_len with it")
            if isinstance(model, ModelConfig):
                seq_len, model = seq_len or model.seq_len, model.name
            elif seq_len is None:
                assumptions.append(f"seq_len={DEFAULT_SEQ_LEN} (not given)")
            shape = model_shape(ModelConfig(name=model, seq_len=seq_len or DEFAULT_SEQ_LEN), fine_tune)
            assumptions.append(f"shape from {model}/config.json: {shape.n_layers} layers, d_model={shape.d_model}, "
                               f"{shape.n_heads} heads ({shape.n_kv_heads} key/value), intermediate "
                               f"{shape.intermediate_size}, vocab {shape.vocab_size}"
                               + (f", {shape.quant_bits}-bit" if shape.quant_bits else "")
                               + f"; {shape.fine_tune} fine-tuning, {shape.trainable:,} trainable parameters")
            assumptions.append("activations as mlx-lm's llama on MLX's CPU build (docs/memory_optimization.md)")
            return shape, shape.trainable, assumptions
        if model is not None:
            check(isinstance(model, ModelConfig), f"model must be a ModelConfig, got {type(model).__name__}")
            check(all(v is None for v in (n_layers, d_model, n_heads, seq_len, vocab_size)),
                   "give either model= or the shape keywords, not both")
            shape = ModelShape.from_config(model)
        elif n_layers is not None or d_model is not None:
            check(n_layers is not None and d_model is not None,
                   "give both n_layers and d_model (n_heads, seq_len, vocab_size have defaults)")
            positive_int("d_model", d_model)
            if n_heads is None:
                n_heads = max(1, d_model // 64)
                assumptions.append(f"n_heads={n_heads} (head width 64)")
            if seq_len is None or vocab_size is None:
                seq_len, vocab_size = seq_len or DEFAULT_SEQ_LEN, vocab_size or DEFAULT_VOCAB
                assumptions.append(f"seq_len={seq_len}, vocab_size={vocab_size} where not given")
            shape = ModelShape(n_layers, d_model, n_heads, seq_len, vocab_size)
        elif model_size is not None:
            check(n_heads is None, "n_heads needs n_layers and d_model")
            shape = ModelShape.from_model_size(model_size, seq_len or DEFAULT_SEQ_LEN, vocab_size or DEFAULT_VOCAB)
            assumptions.append(
                f"shape derived from model_size={model_size:.3g}: GPT-3-like, {shape.n_layers} layers "
                f"(nearest GPT-3 size), d_model={shape.d_model}, n_heads={shape.n_heads}, "
                f"seq_len={shape.seq_len}, vocab_size={shape.vocab_size}")
        else:
            raise ValueError("give model_size (a parameter count) or the model's shape "
                             "(model=ModelConfig, or n_layers and d_model)")
        # A given count wins over the shape's: a custom model can have this shape and other weights.
        n_params = int(model_size) if model_size is not None else shape.n_params
        assumptions.append("activations as the built-in GPT on MLX's CPU build, which materialises "
                           "attention scores (B*H*T*T); fused attention needs less")
        assumptions.append("pure data parallel: every device holds all weights, gradients and optimizer state")
        return shape, n_params, assumptions

    @staticmethod
    def _hardware(memory_per_device, safety_fraction) -> Hardware:
        if memory_per_device is None:
            memory, source = device_memory()
        else:
            check(isinstance(memory_per_device, (int, float)) and not isinstance(memory_per_device, bool)
                   and memory_per_device > 0,
                   f"memory_per_device must be positive bytes, got {memory_per_device!r}")
            memory, source = int(memory_per_device), "given (memory_per_device)"
        return Hardware(memory, int(memory * safety_fraction), safety_fraction, source)


_BATCH_KEYS = ("batch_size_per_device", "suggested_batch_size", "batch_size")
_CKPT_KEYS = ("grad_checkpoint", "activation_checkpointing")


def _raised_level(cfg: TrainConfig, split: Split, step: Optional[Split]) -> Optional[Split]:
    """`split` at the least higher shard level that saves MIN_LEVEL_SAVING, when the ladder may raise it
    (`auto`, several devices, a model whose shape the planner knows) and that lowers the predicted peak
    at least as much as `step` (the ladder's own next rung, None when none is left); else None. A level
    that barely helps is passed over, not the end of the climb: on 2 ranks `optimizer` can save under
    5% where `gradients` saves a quarter. A small model's activations outweigh its state, so it keeps
    cutting its batch as before."""
    if cfg.shard != "auto" or split.devices == 1 or split.shard == SHARD_LEVELS[-1] or split.stages > 1:
        return None  # (a pipeline's stages are not sharded: its ladder cuts the micro-batch only)
    higher = [dataclasses.replace(split, shard=lv) for lv in SHARD_LEVELS[SHARD_LEVELS.index(split.shard) + 1:]]
    if not cfg.model.kind.knows_shape:
        return higher[0] if step is None else None  # nothing to weigh it with: only when the ladder is spent
    try:
        shape = model_shape(cfg.model, cfg.fine_tune)
    except (UserError, OSError, ValueError):
        return None

    def total(s: Split) -> int:
        return step_memory(shape, s.batch, s.accumulation, s.checkpointing, s.precision, num_devices=s.devices,
                           shard=s.shard).total

    now = total(split)
    raised = next((r for r in higher if now - total(r) >= MIN_LEVEL_SAVING * now), None)
    if raised is None:
        return None
    return raised if step is None or total(raised) <= total(step) else None


def _recovery(current: Any) -> Any:
    if isinstance(current, TrainConfig):
        split = Split.of(current)
        nxt = _recovery(split.event())  # named as the ladder's keys
        step = None if nxt is None else dataclasses.replace(
            split, batch=nxt["batch_size_per_device"], accumulation=nxt["gradient_accumulation"],
            checkpointing=nxt["grad_checkpoint"], precision=nxt["precision"])
        raised = _raised_level(current, split, step)
        return (raised or step).apply(current) if (raised or step) else None
    if isinstance(current, Mapping):
        values = dict(current)
    elif dataclasses.is_dataclass(current) and not isinstance(current, type):
        values = {f.name: getattr(current, f.name) for f in dataclasses.fields(current)}
    else:
        raise ValueError(f"expected a TrainConfig, a dict or a dataclass, got {type(current).__name__}")

    check(isinstance(current, Mapping) or "gradient_accumulation" in values,
           f"{type(current).__name__} has no gradient_accumulation field: the global batch could not be kept")
    batch_key = next((k for k in _BATCH_KEYS if k in values), None)
    check(batch_key is not None, f"current settings need a per-device batch ({' or '.join(_BATCH_KEYS)})")
    batch = positive_int(batch_key, values[batch_key])
    accumulation = positive_int("gradient_accumulation", values.get("gradient_accumulation", 1))
    ckpt_key = next((k for k in _CKPT_KEYS if k in values), None)
    precision = values.get("precision")
    check(precision is None or precision in PRECISIONS,
           f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")

    changes: dict = {}
    if batch > 1:
        smaller = next(d for d in range(batch // 2, 0, -1) if batch % d == 0)
        changes = {batch_key: smaller, "gradient_accumulation": accumulation * (batch // smaller)}
    elif ckpt_key is not None and not values[ckpt_key]:
        changes = {ckpt_key: True}
    elif precision == "fp32":
        changes = {"precision": "bf16"}
    else:
        return None

    if isinstance(current, Mapping):
        return {**values, **changes}
    return dataclasses.replace(current, **changes)


# ---------------------------------------------------------------- a host too slow to help
#
# A synchronous step ends when the last rank's share is done. With equal shares every rank computes
# G/n rows, so the step takes (G/n) / (the slowest rank's rows per second): a host slower than
# (n-1)/n of the next slowest makes the run slower than the others alone. With shares by speed
# (--shares auto) the step takes G / (the sum of the speeds): another host always adds compute, and
# only the sync it adds (a further hop of every all-reduce) can outweigh it.


@dataclass(frozen=True)
class Leaving:
    """The planner's choice of hosts: those kept, those left out, and the one line that says so."""
    kept: tuple
    left_out: tuple
    step_s: float        # the predicted step with the hosts kept (in the speeds' units: rows / rows per s)
    all_step_s: float    # ... and with every host
    line: Optional[str] = None


def host_speeds(hosts: Sequence[Any]) -> Optional[tuple]:
    """Each host's speed per rank, and whether it was measured: the cluster file's `speed` (rows per
    second per rank) when every host has one, else each rank's cores (`cpus` over `slots`: relative
    only), else None (nothing to judge by)."""
    if hosts and all(getattr(h, "speed", None) for h in hosts):
        return tuple(float(h.speed) for h in hosts), True
    if hosts and all(getattr(h, "cpus", None) for h in hosts):
        return tuple(float(h.cpus) / max(1, h.slots) for h in hosts), False
    return None


def predicted_step_s(speeds: Sequence[float], slots: Sequence[int], global_batch: int, by_speed: bool,
                     sync_s: Callable[[int], float] = lambda n: 0.0) -> float:
    """The scaling model's step time of `global_batch` rows on hosts of per-rank `speeds` with `slots`
    ranks each: equal shares wait for the slowest rank, shares by speed for none; plus the sync of
    that many ranks (`sync_s(n)`, seconds; only comparable when the speeds are measured rows per second)."""
    n = sum(slots)
    if by_speed:
        compute = global_batch / sum(s * k for s, k in zip(speeds, slots))
    else:
        compute = global_batch / n / min(speeds)
    return compute + sync_s(n)


def without_slow_hosts(hosts: Sequence[Any], speeds: Sequence[float], global_batch: int, by_speed: bool,
                       sync_s: Callable[[int], float] = lambda n: 0.0) -> Leaving:
    """The hosts the run is fastest on (a pure function). The candidates are the fastest hosts first
    (a slower one only ever lowers an equal share's pace), each set's ranks dividing the global batch;
    the fastest prediction wins, a tie keeps more hosts. The first host is never left out alone: a run
    needs one."""
    order = sorted(range(len(hosts)), key=lambda i: (-speeds[i], i))
    slots = [h.slots for h in hosts]

    def step(chosen: Sequence[int]) -> float:
        return predicted_step_s([speeds[i] for i in chosen], [slots[i] for i in chosen], global_batch, by_speed,
                                sync_s)

    everyone = step(order)
    best, best_s = list(order), everyone
    for k in range(len(order) - 1, 0, -1):
        chosen = order[:k]
        if global_batch % sum(slots[i] for i in chosen):
            continue
        t = step(chosen)
        if t < best_s * (1 - 1e-9):
            best, best_s = chosen, t
    kept = tuple(hosts[i] for i in sorted(best))
    left = tuple(hosts[i] for i in order if i not in best)
    line = None
    if left:
        names = ", ".join(f"{h.name} ({speeds[hosts.index(h)]:g})" for h in left)
        line = (f"leaving out {names}: too slow to help, the run is faster without it (a step in "
                f"{best_s / everyone:.0%} of the time with every host at "
                f"{'shares by speed' if by_speed else 'equal shares'}; per-rank speeds in brackets)")
    return Leaving(kept, left, best_s, everyone, line)


def hosts_to_run(cfg: TrainConfig, hosts: Sequence[Any]) -> Leaving:
    """without_slow_hosts for `cfg` on `hosts`, by the speeds host_speeds finds: equal shares unless
    --shares auto; the sync counted only when the speeds are measured (seconds comparable) and the link's
    rate is known (--link-gbps) for a model of known shape. Everyone is kept when nothing can be judged."""
    hosts = list(hosts)
    found = host_speeds(hosts) if len(hosts) > 1 else None
    if found is None:
        return Leaving(tuple(hosts), (), 0.0, 0.0)
    speeds, measured = found
    sync: Callable[[int], float] = lambda n: 0.0
    if measured and cfg.dist.link_gbps and cfg.model.kind.knows_shape:
        from mlx_train.planning.perf import Link, allreduce_s

        nbytes = 4 * model_shape(cfg.model, cfg.fine_tune).n_params
        link = Link("--link-gbps", cfg.dist.link_gbps, 0.85, 50e-6)
        sync = lambda n: allreduce_s(nbytes, n, link)  # noqa: E731
    return without_slow_hosts(hosts, speeds, cfg.dist.global_batch_size, cfg.dist.shares == "auto", sync)


def resplit(cfg: TrainConfig, devices: int) -> TrainConfig:
    """`cfg`'s global batch over `devices` ranks: the largest micro-batch up to the run's own that divides
    a rank's part, the accumulation making up the rest (the same rows, no micro-batch larger than asked)."""
    g = cfg.dist.global_batch_size
    check(g % devices == 0, f"the global batch {g} cannot be split evenly over {devices} devices")
    part = g // devices
    batch = next(b for b in range(min(part, cfg.dist.batch_size_per_device), 0, -1) if part % b == 0)
    split = Split(g, devices, batch, part // batch, cfg.grad_checkpoint, cfg.precision, shard_level_of(cfg))
    return split.apply(cfg)


# ---------------------------------------------------------------- each host by its own memory


@dataclass(frozen=True)
class HostPlan:
    """One host's part of a global batch under --optimize-memory: each of its ranks takes `rows` rows
    of every global batch as `accumulation` micro-batches of at most `batch` rows (rank/batcher.share_of)."""
    host: str
    rows: int
    batch: int
    accumulation: int
    peak: int            # the memory model's predicted total per rank, bytes
    budget: int          # what a rank there may use (rank_budget_for that host alone)
    fits: bool

    def __str__(self) -> str:
        return f"{self.host}: {self.rows} rows as {self.accumulation} x {self.batch}"


def per_host_plan(cfg: TrainConfig, hosts: Sequence[Any], rows: Optional[Sequence[int]] = None) -> tuple:
    """Each host's micro-batch and accumulation by its own memory (a pure function of `cfg`, the hosts'
    memory and slots, and each rank's rows: the equal split of the global batch unless given, ranks
    on the hosts in blocks as with_devices places them). A host's ranks take the largest micro-batch
    the memory model fits in that host's budget at the run's level, precision and checkpointing, and
    accumulate the rest, so the global batch is the same and a host with less memory gets a smaller
    micro-batch and more accumulation. A host where even one row does not fit comes back with
    fits=False at a micro-batch of 1."""
    hosts = list(hosts)
    n, g = sum(h.slots for h in hosts), cfg.dist.global_batch_size
    if rows is None:
        check(g % n == 0, f"the global batch {g} cannot be split evenly over {n} devices")
        rows = [g // n] * n
    check(len(rows) == n and sum(rows) == g, f"rows {list(rows)} are not {n} ranks' parts of the global batch {g}")
    shape = model_shape(cfg.model, cfg.fine_tune)
    level = shard_level_of(cfg)
    plans, first = [], 0
    for h in hosts:
        most = max(rows[first:first + h.slots])  # its ranks' largest part: what must fit
        first += h.slots
        budget = rank_budget_for(cfg, [h])
        usable = (budget + RUNTIME_OVERHEAD) * SPLIT_SAFETY
        plan = None
        # share_of cuts `most` rows into ceil(most / b) micro-batches of at most b: each count once.
        for count in range(1, most + 1):
            batch = -(-most // count)
            if count > 1 and -(-most // (count - 1)) == batch:
                continue
            total = step_memory(shape, batch, count, cfg.grad_checkpoint, cfg.precision, num_devices=n,
                                shard=level).total
            plan = HostPlan(h.name, most, batch, count, total, budget, total <= usable)
            if plan.fits:
                break
        plans.append(plan)
    return tuple(plans)


def micro_caps_for(cfg: TrainConfig, hosts: Sequence[Any]) -> Optional[tuple]:
    """Each rank's micro-batch cap (DistributedConfig.micro_caps, by rank, ranks on the hosts in blocks)
    for `cfg`, already split for the tightest host, on `hosts` of unequal memory: per_host_plan's micro-batch
    of each rank's host. None when every rank's budget is the same (--memory-budget, hosts alike) or the
    plans come out alike: then the config's micro-batch is every rank's, exactly as on equal hosts."""
    hosts = list(hosts)
    if len({rank_budget_for(cfg, [h]) for h in hosts}) < 2 or not cfg.model.kind.knows_shape:
        return None
    rows = split_rows(cfg.dist.global_batch_size, cfg.dist.share_weights()) \
        if cfg.dist.share_weights() is not None else None
    plans = per_host_plan(cfg, hosts, rows)
    caps = tuple(p.batch for p, h in zip(plans, hosts) for _ in range(h.slots))
    return caps if len(set(caps)) > 1 else None
