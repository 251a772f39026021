"""Per-device memory planning: how much one training step needs, and which settings fit.

The model of memory follows what MLX actually keeps alive during `Stepper.step` (measured on the
CPU build of mlx 0.32 with `mx.get_peak_memory()`; docs/memory_optimization.md shows the
derivation and the accuracy grid). A step has two peaks that never overlap:

* backward: weights, optimizer state, the gradient accumulator (accumulation > 1) and the
  activations of one micro-batch;
* update: clipping and AdamW write new gradients, weights and moments while the old ones are
  still referenced, so about six parameter-sized copies exist at once.

At shard level `none` (data parallel) every device holds a full replica, so more devices only lower
the per-device need through a smaller share of the global batch. The other levels (ZeRO stages 1-3)
give each of N ranks 1/N of the optimizer state, then of the gradients, then of the weights
(`bytes_per_param`); `full` gathers one layer's weights at a time on top.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Tuple

from mlx_train.config import PRECISIONS, SHARD_LEVELS, FineTuneConfig, ModelConfig, check, positive_int

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
# Measured on ring ranks (bench/shard_memory.py, fp32, 2 and 3 ranks, docs/sharding.md "Memory model
# against measured"): with more than one device the update holds more than the copies above, the
# all-reduce's packed send buffer and its sum beside the gradient tree: data parallel ~1.7 copies more
# (the same at 2 and 3 ranks; it replaces the 1 copy bf16 was measured to add before the buckets).
SYNC_COPIES = 1.7
# `full`'s in-graph ring reduce-scatter: one layer's gradient more at the backward's peak (above).
RING_SCATTER_COPIES = 1.0
# The update peak of the sharded levels below `full` with more than one device, in copies of the
# trainable parameters as (whole, divided by N), AdamW's two moments included: fitted on the same
# measurements (GPT rows; the llama's checked against them). Both levels reduce-scatter; `optimizer`
# packs the gradient tree into one whole flat buffer for it (rank/spread.py), ~0.9 of a copy more
# than `gradients`, whose ring cuts each piece out of the gradient tree in the round that sends it.
# The divided terms grew when the ring became one evaluation (rank/ring_scatter.py): its rounds'
# receive buffers and sums, and the norm's squares, now live together, a few of this rank's
# 1/N chunks (re-measured: +19 MB at `optimizer` on 2 ranks, +6 at 3; the whole terms kept).
SHARDED_UPDATE_COPIES = {"optimizer": (3.5, 7.6), "gradients": (2.6, 6.6)}


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

    @property
    def largest_layer(self) -> int:
        """Parameters of the largest unit `full` gathers at once: a block, the embeddings or the head."""
        d = self.d_model
        return max(12 * d * d + 9 * d, (self.vocab_size + self.seq_len) * d, self.vocab_size * d + 2 * d)

    @property
    def trainable_bytes(self) -> int:
        return 4  # fp32 master weights

    @property
    def frozen_bytes(self) -> int:
        return 0

    @property
    def frozen_layer_bytes(self) -> int:
        return 0

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


# Pretrained llama-family models (rank/hf.py), measured like the GPT above on mlx-lm's llama with
# rank/step.py's Stepper (fp32, 2 and 4 layers; varying width, intermediate size, heads, sequence
# and batch): per layer ~9.4 (batch, seq, d_model) tensors, ~3.8 (batch, seq, kv_heads*head_dim)
# ones (k and v and their repeats), ~4.6 (batch, seq, intermediate) ones (SwiGLU's gate, up, their
# product and the SiLU terms) and ~0.3 attention-score tensors (the fused attention keeps few).
# Frozen layers (LoRA) keep the same activations: their inputs' cotangents still flow to the
# adapters below. The layer being differentiated adds one layer's worth, as for the GPT.
LM_LAYER = {"d": 9.4, "kv": 3.8, "ffn": 4.6, "s": 0.3}
# With checkpointing (mlx-lm's grad_checkpoint) not measured: assumed like the GPT's, each layer
# keeps its input and output and ~2.4 layers' worth are live while one is recomputed.
LM_CHECKPOINT_SAVED_D, LM_CHECKPOINT_LIVE_LAYERS = 3.5, 2.4
DORA_WEIGHT_COPIES = 1.65
_DTYPE_BYTES = {"float32": 4, "F32": 4, "bfloat16": 2, "BF16": 2, "float16": 2, "F16": 2}
# The linear layers of a llama-family block, as mlx-lm names them (LoRA keys).
LM_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class LMShape(_Record):
    """A pretrained decoder (llama-family layout) from its config.json, and what of it trains.

    Weights the run does not train hold memory at their stored size (packed when quantized) and no
    gradient or optimizer state; trainable ones (all of them in full fine-tuning, the adapters
    under LoRA/DoRA) are counted as the GPT's are, at their own dtype's size.
    """

    n_layers: int
    d_model: int
    n_heads: int
    seq_len: int
    vocab_size: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    tied_embeddings: bool = False
    dtype_bytes: int = 2                  # the stored floating-point weights (bf16 for most hub models)
    quant_bits: int = 0                   # 0: not quantized
    quant_group_size: int = 64
    fine_tune: str = "full"
    lora_rank: int = 8
    lora_layers: int = 16                 # -1: all
    lora_keys: Tuple[str, ...] = ()       # () : every linear layer of a block

    def _linears(self):
        d, q, kv, f = self.d_model, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.intermediate_size
        return dict(zip(LM_LINEARS, ((d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d))))

    @property
    def n_params(self) -> int:
        """Every weight of the base, unpacked."""
        block = sum(i * o for i, o in self._linears().values()) + 2 * self.d_model
        return self.vocab_size * self.d_model * (1 if self.tied_embeddings else 2) + self.n_layers * block + self.d_model

    @property
    def weight_bytes(self) -> int:
        """The base as held in memory: quantized matrices at bits/8 plus a scale and a bias per group."""
        d, n = self.d_model, self.dtype_bytes
        norms = (2 * self.n_layers + 1) * d * n
        # (last dim, size) of every matrix: mlx-lm quantizes those whose rows split into whole groups.
        matrices = [(d, self.vocab_size * d)] * (1 if self.tied_embeddings else 2)
        matrices += [(i, i * o) for i, o in self._linears().values()] * self.n_layers
        packed = self.quant_bits / 8 + 2 * n / self.quant_group_size
        return int(sum(size * (packed if self.quant_bits and last % self.quant_group_size == 0 else n)
                       for last, size in matrices)) + norms

    def _held(self, matrices) -> float:
        """Bytes of (last dim, size) matrices as held: packed where mlx-lm quantizes them."""
        packed = self.quant_bits / 8 + 2 * self.dtype_bytes / self.quant_group_size
        return sum(size * (packed if self.quant_bits and last % self.quant_group_size == 0 else self.dtype_bytes)
                   for last, size in matrices)

    @property
    def frozen_layer_bytes(self) -> int:
        """The largest unit of a frozen base that `full` gathers at once: a block or the embeddings."""
        if self.fine_tune == "full":
            return 0
        d = self.d_model
        block = self._held([(i, i * o) for i, o in self._linears().values()]) + 2 * d * self.dtype_bytes
        return int(max(block, self._held([(d, self.vocab_size * d)])))

    @property
    def largest_layer(self) -> int:
        """Trainable parameters of the largest unit `full` gathers at once (a block, or the embeddings)."""
        if self.fine_tune == "full":
            return max(sum(i * o for i, o in self._linears().values()) + 2 * self.d_model,
                       self.vocab_size * self.d_model)
        blocks = self.n_layers if self.lora_layers == -1 else min(self.lora_layers, self.n_layers)
        return -(-self.trainable // max(1, blocks))

    @property
    def adapted(self) -> list:
        """(in, out) of every adapted linear layer."""
        blocks = self.n_layers if self.lora_layers == -1 else min(self.lora_layers, self.n_layers)
        keys = self.lora_keys or LM_LINEARS
        return [shape for k, shape in self._linears().items() if k in keys] * blocks

    @property
    def trainable(self) -> int:
        if self.fine_tune == "full":
            return self.n_params
        extra = self.fine_tune == "dora"  # DoRA adds a magnitude per output
        return sum(self.lora_rank * (i + o) + (o if extra else 0) for i, o in self.adapted)

    @property
    def trainable_bytes(self) -> int:
        """Bytes per trainable element: the weights' own dtype, or fp32 for mlx-lm's adapters."""
        return self.dtype_bytes if self.fine_tune == "full" else 4

    @property
    def frozen_bytes(self) -> int:
        return 0 if self.fine_tune == "full" else self.weight_bytes

    @property
    def largest_tensor(self) -> int:
        if self.fine_tune == "full":
            return max(self.vocab_size * self.d_model, max(i * o for i, o in self._linears().values()))
        return max(self.lora_rank * max(i, o) for i, o in self.adapted) if self.adapted else 1

    @classmethod
    def from_model_dir(cls, path, seq_len: int, fine_tune: Optional[FineTuneConfig] = None) -> "LMShape":
        """The shape from `path`/config.json (and the weights' dtype from a safetensors header)."""
        import json
        from pathlib import Path

        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        cfg = {**cfg.get("text_config", {}), **cfg}
        d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        quant = cfg.get("quantization") or {}
        ft = fine_tune or FineTuneConfig()
        return cls(
            n_layers=cfg["num_hidden_layers"], d_model=d, n_heads=heads, seq_len=seq_len,
            vocab_size=cfg["vocab_size"], n_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or d // heads, intermediate_size=cfg["intermediate_size"],
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            dtype_bytes=_DTYPE_BYTES.get(cfg.get("torch_dtype") or cfg.get("dtype") or "", 0) or _stored_dtype(path),
            quant_bits=int(quant.get("bits", 0)), quant_group_size=int(quant.get("group_size", 64)),
            fine_tune=ft.mode, lora_rank=ft.lora_rank, lora_layers=ft.lora_layers, lora_keys=tuple(ft.keys or ()))


def _stored_dtype(path) -> int:
    """Bytes per element of the first floating-point tensor in the first safetensors file (2 if none)."""
    import json
    import struct

    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, info in sorted(header.items()):
            if name != "__metadata__" and info.get("dtype") in _DTYPE_BYTES:
                return _DTYPE_BYTES[info["dtype"]]
    return 2


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
    shard: str = "none"    # the level: which of the terms above are this rank's 1/N slice
    gathered: int = 0      # `full`: one layer's weights (and its gradient) gathered, already in the terms above

    def __str__(self) -> str:
        return (f"peak {self.peak / MiB:.0f} MiB at {self.peak_phase} (parameters {self.parameters / MiB:.0f}, "
                f"gradients {self.gradients / MiB:.0f}, optimizer state {self.optimizer_state / MiB:.0f}, "
                f"activations {self.activations / MiB:.0f} MiB) + {self.runtime_overhead / MiB:.0f} MiB outside MLX")


# Which of the training state's roles a level splits over the ranks: (parameters, gradients, optimizer).
SHARDED = {"none": (False, False, False), "optimizer": (False, False, True),
           "gradients": (False, True, True), "full": (True, True, True)}


def bytes_per_param(level: str, n: int, params: float = 2, grads: float = 2, optimizer: float = 12) -> float:
    """Bytes one of `n` ranks holds per trainable parameter at `level` (ZeRO, arXiv 1910.02054, section 5):
    with the defaults (mixed-precision AdamW: bf16 weights and gradients, fp32 master and moments) data
    parallel's 16, ZeRO-1's 4 + 12/n, ZeRO-2's 2 + 14/n and ZeRO-3's 16/n. step_memory passes its own
    roles: the fp32 masters are the model's weights here (4, 4, 8 in fp32)."""
    check(level in SHARDED, f"shard level must be one of {', '.join(SHARD_LEVELS)}, got {level!r}")
    positive_int("num_devices", n)
    return sum(b / n if sharded else b for b, sharded in zip((params, grads, optimizer), SHARDED[level]))


def _checked_params(shape, batch: int, accumulation: int, precision: str, optimizer: str,
                    n_params: Optional[int], num_devices: int) -> int:
    """The step's arguments checked once for every shard level; the trainable parameter count."""
    positive_int("batch size", batch)
    positive_int("num_devices", num_devices)
    positive_int("gradient_accumulation", accumulation)
    check(precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    check(optimizer in OPTIMIZER_STATE_COPIES,
          f"optimizer must be one of {', '.join(OPTIMIZER_STATE_COPIES)}, got {optimizer!r}")
    P = (shape.trainable if isinstance(shape, LMShape) else shape.n_params) if n_params is None else int(n_params)
    check(P > 0, f"the parameter count must be positive, got {P}")
    return P


def step_memory(shape: ModelShape, batch: int, accumulation: int = 1, checkpointing: bool = False,
                precision: str = "fp32", optimizer: str = "adamw", n_params: Optional[int] = None,
                num_devices: int = 1, shard: str = "none") -> MemoryBreakdown:
    """Predicted memory on one device of one `Stepper.step` with `batch` sequences per micro-batch, at
    shard level `shard` over `num_devices` ranks."""
    check(shard in SHARD_LEVELS, f"shard level must be one of {', '.join(SHARD_LEVELS)}, got {shard!r}")
    if shard != "none":
        return _sharded_step_memory(shape, batch, accumulation, checkpointing, precision, optimizer, n_params,
                                    num_devices, shard)
    lm = isinstance(shape, LMShape)
    P = _checked_params(shape, batch, accumulation, precision, optimizer, n_params, num_devices)
    checkpointing = bool(checkpointing)
    # "fp32" below: one copy of the trainable parameters (the GPT's fp32 masters; a pretrained
    # model's own dtype). A frozen base is held once and gets neither gradients nor state.
    per = shape.trainable_bytes if lm else 4
    fp32 = per * P
    frozen = shape.frozen_bytes if lm else 0
    state_copies = OPTIMIZER_STATE_COPIES[optimizer]

    parameters = fp32 + frozen + (2 * P if precision == "bf16" and per == 4 else 0)
    accumulator = fp32 if accumulation > 1 else 0
    optimizer_state = state_copies * fp32
    activations = activation_bytes(shape, batch, checkpointing, precision)

    backward_peak = parameters + optimizer_state + accumulator + activations
    update_copies = UPDATE_WEIGHT_AND_GRAD_COPIES + state_copies + (SYNC_COPIES if num_devices > 1 else 0)
    update_peak = int(update_copies * fp32 + frozen + UPDATE_TEMPORARIES * per * shape.largest_tensor)
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
    if isinstance(shape, LMShape):
        return lm_activation_bytes(shape, batch, checkpointing, precision)
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


def lm_activation_bytes(shape: LMShape, batch: int, checkpointing: bool, precision: str) -> int:
    """Activations of a pretrained decoder at the backward peak of one micro-batch (LM_LAYER)."""
    # Activations take the compute dtype: the weights' own, or bf16 when everything trains cast down.
    e = 2 if precision == "bf16" and shape.fine_tune == "full" else min(4, shape.dtype_bytes)
    tokens = batch * shape.seq_len
    d = tokens * shape.d_model
    layer = (LM_LAYER["d"] * d + LM_LAYER["kv"] * tokens * shape.n_kv_heads * shape.head_dim
             + LM_LAYER["ffn"] * tokens * shape.intermediate_size
             + LM_LAYER["s"] * batch * shape.n_heads * shape.seq_len * shape.seq_len)
    # DoRA rebuilds each adapted weight (W + scale * B A, and its norm) in fp32 in every forward and
    # keeps it for the backward: ~1.65 copies of the adapted matrices, measured.
    dora = DORA_WEIGHT_COPIES * 4 * sum(i * o for i, o in shape.adapted) if shape.fine_tune == "dora" else 0
    if checkpointing:
        layers = shape.n_layers * LM_CHECKPOINT_SAVED_D * d + LM_CHECKPOINT_LIVE_LAYERS * layer
    else:
        layers = (shape.n_layers + 1) * layer
    logits = tokens * shape.vocab_size
    return int(e * layers + 4 * LOGITS_FP32_COPIES[checkpointing] * logits + dora)


def _sharded_step_memory(shape, batch: int, accumulation: int, checkpointing: bool, precision: str, optimizer: str,
                         n_params: Optional[int], n: int, level: str) -> MemoryBreakdown:
    """step_memory at a ZeRO level: the same two peaks as data parallel's, with each role the level
    shards counted at 1/n (bytes_per_param) and what a sharded step holds on top.

    * The optimizer runs on the rank's slice only: its state, its raw and clipped gradients (below
      `full` reduce-scattered, from a whole packed buffer at `optimizer`) and AdamW's temporaries
      are 1/n; below `full` the new weights are all-gathered back whole, so old and new weights
      stay two full copies.
    * Sharded gradients are reduce-scattered a layer at a time as the backward makes them: one layer's
      full gradient is live on top of the shards (the accumulator is a shard too).
    * `full` keeps 1/n of the weights (and of a frozen base under LoRA) and gathers one layer's at a
      time, for the forward and again for the backward: one layer's weights (and bf16 copy) are live.
    """
    lm = isinstance(shape, LMShape)
    P = _checked_params(shape, batch, accumulation, precision, optimizer, n_params, n)
    per = shape.trainable_bytes
    cast = 2 if precision == "bf16" and per == 4 else 0  # the bf16 compute copy of fp32 weights
    k = OPTIMIZER_STATE_COPIES[optimizer]
    shard_p, shard_g, _ = SHARDED[level]
    p_share = 1 / n if shard_p else 1
    g_share = 1 / n if shard_g else 1
    layer = min(shape.largest_layer, P)

    # Static state: the level's 1/n of weights, gradients and moments (in this model's own roles).
    weights = int(per * P * p_share)
    frozen = shape.frozen_bytes  # a LoRA run's base: whole below `full`, else a slice and one layer gathered
    gathered = 0
    if shard_p:
        frozen = int(frozen / n) + shape.frozen_layer_bytes if frozen else 0
        gathered = (per + cast) * layer + shape.frozen_layer_bytes
    # The bf16 compute copy: of every weight, or of the gathered layer only (counted in `gathered`).
    trainable_gathered = gathered - shape.frozen_layer_bytes if shard_p else 0
    parameters = weights + (0 if shard_p else cast * P) + frozen + trainable_gathered
    optimizer_state = int(k * per * P / n)
    accumulator = int(per * P * g_share) if accumulation > 1 else 0
    bucket = per * layer if shard_g else 0  # one layer's gradient before its reduce-scatter
    if shard_p and n > 1:
        # `full`'s ring reduce-scatter in the backward (rank/ring_scatter.py) has all its rounds queued
        # at once, and MLX allocates an op's output when it is queued: the rounds' receive buffers and
        # sums sit beside the block's gradient, up to one more (measured 2.0-3.1 MiB on a 3 MiB block).
        bucket += int(RING_SCATTER_COPIES * per * layer)
    activations = activation_bytes(shape, batch, bool(checkpointing), precision)

    backward_peak = parameters + optimizer_state + accumulator + bucket + activations
    relayed = 1 if precision == "bf16" and n > 1 else 0  # as data parallel: bf16 keeps the reduced copy apart
    update_peak = int(2 * per * P * p_share + (2 + relayed) * per * P * g_share + optimizer_state + frozen
                      + UPDATE_TEMPORARIES * per * shape.largest_tensor / n)
    if n > 1 and level in SHARDED_UPDATE_COPIES:
        whole, divided = SHARDED_UPDATE_COPIES[level]
        update_peak = int((whole + (divided - (OPTIMIZER_STATE_COPIES["adamw"] - k)) / n) * per * P + frozen
                          + UPDATE_TEMPORARIES * per * shape.largest_tensor / n)
    peak = max(backward_peak, update_peak)
    gradients = int(per * P * g_share) + accumulator
    return MemoryBreakdown(
        parameters=parameters, gradients=gradients, optimizer_state=optimizer_state, activations=activations,
        optimizer_step=max(0, update_peak - (parameters + gradients + optimizer_state)),
        runtime_overhead=RUNTIME_OVERHEAD, backward_peak=backward_peak, update_peak=update_peak,
        peak=peak, total=peak + RUNTIME_OVERHEAD,
        peak_phase="backward" if backward_peak >= update_peak else "update", shard=level, gathered=gathered)
