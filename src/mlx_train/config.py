"""Typed run configuration: validated once here, trusted everywhere after.

`TrainConfig` is the whole resolved configuration written to `config.yaml`; `DistributedConfig`
is the part the guide shows users (devices, per-device batch, accumulation, backend); `RunOptions`
says how the controller runs it (restarts, run directory, ...); `Split` is one way of dividing the
global batch (devices, micro-batch, accumulation, checkpointing, precision). Every knob is one field: its
default, help and command-line flag live together (`knob`), and the `train` options are generated
from them (cli/options.py). The classes are frozen and check their values when built, so a config
that exists is valid: change one with `dataclasses.replace` (which checks the new one), and a rank
rebuilds the controller's already-checked config with `TrainConfig.trusted`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import shlex
import shutil
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import yaml

from mlx_train.errors import UserError
from mlx_train.units import MAX_BYTES, parse_bytes

BACKENDS = ("ring", "mpi", "any")
FINE_TUNE_MODES = ("full", "lora", "dora")
PACKINGS = ("pack", "pad")
PRECISIONS = ("fp32", "bf16")
# How much of the training state each rank holds a slice of, least first (ZeRO stages 0-3).
SHARD_LEVELS = ("none", "optimizer", "gradients", "full")
SHARD_CHOICES = (*SHARD_LEVELS, "auto")
REPORT_TO = ("tensorboard", "wandb")  # experiment trackers (controller/reporting.py)


def check(cond: bool, msg: str) -> None:
    """Validation at the edge: a ValueError with `msg` (the CLI turns it into one line)."""
    if not cond:
        raise ValueError(msg)


def positive_int(name: str, value: Any) -> int:
    check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
          f"{name} must be a positive integer, got {value!r}")
    return value


def _positive_int(obj: Any, *names: str) -> None:
    for name in names:
        positive_int(name, getattr(obj, name))


class _Yaml:
    """Dict and YAML round trips for the config dataclasses (validated on the way in)."""

    def to_dict(self) -> dict:
        return _plain(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        return _dump(self, path)

    @classmethod
    def from_yaml(cls, source: str | Path, complete: bool = False):
        return from_dict(cls, _load(source), complete=complete)


def knob(default: Any = dataclasses.MISSING, help: str = "", flag: Optional[str] = None, *,
         default_factory: Any = dataclasses.MISSING, **meta: Any) -> Any:
    """A config field carrying its help and command-line flag (cli/options.py turns these into argparse).

    Equivalent to `field(default=..., metadata={"help": ..., "flag": ...})`; `meta` may add choices
    (a tuple), metavar, parse (str -> value, e.g. parse_bytes, also applied to strings in a config
    file), store_false (the flag sets False, as `--no-live` does) and omit_default (left out of
    config.yaml while it holds its default). A field without a flag is set in the config file only.
    """
    metadata = {"help": help, **({"flag": flag} if flag else {}), **meta}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flagged_fields(cls, prefix: Tuple[str, ...] = ()) -> Iterator[Tuple[Tuple[str, ...], dataclasses.Field, Any]]:
    """Every field with a flag, nested dataclasses included, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from flagged_fields(hint, prefix + (f.name,))
        elif "flag" in f.metadata:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            yield prefix + (f.name,), f, (args[0] if args else hint)


def flag_of(key: str, given: dict, cls=None) -> Optional[str]:
    """The flag of the knob `key` (a field name, as validation messages start) when the user typed it:
    `given` holds what was typed, nested like `to_dict()`. None when the value came from elsewhere."""
    for path, f, _ in flagged_fields(cls or TrainConfig):
        if path[-1] != key:
            continue
        node = given
        for part in path:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return f.metadata["flag"]
    return None


AUTO_STAGES = 0  # --pipeline-stages auto, until the controller resolves it before launch


def parse_stages(text: str) -> int:
    """--pipeline-stages: a number of stages, or 'auto' (AUTO_STAGES)."""
    if str(text).strip().lower() == "auto":
        return AUTO_STAGES
    try:
        return int(text)
    except ValueError:
        raise UserError(f"pipeline_stages must be a number of stages or 'auto', got {text!r}") from None


