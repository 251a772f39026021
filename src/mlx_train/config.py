"""Typed run configuration: validated once here, trusted everywhere after.

`TrainConfig` is the whole resolved configuration written to `config.yaml`; `DistributedConfig`
is the part the guide shows users (devices, per-device batch, accumulation, backend).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

BACKENDS = ("ring", "mpi", "any")
FINE_TUNE_MODES = ("full", "lora", "dora")
PACKINGS = ("pack", "pad")
PRECISIONS = ("fp32", "bf16")


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
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        return _dump(self, path)

    @classmethod
    def from_yaml(cls, source: str | Path):
        return from_dict(cls, _load(source))


@dataclass
class DistributedConfig(_Yaml):
    """How the work is split: `global batch = num_devices x batch_size_per_device x accumulation`."""

    num_devices: int = 1
    batch_size_per_device: int = 8
    gradient_accumulation: int = 1
    backend: str = "ring"
    # Ring backend: TCP connections per rank and address (MLX stripes each all_sum across them).
    ring_connections: int = 1

    def __post_init__(self) -> None:
        _positive_int(self, "num_devices", "batch_size_per_device", "gradient_accumulation", "ring_connections")
        check(self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    @property
    def global_batch_size(self) -> int:
        return self.num_devices * self.batch_size_per_device * self.gradient_accumulation


@dataclass
class ModelConfig:
    # "gpt" (built in) or "package.module:factory" (bring your own; see docs/model_development.md)
    name: str = "gpt"
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    seq_len: int = 128
    vocab_size: int = 256

    def __post_init__(self) -> None:
        _positive_int(self, "n_layers", "d_model", "n_heads", "seq_len", "vocab_size")
        check(self.d_model % self.n_heads == 0,
               f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        check(isinstance(self.name, str) and self.name.strip() != "",
               "model must be 'gpt', package.module:factory, a model directory or a Hugging Face id")


@dataclass
class DataConfig:
    # None: the running Python's standard library sources (present on every machine).
    path: Optional[str] = None
    val_fraction: float = 0.05
    mask_prompt: bool = field(default=False, metadata={
        "help": "train on completions only: prompts and all but the last chat message are masked out of the loss",
        "flag": "--mask-prompt"})
    packing: str = field(default="pack", metadata={
        "help": "JSONL data with a real model's tokenizer: 'pack' examples end to end into --seq-len rows, or "
                "'pad' one example a row (padding masked out of the loss)", "flag": "--packing"})

    def __post_init__(self) -> None:
        check(0.0 < self.val_fraction < 0.5, f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        check(self.packing in PACKINGS, f"packing must be one of {', '.join(PACKINGS)}, got {self.packing!r}")


@dataclass
class FineTuneConfig:
    """What of a pretrained model trains: all of it, or low-rank adapters (mlx-lm's LoRA/DoRA layers)."""

    mode: str = field(default="full", metadata={
        "help": "full: every weight trains; lora/dora: only adapters on a frozen (possibly quantized) base",
        "flag": "--fine-tune"})
    lora_rank: int = field(default=8, metadata={"help": "rank of each adapter", "flag": "--lora-rank"})
    lora_scale: float = field(default=20.0, metadata={
        "help": "adapter output scale (mlx-lm's 'scale'; alpha/rank in other tools)", "flag": "--lora-scale"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapters' input",
                                                       "flag": "--lora-dropout"})
    lora_layers: int = field(default=16, metadata={
        "help": "adapt the last N transformer blocks (-1, or more than the model has: all)", "flag": "--lora-layers"})
    lora_keys: Optional[str] = field(default=None, metadata={
        "help": "comma-separated module paths inside a block to adapt, e.g. self_attn.q_proj,self_attn.v_proj "
                "(default: every linear layer)", "flag": "--lora-keys"})

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


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        check(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables it), got {self.grad_clip}")


@dataclass
class TrainConfig(_Yaml):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistributedConfig = field(default_factory=DistributedConfig)
    fine_tune: FineTuneConfig = field(default_factory=FineTuneConfig)
    precision: str = "fp32"
    grad_checkpoint: bool = False
    steps: int = 300
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    seed: int = 0
    # Per-device memory budget in bytes; None means "derive from the device".
    memory_budget: Optional[int] = None

    def __post_init__(self) -> None:
        check(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _positive_int(self, "steps", "log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints")
        check(isinstance(self.seed, int) and self.seed >= 0, f"seed must be a non-negative integer, got {self.seed!r}")
        check(self.memory_budget is None or self.memory_budget > 0, "memory_budget must be positive bytes")

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


def from_dict(cls, data: Any, where: str = "config"):
    """Build dataclass `cls` from plain data, naming the offending key on any mismatch."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in {where} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(hint, value, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if value is None:
        return None
    args = typing.get_args(hint)
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base in (int, float, str, bool) and not isinstance(value, base):
        raise ValueError(f"{where} must be {base.__name__}, got {value!r}")
    if base is int and isinstance(value, bool):
        raise ValueError(f"{where} must be int, got {value!r}")
    return value


def _dump(obj: Any, path: str | Path | None) -> str:
    text = yaml.safe_dump(dataclasses.asdict(obj), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text


def _load(source: str | Path) -> Any:
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ValueError(f"{path} is not valid YAML{at}: fix or delete it") from None
