"""Per-device memory planning: how much one training step needs, and which settings fit.

The model of memory follows what MLX actually keeps alive during `Stepper.step` (measured on the
CPU build of mlx 0.32 with `mx.get_peak_memory()`; docs/memory_optimization.md shows the
derivation and the accuracy grid). A step has two peaks that never overlap:

* backward: weights, optimizer state, the gradient accumulator (accumulation > 1) and the
  activations of one micro-batch;
* update: clipping and AdamW write new gradients, weights and moments while the old ones are
  still referenced, so about six parameter-sized copies exist at once.

Parallelism here is pure data parallel: every device holds a full replica, so more devices only
lower the per-device need through a smaller share of the global batch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from .config import PRECISIONS, DistributedConfig, ModelConfig, TrainConfig

MiB = 1024 ** 2

# Plan against this share of the device's memory: the rest absorbs the OS, other processes and
# the estimate's own error (it is within 15% of measured peaks; see the docs).
SAFETY_FRACTION = 0.85
# What a training process holds outside MLX's allocator: interpreter, MLX and numpy libraries,
# the token corpus, allocator slack. Seen as 65-110 MB above mx.get_peak_memory() on small runs.
RUNTIME_OVERHEAD = 256 * MiB

# Shape assumed when only a parameter count is known (see ModelShape.from_model_size).
DEFAULT_SEQ_LEN = 2048
DEFAULT_VOCAB = 32000
# (parameters, layers, d_model, heads) of the GPT-3 family (Brown et al. 2020, table 2.1).
GPT3_SHAPES = [
    (125e6, 12, 768, 12), (350e6, 24, 1024, 16), (760e6, 24, 1536, 16), (1.3e9, 24, 2048, 16),
    (2.7e9, 32, 2560, 32), (6.7e9, 32, 4096, 32), (13e9, 40, 5120, 40), (175e9, 96, 12288, 96),
]
# Largest per-device batch tried when no global batch is asked for.
MAX_BATCH_PER_DEVICE = 64

# Optimizer state in parameter-sized fp32 copies (AdamW: m and v; SGD with momentum: one buffer).
OPTIMIZER_STATE_COPIES = {"adamw": 2, "adam": 2, "sgd": 1}

# Activation counts, measured on MLX's CPU build as the slope of the built-in GPT's peak memory in
# depth, and its intercept (docs/memory_optimization.md). Units: one (batch, seq, d_model) tensor
# ("d") and one (batch, heads, seq, seq) attention-probability tensor ("s"), in the compute dtype.
# One layer keeps ~26 d + 1 s for its backward. Measured alone, the attention path keeps ~8 d
# (LayerNorm in/out, qkv, q*scale, re-laid-out heads and output) plus the softmax probabilities
# (fast SDPA falls back to matmul-softmax-matmul on CPU), the MLP path ~19 d (the 4*d-wide fc
# output and erf-GELU intermediates count 4 each).
LAYER = (26.0, 1.0)
# (saved per layer, live on top while one layer is differentiated), each as (d, s).
# Without checkpointing the layer being differentiated adds as many cotangents as it saved.
# With it, each layer keeps only its input/output and residual cotangent, and the live layer is
# recomputed in full and then differentiated: ~2.4 layers' worth at once.
ACTIVATIONS = {False: (LAYER, LAYER), True: ((3.5, 0.0), (62.0, 1.75))}
# Cross-entropy runs on fp32 logits: the logits, their softmax/logsumexp terms and gradient, in
# (batch, seq, vocab) fp32 copies; with bf16 the head's bf16 output and its cotangent come on top.
LOGITS_FP32_COPIES = {False: 3.4, True: 2.8}
LOGITS_BF16_COPIES = {False: 3.4, True: 2.4}
# MLX schedules the weight-gradient matmuls after the activation cotangents, so at the backward
# peak (measured) essentially no gradient has been written yet and the model has dropped its
# reference to the previous step's weights: weights and optimizer state are all that is static.
# The update: new weights (the old ones are still referenced by the model), raw and clipped
# gradients (Stepper keeps the raw micro-batch gradients alive), optimizer state, and AdamW's
# elementwise temporaries for the tensors in flight, ~4 times the largest parameter tensor.
# bf16 measures within 2% of fp32 here. With more than one device the all-reduced gradients are
# a new copy; in fp32 clipping then reuses its buffers, in bf16 it measures one copy more
# (2 ranks: 6.9 against 6.0 copies).
UPDATE_WEIGHT_AND_GRAD_COPIES = 4
UPDATE_TEMPORARIES = 4


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _positive_int(name: str, value: Any) -> int:
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
           f"{name} must be a positive integer, got {value!r}")
    return value


class _Record(Mapping):
    """A dataclass that also reads as a read-only dict (`plan['fits']` and `plan.fits`)."""

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def _keys(self) -> list:
        return [f.name for f in dataclasses.fields(self)]

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, _Record) else v for k, v in self.items()}


@dataclass(frozen=True)
class ModelShape(_Record):
    n_layers: int
    d_model: int
    n_heads: int
    seq_len: int
    vocab_size: int

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "seq_len", "vocab_size"):
            _positive_int(name, getattr(self, name))
        _check(self.d_model % self.n_heads == 0,
               f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")

    @property
    def n_params(self) -> int:
        """Exact for the built-in GPT: embeddings, head, and 12*d^2 + 9*d per block."""
        d = self.d_model
        return 2 * self.vocab_size * d + self.seq_len * d + self.n_layers * (12 * d * d + 9 * d) + 2 * d

    @property
    def largest_tensor(self) -> int:
        return max(self.vocab_size * self.d_model, 4 * self.d_model * self.d_model)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "ModelShape":
        return cls(cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.seq_len, cfg.vocab_size)

    @classmethod
    def from_model_size(cls, n_params: float, seq_len: int = DEFAULT_SEQ_LEN,
                        vocab_size: int = DEFAULT_VOCAB) -> "ModelShape":
        """GPT-3-like shape: depth and head width of the nearest GPT-3 size (log scale), d_model
        solved from 12*L*d^2 + (2*V + T)*d = n_params and rounded to whole heads."""
        _check(n_params > 0, f"model_size must be a positive parameter count, got {n_params!r}")
        _, layers, width, heads = min(GPT3_SHAPES, key=lambda s: abs(math.log(s[0] / n_params)))
        head_dim = width // heads
        a, b = 12 * layers, 2 * vocab_size + seq_len
        d = (-b + math.sqrt(b * b + 4 * a * n_params)) / (2 * a)
        n_heads = max(1, round(d / head_dim))
        return cls(layers, n_heads * head_dim, n_heads, seq_len, vocab_size)


@dataclass(frozen=True)
class MemoryBreakdown(_Record):
    """Bytes on one device for one training step. `peak` is what `mx.get_peak_memory()` should
    report; `total` adds the process's memory outside MLX and is what must fit the budget."""

    parameters: int        # fp32 master weights (+ the bf16 compute copy)
    gradients: int         # fp32 gradients (+ the accumulator when accumulation > 1)
    optimizer_state: int
    activations: int       # one micro-batch, at the backward peak
    optimizer_step: int    # the update's extra copies and temporaries, above the three above
    runtime_overhead: int
    backward_peak: int
    update_peak: int
    peak: int
    total: int
    peak_phase: str        # "backward" or "update"