@dataclass(frozen=True)
class DistributedConfig(_Yaml):
    """How the work is split: `global batch = num_devices x batch_size_per_device x accumulation`."""

    num_devices: int = knob(1, "number of ranks (with --distributed: default the cluster's slots)", "--devices")
    batch_size_per_device: int = knob(8, "per-device batch size", "--batch-size")
    gradient_accumulation: int = knob(1, "gradient accumulation steps", "--accumulation")
    backend: str = knob("ring", "MLX distributed backend", "--backend", choices=BACKENDS)
    # MLX stripes each all_sum across these connections.
    ring_connections: int = knob(1, "ring backend: TCP connections per rank and address")
    # Recorded with the run: `monitor --performance` shows the sync against this wire's limit.
    link_gbps: float = knob(0.0, "the links' rate between hosts in Gbit/s, if known (monitor --performance "
                            "and check-network show bandwidths against it)", "--link-gbps")
    # MLX's CPU build runs elementwise ops on one thread per stream (rank/lanes.py).
    cpu_threads: int = knob(0, "CPU ranks: split each micro-batch across N threads, each with its own MLX stream, "
                            "so all of the rank's cores do the elementwise work, not only its matmuls (0: one per "
                            "core the rank owns, up to 8; 1: off). GPU ranks use 1", "--cpu-threads")
    # Each rank's rows of every global batch (rank/batcher.py split_rows); the step's mathematics is the
    # equal split's whatever the shares (docs/advanced_training.md, "Unequal shares of the batch").
    # auto re-shares between hosts only (rank/balance.py): on one host it is the equal split, bit for bit.
    shares: str = knob("auto", "each rank's share of the global batch: 'auto' (equal at first, then each host's "
                       "rows in proportion to its measured speed, re-balanced when that pays, a host's ranks "
                       "equal: one host's run stays equal), 'equal', or one positive weight per device, e.g. 3,1 "
                       "(rank 0 gets 3/4 of the rows)",
                       "--shares", metavar="auto|equal|W1,W2,...")
    # A training pipeline (rank/pipeline.py): the devices are S x R, rank = replica x S + stage, so a
    # stage's neighbours are ring neighbours (the ring backend's send/recv reach no further).
    pipeline_stages: int = knob(1, "split the model's layers over S consecutive devices (a training pipeline, "
                                "1F1B over the --accumulation micro-batches; devices = S x replicas, each replica "
                                "a data-parallel copy of the pipeline; 'auto': the fewest stages at which the model "
                                "fits each host, 1 when it fits one; docs/pipeline.md)", "--pipeline-stages",
                                metavar="S|auto", parse=parse_stages)
    # Each stage's share of the layers (rank/pipeline.py stage_layers), in proportion to its host's
    # memory: set before launch from the cluster file (planning/stages.py); None: equal stages.
    stage_weights: Optional[Tuple[float, ...]] = knob(None, "each pipeline stage's share of the layers (set "
                                                      "before launch from the hosts' memory)", omit_default=True)
    # Hosts of unequal memory (--optimize-memory, planning/planner.py per_host_plan): rank r cuts its rows
    # into micro-batches of at most micro_caps[r] rows and accumulates the rest, so the global batch and
    # the data order stay the config's. None: every rank's micro-batch is batch_size_per_device.
    micro_caps: Optional[Tuple[int, ...]] = knob(None, "each rank's largest micro-batch, by rank (set by "
                                                 "--optimize-memory on hosts of unequal memory)",
                                                 omit_default=True)

    def __post_init__(self) -> None:
        _positive_int(self, "num_devices", "batch_size_per_device", "gradient_accumulation", "ring_connections")
        if self.pipeline_stages != AUTO_STAGES:  # auto: resolved before launch (planning/stages.py)
            positive_int("pipeline_stages", self.pipeline_stages)
        check(self.pipeline_stages == AUTO_STAGES or self.num_devices % self.pipeline_stages == 0,
              f"pipeline_stages {self.pipeline_stages} does not divide {self.num_devices} devices: the devices "
              f"are stages x replicas (e.g. --devices {self.pipeline_stages * 2} for 2 replicas)")
        check(self.pipeline_stages == 1 or self.shares in ("equal", "auto"),
              f"shares {self.shares!r} with pipeline_stages {self.pipeline_stages}: a pipeline's replicas take "
              "equal shares of the batch (drop --shares)")
        check(self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        check(isinstance(self.cpu_threads, int) and not isinstance(self.cpu_threads, bool)
              and 0 <= self.cpu_threads <= 256, f"cpu_threads must be 0 (automatic) to 256, got {self.cpu_threads!r}")
        check(isinstance(self.link_gbps, (int, float)) and not isinstance(self.link_gbps, bool)
              and 0 <= self.link_gbps < 1e6, f"link_gbps must be a rate in Gbit/s (0: unknown), got {self.link_gbps!r}")
        if self.micro_caps is not None:  # a config file's list: a tuple, as the frozen config holds it
            caps = self.micro_caps
            check(isinstance(caps, (list, tuple)) and len(caps) == self.num_devices,
                  f"micro_caps must give one micro-batch per device ({self.num_devices}), got {_show(caps)}")
            for cap in caps:
                positive_int("micro_caps", cap)
                check(cap <= INT_MAX, f"micro_caps must be at most {INT_MAX}, got {_show(cap)}")
            check(self.pipeline_stages == 1, "micro_caps with pipeline_stages: a pipeline's stages share their "
                  "replica's micro-batches (drop micro_caps)")
            object.__setattr__(self, "micro_caps", tuple(caps))
        if self.stage_weights is not None:  # a config file's list: a tuple, as the frozen config holds it
            sw = self.stage_weights
            check(isinstance(sw, (list, tuple)) and len(sw) == self.pipeline_stages
                  and all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w < float("inf") for w in sw),
                  f"stage_weights must give one positive weight per pipeline stage ({self.pipeline_stages}), got {_show(sw)}")
            object.__setattr__(self, "stage_weights", tuple(float(w) for w in sw))
        weights = self.share_weights()
        check(weights is None or len(weights) == self.num_devices,
              f"shares gives {len(weights or ())} weights for {self.num_devices} devices: give one weight per device "
              "(e.g. 3,1 for two), or 'equal'")

    @property
    def replicas(self) -> int:
        """Data-parallel copies of the model: every device, or every pipeline of `pipeline_stages`."""
        return self.num_devices // self.pipeline_stages

    @property
    def global_batch_size(self) -> int:
        # A pipeline's stages share their replica's micro-batches: only replicas add rows.
        return self.replicas * self.batch_size_per_device * self.gradient_accumulation

    def data_view(self) -> "DistributedConfig":
        """How the data is split: over the replicas (each a pipeline's stages, all reading the same
        rows); the config itself without a pipeline."""
        if self.pipeline_stages == 1:
            return self
        return dataclasses.replace(self, num_devices=self.replicas, pipeline_stages=1)

    def share_weights(self) -> Optional[Tuple[float, ...]]:
        """The explicit weights of --shares, or None: equal shares ('equal'; 'auto' starts equal and the
        ranks re-share from measured speeds, rank/balance.py)."""
        if self.shares in ("equal", "auto"):
            return None
        try:
            weights = tuple(float(w) for w in str(self.shares).split(","))
        except ValueError:
            weights = ()
        check(bool(weights) and all(math.isfinite(w) and w > 0 for w in weights),
              f"shares must be 'equal', 'auto' or positive weights separated by commas (e.g. 3,1), got {self.shares!r}")
        return weights


