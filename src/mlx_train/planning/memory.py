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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from mlx_train.config import PRECISIONS, ModelConfig, check, positive_int

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
            positive_int(name, getattr(self, name))
        check(self.d_model % self.n_heads == 0,
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
        check(n_params > 0, f"model_size must be a positive parameter count, got {n_params!r}")
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
    positive_int("batch size", batch)
    positive_int("num_devices", num_devices)
    positive_int("gradient_accumulation", accumulation)
    check(precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    check(optimizer in OPTIMIZER_STATE_COPIES,
           f"optimizer must be one of {', '.join(OPTIMIZER_STATE_COPIES)}, got {optimizer!r}")
    P = shape.n_params if n_params is None else int(n_params)
    check(P > 0, f"the parameter count must be positive, got {P}")
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