def step_memory(shape: ModelShape, batch: int, accumulation: int = 1, checkpointing: bool = False,
                precision: str = "fp32", optimizer: str = "adamw", n_params: Optional[int] = None,
                num_devices: int = 1) -> MemoryBreakdown:
    """Predicted memory on one device of one `Stepper.step` with `batch` sequences per micro-batch."""
    _positive_int("batch size", batch)
    _positive_int("num_devices", num_devices)
    _positive_int("gradient_accumulation", accumulation)
    _check(precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    _check(optimizer in OPTIMIZER_STATE_COPIES,
           f"optimizer must be one of {', '.join(OPTIMIZER_STATE_COPIES)}, got {optimizer!r}")
    P = shape.n_params if n_params is None else int(n_params)
    _check(P > 0, f"the parameter count must be positive, got {P}")
    checkpointing = bool(checkpointing)
    fp32 = 4 * P
    state_copies = OPTIMIZER_STATE_COPIES[optimizer]

    parameters = fp32 + (2 * P if precision == "bf16" else 0)
    accumulator = fp32 if accumulation > 1 else 0
    optimizer_state = state_copies * fp32
    activations = activation_bytes(shape, batch, checkpointing, precision)

    backward_peak = parameters + optimizer_state + accumulator + activations
    update_copies = UPDATE_WEIGHT_AND_GRAD_COPIES + state_copies + (precision == "bf16" and num_devices > 1)
    update_peak = update_copies * fp32 + UPDATE_TEMPORARIES * 4 * shape.largest_tensor
    peak = max(backward_peak, update_peak)
    return MemoryBreakdown(
        parameters=parameters, gradients=fp32 + accumulator, optimizer_state=optimizer_state,
        activations=activations,
        optimizer_step=max(0, update_peak - (parameters + fp32 + optimizer_state)),
        runtime_overhead=RUNTIME_OVERHEAD, backward_peak=backward_peak, update_peak=update_peak,
        peak=peak, total=peak + RUNTIME_OVERHEAD,
        peak_phase="backward" if backward_peak >= update_peak else "update")


def activation_bytes(shape: ModelShape, batch: int, checkpointing: bool, precision: str) -> int:
    """Activation memory at the backward peak of one micro-batch (see the counts above)."""
    e = 2 if precision == "bf16" else 4
    tokens = batch * shape.seq_len
    d = tokens * shape.d_model
    s = batch * shape.n_heads * shape.seq_len * shape.seq_len
    logits = tokens * shape.vocab_size
    (saved_d, saved_s), (live_d, live_s) = ACTIVATIONS[checkpointing]
    layers = shape.n_layers * (saved_d * d + saved_s * s) + live_d * d + live_s * s
    head = 4 * LOGITS_FP32_COPIES[checkpointing] * logits
    if precision == "bf16":
        head += 2 * LOGITS_BF16_COPIES[checkpointing] * logits
    return int(e * layers + head)


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
    model: ModelShape
    n_params: int
    assumptions: tuple = ()

    def to_distributed_config(self, backend: str = "ring") -> DistributedConfig:
        return DistributedConfig(num_devices=self.num_devices, batch_size_per_device=self.suggested_batch_size,
                                 gradient_accumulation=self.gradient_accumulation, backend=backend)

    def apply_to(self, cfg: TrainConfig) -> TrainConfig:
        """`cfg` with this plan's batch split, precision and checkpointing (same global batch
        only if the plan was made for it)."""
        dist = dataclasses.replace(cfg.dist, num_devices=self.num_devices,
                                   batch_size_per_device=self.suggested_batch_size,
                                   gradient_accumulation=self.gradient_accumulation)
        return dataclasses.replace(cfg, dist=dist, precision=self.precision,
                                   grad_checkpoint=self.activation_checkpointing)


def device_memory() -> tuple:
    """(bytes, source) for this machine's accelerator, or its RAM on the CPU build."""
    import mlx.core as mx

    try:
        info = mx.device_info()
    except (AttributeError, RuntimeError):
        info = {}
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key]), f"mx.device_info()['{key}']"
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "system memory (CPU build)"