class ModelKind(enum.Enum):
    """What `--model` names; `model_kind` decides it from the name, and every side asks it."""

    GPT = "gpt"                # the built-in byte-level GPT (rank/model.py)
    FACTORY = "factory"        # package.module:factory, a model of the user's own (rank/model.py)
    PRETRAINED = "pretrained"  # a model directory or hub id, built by mlx-lm (rank/hf.py)

    @property
    def knows_shape(self) -> bool:
        """Can the memory model size it: the GPT from its fields, a pretrained model from its
        config.json. A factory's shape is the user's own."""
        return self is not ModelKind.FACTORY


def model_kind(name: str) -> ModelKind:
    """The kind of model `name` names, from the string alone (no model is read or fetched).

    Anything not "gpt" and not `module:factory` is pretrained, even a path that does not exist:
    rank/hf.py then says what is wrong with it. A name with a colon that exists on disk is that
    directory, not a factory."""
    if name == "gpt":
        return ModelKind.GPT
    if ":" in name and not Path(name).expanduser().exists():
        return ModelKind.FACTORY
    return ModelKind.PRETRAINED


@dataclass(frozen=True)
class ModelConfig:
    name: str = knob("gpt", "'gpt' (built in), package.module:factory (docs/model_development.md), or a pretrained "
                            "model: a directory (config.json, *.safetensors, tokenizer) or a Hugging Face id "
                            "(docs/fine_tuning.md)", "--model")
    n_layers: int = knob(4, "transformer blocks", "--layers")
    d_model: int = knob(128, "model width", "--width")
    n_heads: int = knob(4, "attention heads (must divide the width)", "--heads")
    seq_len: int = knob(128, "tokens per training sequence", "--seq-len")
    vocab_size: int = knob(256, "vocabulary size (set from the data at launch)")

    def __post_init__(self) -> None:
        _positive_int(self, "n_layers", "d_model", "n_heads", "seq_len", "vocab_size")
        check(self.d_model % self.n_heads == 0,
              f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        check(isinstance(self.name, str) and self.name.strip() != "",
              "model must be 'gpt', package.module:factory, a model directory or a Hugging Face id")

    @property
    def kind(self) -> ModelKind:
        return model_kind(self.name)


@dataclass(frozen=True)
class DataConfig:
    # None: the running Python's standard library sources (present on every machine).
    path: Optional[str] = knob(None, "text file/folder, .jsonl with 'text', or .npy token ids "
                                     "(default: the Python standard library's sources); with a pretrained model "
                                     "a folder with train.jsonl and valid.jsonl", "--data")
    val_fraction: float = knob(0.05, "share of the data held out for validation", "--val-fraction")
    mask_prompt: bool = knob(False, "train on completions only: the prompt (or every chat message but the last) "
                                    "counts for nothing in the loss", "--mask-prompt")
    packing: str = knob("pack", "JSONL with a pretrained model: 'pack' examples end to end into --seq-len rows, "
                                "or 'pad' one example a row (padding never counts in the loss)", "--packing",
                        choices=PACKINGS)

    def __post_init__(self) -> None:
        check(0.0 < self.val_fraction < 0.5, f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        check(self.packing in PACKINGS, f"packing must be one of {', '.join(PACKINGS)}, got {self.packing!r}")


@dataclass(frozen=True)
class FineTuneConfig:
    """What of a pretrained model trains: all of it, or low-rank adapters (mlx-lm's LoRA/DoRA layers)."""

    mode: str = knob("full", "full: every weight trains; lora/dora: only adapters on a frozen (possibly quantized) "
                             "base", "--fine-tune", choices=FINE_TUNE_MODES)
    lora_rank: int = knob(8, "rank of each adapter", "--lora-rank")
    lora_scale: float = knob(20.0, "adapter output scale (mlx-lm's 'scale'; alpha/rank in other tools)",
                             "--lora-scale")
    lora_dropout: float = knob(0.0, "dropout on the adapters' input", "--lora-dropout")
    lora_layers: int = knob(16, "adapt the last N transformer blocks (-1, or more than the model has: all)",
                            "--lora-layers")
    lora_keys: Optional[str] = knob(None, "comma-separated module paths inside a block to adapt, e.g. "
                                          "self_attn.q_proj,self_attn.v_proj (default: every linear layer)",
                                    "--lora-keys")

    def __post_init__(self) -> None:
        check(self.mode in FINE_TUNE_MODES, f"fine-tune must be one of {', '.join(FINE_TUNE_MODES)}, got {self.mode!r}")
        positive_int("lora_rank", self.lora_rank)
        check(self.lora_scale > 0, f"lora_scale must be > 0, got {self.lora_scale}")
        check(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check(isinstance(self.lora_layers, int) and (self.lora_layers > 0 or self.lora_layers == -1),
              f"lora_layers must be a positive integer or -1 (all), got {self.lora_layers!r}")

    @property
    def keys(self) -> Optional[list]:
        return [k.strip() for k in self.lora_keys.split(",") if k.strip()] if self.lora_keys else None


@dataclass(frozen=True)
class OptimConfig:
    lr: float = knob(3e-3, "peak learning rate", "--lr")
    min_lr_ratio: float = knob(0.1, "final learning rate as a fraction of the peak (cosine decay)")
    warmup_steps: int = knob(20, "warmup steps", "--warmup")
    weight_decay: float = knob(0.1, "AdamW weight decay")
    beta1: float = knob(0.9, "AdamW beta1")
    beta2: float = knob(0.95, "AdamW beta2")
    grad_clip: float = knob(1.0, "global gradient-norm clip (0 disables it)")

    def __post_init__(self) -> None:
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        check(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables it), got {self.grad_clip}")


@dataclass(frozen=True)
class TrainConfig(_Yaml):
    model: ModelConfig = knob(help="the model", default_factory=ModelConfig)
    data: DataConfig = knob(help="the data", default_factory=DataConfig)
    optim: OptimConfig = knob(help="the optimizer", default_factory=OptimConfig)
    dist: DistributedConfig = knob(help="where and how the batch is split", default_factory=DistributedConfig)
    fine_tune: FineTuneConfig = knob(help="what of a pretrained model trains", default_factory=FineTuneConfig)
    precision: str = knob("fp32", "compute precision", "--precision", choices=PRECISIONS)
    grad_checkpoint: bool = knob(False, "recompute each block in backward (less memory, more compute)",
                                 "--grad-checkpoint")
    steps: int = knob(300, "optimizer steps", "--steps")
    log_every: int = knob(10, "steps between metric lines", "--log-every")
    eval_every: int = knob(50, "steps between validation passes", "--eval-every")
    eval_batches: int = knob(4, "batches per validation pass")
    checkpoint_every: int = knob(50, "steps between checkpoints", "--checkpoint-every")
    keep_checkpoints: int = knob(3, "newest checkpoints kept", "--keep-checkpoints")
    seed: int = knob(0, "random seed (weights, data order)", "--seed")
    loss_spike: Optional[float] = knob(None, "a loss above X times its running mean counts as a bad step: its update "
                                             "is skipped on every rank, and three in a row roll back (default: off)",
                                       "--loss-spike", metavar="X")
    # Written by the supervisor after a rollback for bad steps (rank/dataskip.py), not by users:
    # [step, count] pairs, each moving the data of every step from `step` on `count` steps along.
    skip_data: list = knob(help="data windows stepped past after bad-step rollbacks ([step, count] pairs)",
                           default_factory=list)
    # None: derive from the device (planning's per-rank share of its memory).
    memory_budget: Optional[int] = knob(None, "per-device memory budget, bytes or e.g. 8GiB (default: from the "
                                              "device)", "--memory-budget", parse=parse_bytes, max=MAX_BYTES)
    shard: str = knob("auto", "split the training state over the ranks: none (each holds everything: data parallel, "
                              "ZeRO stage 0, FSDP NO_SHARD), optimizer (a slice of AdamW's state each: ZeRO-1), "
                              "gradients (and of the gradients: ZeRO-2, FSDP SHARD_GRAD_OP), full (and of the weights, "
                              "gathered a layer at a time: ZeRO-3, FSDP FULL_SHARD), or auto: the least sharding the "
                              "memory planner finds fits (docs/sharding.md)", "--shard", choices=SHARD_CHOICES)
    # The level `shard` resolved to for this run's hosts (planning.planner.resolve_shard, before launch), kept
    # apart from `shard` so that a re-plan can tell `auto` (may be raised) from a level the user chose (never).
    shard_level: Optional[str] = knob(None, "the sharding level this run uses (resolved from shard before launch)")

    def __post_init__(self) -> None:
        check(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _positive_int(self, "steps", "log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints")
        check(isinstance(self.seed, int) and self.seed >= 0, f"seed must be a non-negative integer, got {self.seed!r}")
        check(self.memory_budget is None or self.memory_budget > 0, "memory_budget must be positive bytes")
        check(self.shard in SHARD_CHOICES, f"shard must be one of {', '.join(SHARD_CHOICES)}, got {self.shard!r}")
        check(self.dist.pipeline_stages == 1 or self.shard in ("auto", "none"),
              f"shard {self.shard} with pipeline_stages {self.dist.pipeline_stages}: a pipeline's stages hold their "
              "own layers already (drop --shard)")
        # A level chosen with --shard wins over a shard_level left from before (a resume with --shard).
        check(self.shard_level is None or self.shard_level in SHARD_LEVELS,
              f"shard_level must be one of {', '.join(SHARD_LEVELS)}, got {self.shard_level!r}")
        check(self.loss_spike is None or self.loss_spike > 1, f"loss_spike must be > 1 (a multiple of the running "
              f"mean loss), got {self.loss_spike}")
        check(isinstance(self.skip_data, list) and all(
            isinstance(w, (list, tuple)) and len(w) == 2 and all(isinstance(x, int) and x >= 0 for x in w)
            for w in self.skip_data), f"skip_data must be a list of [step, count] pairs, got {self.skip_data!r}")

    def identity(self) -> dict:
        """What makes two runs the same run: resuming with a different identity is refused.

        The split of the global batch, precision and checkpointing are left out on purpose:
        out-of-memory recovery changes them while keeping the run's mathematics.
        """
        return {
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "optim": dataclasses.asdict(self.optim),
            "fine_tune": dataclasses.asdict(self.fine_tune),
            "global_batch_size": self.dist.global_batch_size,
            "steps": self.steps,
            "seed": self.seed,
        }

    def placed_at(self, placed: Dict[str, str]) -> "TrainConfig":
        """This config reading its model and data where fleet/ship.py put them on one host
        (the config's path -> that host's copy). The run's identity stays the unplaced config's."""
        if not placed:
            return self
        data = placed.get(self.data.path, self.data.path) if self.data.path else self.data.path
        return dataclasses.replace(self, model=dataclasses.replace(self.model, name=placed.get(self.model.name, self.model.name)),
                                   data=dataclasses.replace(self.data, path=data))

    @classmethod
    def trusted(cls, data: dict) -> "TrainConfig":
        """Rebuild a config that was validated at the edge (a rank's --config-json): no checks run again."""
        return _trusted(cls, data)


@dataclass(frozen=True)
class Split:
    """How one global batch is split: devices x micro-batch x accumulation, and the checkpointing and
    precision a step runs in. Every change of a run's split (--optimize-memory, an elastic resize,
    the out-of-memory ladder, `optimize`) is one of these; the global batch is given and checked
    against the product, so a split that would change the run's data cannot be built.

    The shard level is here for the reason checkpointing is: it trades memory for time without changing
    the run's mathematics, and the same re-plans choose it (the planner raises it before it cuts the
    micro-batch), so a re-split cannot drop it on the way to the config."""

    global_batch: int
    devices: int
    batch: int             # per device, per micro-batch
    accumulation: int
    checkpointing: bool = False
    precision: str = "fp32"
    shard: str = "none"    # a resolved level (SHARD_LEVELS), never "auto"
    stages: int = 1        # pipeline stages: the devices are stages x replicas, and only replicas add rows

    def __post_init__(self) -> None:
        _positive_int(self, "global_batch", "devices", "batch", "accumulation", "stages")
        check(self.devices % self.stages == 0, f"{self.devices} devices do not split into {self.stages} pipeline stages")
        check(isinstance(self.checkpointing, bool), f"checkpointing must be True or False, got {self.checkpointing!r}")
        check(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        check(self.shard in SHARD_LEVELS, f"shard must be one of {', '.join(SHARD_LEVELS)}, got {self.shard!r}")
        replicas = self.devices // self.stages
        check(replicas * self.batch * self.accumulation == self.global_batch,
              f"{replicas} {'replicas' if self.stages > 1 else 'devices'} x {self.batch} per device x "
              f"{self.accumulation} accumulation is {replicas * self.batch * self.accumulation}, not the global batch "
              f"{self.global_batch}")

    @classmethod
    def of(cls, cfg: "TrainConfig") -> "Split":
        d = cfg.dist
        return cls(d.global_batch_size, d.num_devices, d.batch_size_per_device, d.gradient_accumulation,
                   cfg.grad_checkpoint, cfg.precision, shard_level_of(cfg), d.pipeline_stages)

    def apply(self, cfg: "TrainConfig") -> "TrainConfig":
        """`cfg` split this way; everything else (backend, ring connections, ...) stays. A level other than
        the one the user chose with --shard is refused (ValueError)."""
        check(cfg.shard in ("auto", self.shard), f"--shard {cfg.shard} was chosen: a split at level {self.shard} "
              "would override it")
        # Explicit weights name one share per device: another number of devices goes back to equal shares
        # (an elastic resize, which knows the hosts, then carries each host's own: controller/elastic.py).
        shares = cfg.dist.shares if self.devices == cfg.dist.num_devices or cfg.dist.share_weights() is None \
            else "equal"
        # Per-rank micro-batch caps were planned for one split on one set of hosts: a re-split (the out-of-memory
        # ladder) gives every rank the split's micro-batch; a resize puts back the remaining hosts' (elastic.py).
        dist = dataclasses.replace(cfg.dist, num_devices=self.devices, batch_size_per_device=self.batch,
                                   gradient_accumulation=self.accumulation, shares=shares, micro_caps=None)
        level = {} if self.shard == shard_level_of(cfg) else {"shard_level": self.shard}
        return dataclasses.replace(cfg, dist=dist, grad_checkpoint=self.checkpointing, precision=self.precision,
                                   **level)

    def event(self) -> dict:
        """The fields `launch`, `resize` and `reconfigure` record, named as config.yaml names them."""
        # An unsharded split records what it always did.
        return {"devices": self.devices, "global_batch": self.global_batch, "batch_size_per_device": self.batch,
                "gradient_accumulation": self.accumulation, "grad_checkpoint": self.checkpointing,
                "precision": self.precision, **({"shard": self.shard} if self.shard != "none" else {}),
                **({"pipeline_stages": self.stages} if self.stages > 1 else {})}

    def __str__(self) -> str:
        return (f"{self.batch} per device x {self.accumulation} accumulation, "
                f"checkpointing {'on' if self.checkpointing else 'off'}, {self.precision}"
                + (f", shard {self.shard}" if self.shard != "none" else ""))


def shard_level_of(cfg: "TrainConfig") -> str:
    """The level `cfg` runs at: the one chosen with --shard, else the one `auto` resolved to before launch
    (none until then)."""
    return cfg.shard if cfg.shard != "auto" else cfg.shard_level or "none"


@dataclass(frozen=True)
class RunOptions:
    """How the controller runs a training job (not part of the run's config.yaml)."""

    config: Optional[str] = knob(None, "YAML config file (flags override it)", "--config")
    run_dir: Optional[str] = knob(None, "run directory (default runs/<run-id>)", "--run-dir")
    resume: Optional[str] = knob(None, "continue the run in DIR from its last checkpoint (its config.yaml is the "
                                       "base; flags override it)", "--resume", metavar="DIR")
    distributed: bool = knob(False, "run across the hosts in the cluster file", "--distributed")
    cluster: Optional[str] = knob(None, "cluster file (default ./cluster.yaml or ~/.mlx-train/cluster.yaml)",
                                  "--cluster")
    ship_cache: Optional[str] = knob(None, "where each remote host keeps the model and data copied to it, a path on "
                                           "that host (default $MLX_TRAIN_SHIP_CACHE, else ~/.cache/mlx-train/shipped)",
                                     "--ship-cache", metavar="DIR")
    ship_cache_days: int = knob(30, "a remote host drops the copies in its ship cache that no run has used for this "
                                    "many days when a run ships there (0: keep everything)", "--ship-cache-days",
                                metavar="DAYS")
    max_restarts: int = knob(3, "relaunches after a rank failure before giving up", "--max-restarts")
    stall_timeout: Optional[float] = knob(None, "seconds without progress from a rank before a restart (default: "
                                          "adaptive, 5 x the median step, at least 10 s, with allowances for "
                                          "start-up, evaluation and checkpoints; raise it for steps over 120 s)", "--stall-timeout")
    stop_after: Optional[int] = knob(None, "checkpoint and stop cleanly after this step", "--stop-after")
    min_devices: Optional[int] = knob(None, "elastic: exclude a host that fails repeatedly or cannot be reached and "
                                            "go on with the rest while at least N devices remain (default: off)",
                                      "--min-devices", metavar="N")
    max_devices: Optional[int] = knob(None, "elastic: re-admit recovered hosts only up to N devices", "--max-devices",
                                      metavar="N")
    optimize_memory: bool = knob(False, "start from the memory planner's split", "--optimize-memory")
    live: Optional[bool] = knob(None, "plain log lines instead of a progress bar", "--no-live", store_false=True)
    rank_wrapper: Optional[str] = knob(None, "prefix each local rank's command, e.g. 'taskset -c 0' or "
                                             "'prlimit --as=4000000000'", "--rank-wrapper", metavar="CMD")
    report_to: Optional[str] = knob(None, "also send the logged steps to experiment trackers: tensorboard, wandb, "
                                          "or both comma-separated (W&B logs offline without an API key; needs "
                                          "pip install 'mlx-train[tracking]')", "--report-to", metavar="LIST")

    def __post_init__(self) -> None:
        check(isinstance(self.max_restarts, int) and self.max_restarts >= 0,
              f"--max-restarts must be >= 0, got {self.max_restarts}")
        check(isinstance(self.ship_cache_days, int) and not isinstance(self.ship_cache_days, bool)
              and self.ship_cache_days >= 0, f"--ship-cache-days must be a whole number of days >= 0 (0 keeps "
              f"everything), got {self.ship_cache_days}")
        check(self.stall_timeout is None or isinstance(self.stall_timeout, (int, float))
              and math.isfinite(self.stall_timeout) and self.stall_timeout > 0,
              f"--stall-timeout must be a positive number of seconds, got {self.stall_timeout}")
        for name in ("min_devices", "max_devices"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, int) and value > 0),
                  f"--{name.replace('_', '-')} must be a positive number of devices, got {value}")
        check(self.min_devices is None or self.max_devices is None or self.min_devices <= self.max_devices,
              f"--min-devices ({self.min_devices}) must not exceed --max-devices ({self.max_devices})")
        check(self.stop_after is None or self.stop_after > 0,
              f"--stop-after must be a positive step, got {self.stop_after}")
        if self.rank_wrapper is not None:
            try:
                argv = shlex.split(self.rank_wrapper)
            except ValueError as exc:
                raise ValueError(f"--rank-wrapper {self.rank_wrapper!r} is not a command line ({exc}): fix its "
                                 "quoting") from None
            check(not argv or shutil.which(argv[0]) is not None,
                  f"--rank-wrapper: no program {argv[0]!r} on PATH" if argv else "")
        for name in self.trackers:
            check(name in REPORT_TO, f"--report-to {name[:40]!r} is not one of {', '.join(REPORT_TO)}, none")

    @property
    def trackers(self) -> list:
        """--report-to as a list of names, each once, in the order given ([] for none)."""
        names = [n.strip().lower() for n in (self.report_to or "").split(",") if n.strip()]
        return list(dict.fromkeys(n for n in names if n != "none"))


def _trusted(cls, data: dict):
    hints = typing.get_type_hints(cls)
    obj = object.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
        else:  # a key missing from the JSON (never, from our supervisor): the field's default
            value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, dict):
            value = _trusted(hints[f.name], value)
        object.__setattr__(obj, f.name, value)  # frozen: how dataclasses itself sets fields
    return obj


# Integers in the config fit in 32 bits (MLX counts steps and seeds with them) unless a field says more.
INT_MAX = 2**31 - 1


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def from_dict(cls, data: Any, where: str = "config", complete: bool = False):
    """Build dataclass `cls` from plain data, naming the offending key on any mismatch.

    `complete`: every field must be there (a run's own config.yaml, which is written whole).
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping of settings, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in data if k not in fields), key=str)
    if unknown:
        raise ValueError(f"unknown key {_show(unknown[0])} in {where}: use one of {', '.join(fields)}")
    missing = [k for k in fields if k not in data and not fields[k].metadata.get("omit_default")]
    if complete and missing:
        raise ValueError(f"{where} lacks {missing[0]!r}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{where}.{name}", complete)
            continue
        parse = fields[name].metadata.get("parse")
        if parse is not None and isinstance(value, str):  # e.g. memory_budget: 8GiB
            try:
                value = parse(value)
            except Exception as exc:
                raise ValueError(f"{where}.{name}: {exc}") from None
        kwargs[name] = _coerce(hint, value, f"{where}.{name}", fields[name].metadata.get("max", INT_MAX))
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str, int_max: int = INT_MAX) -> Any:
    args = typing.get_args(hint)
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"{where} must be {base.__name__}, got null")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 2**1000 else math.inf
    if base in (int, float, str, bool) and (not isinstance(value, base) or base is int and isinstance(value, bool)):
        raise ValueError(f"{where} must be {base.__name__}, got {_show(value)}")
    if base is float and not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {_show(value)}")
    if base is int and abs(value) > int_max:
        raise ValueError(f"{where} must be at most {int_max}, got {_show(value)}")
    return value


def _dump(obj: Any, path: str | Path | None) -> str:
    text = yaml.safe_dump(_plain(obj), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text


def _plain(obj: Any) -> dict:
    """`obj` as plain data, less the fields marked `omit_default` while they hold their default: a field
    that only some runs use leaves every other run's config.yaml as it was (and older ones resumable)."""
    out = dataclasses.asdict(obj)

    def prune(o: Any, d: dict) -> None:
        for f in dataclasses.fields(o):
            value = getattr(o, f.name)
            if dataclasses.is_dataclass(value):
                prune(value, d[f.name])
            elif f.metadata.get("omit_default") and value == f.default:
                del d[f.name]

    prune(obj, out)
    return out


def _load(source: str | Path) -> Any:
    path = Path(source)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a config file: pass a .yaml file")
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist: check the path")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: pass a YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ValueError(f"{path} is not valid YAML{at}: fix or delete it") from None
    except (RecursionError, OSError) as exc:
        raise ValueError(f"{path} cannot be read as YAML ({type(exc).__name__}): fix or delete it") from None
    if data is None:
        raise ValueError(f"{path} is empty: write settings in it (see `mlx-train train --help`) or leave it out")
    return data