# A rank's default budget: this share of its device, split among the ranks on that device.
BUDGET_FRACTION = 0.9


def rank_budget(device_bytes: int, ranks_on_host: int) -> int:
    return int(device_bytes * BUDGET_FRACTION / max(1, ranks_on_host))


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
        model: Optional[ModelConfig] = None,
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
    ) -> MemoryPlan:
        """The largest per-device batch that fits, trying in order: fp32 without checkpointing,
        fp32 with it, then bf16 without and with (`precision`/`activation_checkpointing` force a
        setting). Accumulation makes up `global_batch_size`; without one, per-device batches are
        powers of two up to MAX_BATCH_PER_DEVICE with no accumulation. When nothing fits, the
        smallest-memory attempt comes back with `fits=False`."""
        _positive_int("num_devices", num_devices)
        _check(precision is None or precision in PRECISIONS,
               f"precision must be one of {', '.join(PRECISIONS)} or None (let the planner choose), got {precision!r}")
        _check(optimizer in OPTIMIZER_STATE_COPIES,
               f"optimizer must be one of {', '.join(OPTIMIZER_STATE_COPIES)}, got {optimizer!r}")
        _check(activation_checkpointing in (None, True, False),
               f"activation_checkpointing must be True, False or None, got {activation_checkpointing!r}")
        _check(isinstance(safety_fraction, (int, float)) and 0 < safety_fraction <= 1,
               f"safety_fraction must be in (0, 1], got {safety_fraction!r}")
        shape, n_params, assumptions = cls._resolve_model(model_size, model, n_layers, d_model, n_heads,
                                                          seq_len, vocab_size)
        hardware = cls._hardware(memory_per_device, safety_fraction)

        if global_batch_size is None:
            batches = [2 ** i for i in range(int(math.log2(MAX_BATCH_PER_DEVICE)), -1, -1)]
            per_device = None
            assumptions.append(f"no global batch asked for: per-device batch up to {MAX_BATCH_PER_DEVICE}, "
                               "no accumulation")
        else:
            _positive_int("global_batch_size", global_batch_size)
            _check(global_batch_size % num_devices == 0,
                   f"global_batch_size ({global_batch_size}) must be divisible by num_devices ({num_devices})")
            per_device = global_batch_size // num_devices
            batches = _divisors_desc(per_device)

        modes = [(p, c) for p in (PRECISIONS if precision is None else (precision,))
                 for c in ((False, True) if activation_checkpointing is None else (activation_checkpointing,))]
        closest = None
        for prec, ckpt in modes:
            for batch in batches:
                accumulation = 1 if per_device is None else per_device // batch
                mem = step_memory(shape, batch, accumulation, ckpt, prec, optimizer, n_params, num_devices)
                plan = MemoryPlan(
                    suggested_batch_size=batch, gradient_accumulation=accumulation,
                    global_batch_size=batch * accumulation * num_devices, num_devices=num_devices,
                    activation_checkpointing=ckpt, precision=prec, optimizer=optimizer,
                    fits=mem.total <= hardware.usable_memory, hardware=hardware, breakdown=mem,
                    model=shape, n_params=n_params, assumptions=tuple(assumptions))
                if plan.fits:
                    return plan
                # Ties go to the smaller batch of the earlier mode: no change that does not help.
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
        _check(isinstance(cfg, TrainConfig), f"expected a TrainConfig, got {type(cfg).__name__}")
        return step_memory(ModelShape.from_config(cfg.model), cfg.dist.batch_size_per_device,
                           cfg.dist.gradient_accumulation, cfg.grad_checkpoint, cfg.precision, optimizer,
                           num_devices=cfg.dist.num_devices)

    @staticmethod
    def suggest_recovery_config(current: Any) -> Any:
        """The next configuration to try after an out-of-memory failure, or None when nothing
        smaller is left. Steps: halve the per-device batch (the next smaller divisor if it is odd)
        with accumulation scaled up so the global batch is unchanged; at batch 1 turn on
        checkpointing; then switch to bf16. Takes and returns a TrainConfig, a dict, or any
        dataclass with those fields; the input is not modified."""
        return _recovery(current)

    @staticmethod
    def _resolve_model(model_size, model, n_layers, d_model, n_heads, seq_len, vocab_size):
        """(shape, parameter count, assumptions) from whichever description was given."""
        if model_size is not None:
            _check(isinstance(model_size, (int, float)) and not isinstance(model_size, bool) and model_size > 0,
                   f"model_size must be a positive parameter count, got {model_size!r}")
        assumptions = []
        if model is not None:
            _check(isinstance(model, ModelConfig), f"model must be a ModelConfig, got {type(model).__name__}")
            _check(all(v is None for v in (n_layers, d_model, n_heads, seq_len, vocab_size)),
                   "give either model= or the shape keywords, not both")
            shape = ModelShape.from_config(model)
        elif n_layers is not None or d_model is not None:
            _check(n_layers is not None and d_model is not None,
                   "give both n_layers and d_model (n_heads, seq_len, vocab_size have defaults)")
            _positive_int("d_model", d_model)
            if n_heads is None:
                n_heads = max(1, d_model // 64)
                assumptions.append(f"n_heads={n_heads} (head width 64)")
            if seq_len is None or vocab_size is None:
                seq_len, vocab_size = seq_len or DEFAULT_SEQ_LEN, vocab_size or DEFAULT_VOCAB
                assumptions.append(f"seq_len={seq_len}, vocab_size={vocab_size} where not given")
            shape = ModelShape(n_layers, d_model, n_heads, seq_len, vocab_size)
        elif model_size is not None:
            _check(n_heads is None, "n_heads needs n_layers and d_model")
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
            _check(isinstance(memory_per_device, (int, float)) and not isinstance(memory_per_device, bool)
                   and memory_per_device > 0,
                   f"memory_per_device must be positive bytes, got {memory_per_device!r}")
            memory, source = int(memory_per_device), "given (memory_per_device)"
        return Hardware(memory, int(memory * safety_fraction), safety_fraction, source)


_BATCH_KEYS = ("batch_size_per_device", "suggested_batch_size", "batch_size")
_CKPT_KEYS = ("grad_checkpoint", "activation_checkpointing")


def _recovery(current: Any) -> Any:
    if isinstance(current, TrainConfig):
        nxt = _recovery({"batch_size_per_device": current.dist.batch_size_per_device,
                         "gradient_accumulation": current.dist.gradient_accumulation,
                         "grad_checkpoint": current.grad_checkpoint, "precision": current.precision})
        if nxt is None:
            return None
        dist = dataclasses.replace(current.dist, batch_size_per_device=nxt["batch_size_per_device"],
                                   gradient_accumulation=nxt["gradient_accumulation"])
        return dataclasses.replace(current, dist=dist, grad_checkpoint=nxt["grad_checkpoint"],
                                   precision=nxt["precision"])
    if isinstance(current, Mapping):
        values = dict(current)
    elif dataclasses.is_dataclass(current) and not isinstance(current, type):
        values = {f.name: getattr(current, f.name) for f in dataclasses.fields(current)}
    else:
        raise ValueError(f"expected a TrainConfig, a dict or a dataclass, got {type(current).__name__}")

    _check(isinstance(current, Mapping) or "gradient_accumulation" in values,
           f"{type(current).__name__} has no gradient_accumulation field: the global batch could not be kept")
    batch_key = next((k for k in _BATCH_KEYS if k in values), None)
    _check(batch_key is not None, f"current settings need a per-device batch ({' or '.join(_BATCH_KEYS)})")
    batch = _positive_int(batch_key, values[batch_key])
    accumulation = _positive_int("gradient_accumulation", values.get("gradient_accumulation", 1))
    ckpt_key = next((k for k in _CKPT_KEYS if k in values), None)
    precision = values.get("precision")
    _check(precision is None or precision in PRECISIONS,
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
