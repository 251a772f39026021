"""The line protocol from rank processes to the supervisor: every message kind, defined once.

A rank reports on its stdout with lines `@mlx-train {json}`; everything else it prints is log
text. stdout is the one channel that reaches the supervisor from every kind of launch (a local
child, `ssh host ...`, `mpirun --tag-output`), so the supervisor never needs the ranks' disks.

Each kind is a frozen dataclass below; `emit` writes one, `parse` reads one back (or says why a
line that looks like a message is not one). The supervisor dispatches on the class.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from typing import ClassVar, Dict, Optional, Type, Union

from mlx_train.events import RANK_WARNINGS

PREFIX = "@mlx-train "

# Exit codes a rank uses to tell the supervisor why it stopped.
EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_OUT_OF_MEMORY = 75  # the rank's peak passed --memory-budget (EX_TEMPFAIL: retry with less)
EXIT_ROLLBACK = 76       # too many bad steps in a row: the rank stops before it writes another checkpoint

# Skipped (non-finite) steps in a row after which the group goes back to its last checkpoint. The
# ranks stop by themselves there: a checkpoint written after it would hold the skipped steps.
ROLLBACK_AFTER_BAD_STEPS = 3


@dataclass(frozen=True)
class Message:
    kind: ClassVar[str] = ""

    def encode(self) -> str:
        # Optional fields left at None are not sent: readers treat absent and None alike.
        body = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return PREFIX + json.dumps({"kind": self.kind, **body})

    def fields(self) -> dict:
        """The message's fields without the unset optional ones (what goes into event records)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def invalid(cls, body: dict) -> Optional[str]:
        """Why a body whose fields have the right types is still no valid message of this kind, or None."""
        return None


KINDS: Dict[str, Type[Message]] = {}


def _kind(name: str):
    def register(cls):
        cls.kind = name
        KINDS[name] = cls
        return cls
    return register


@_kind("hello")
@dataclass(frozen=True)
class Hello(Message):
    """The rank joined its group; the pid is how the supervisor signals it on its host."""
    rank: int
    size: int
    host: str
    pid: int
    python: str


@_kind("budget")
@dataclass(frozen=True)
class Budget(Message):
    """The memory budget the rank checks its peak against (bytes)."""
    rank: int
    budget: int


@_kind("start")
@dataclass(frozen=True)
class Start(Message):
    """Built and restored: the training loop begins at `step` (the first step is slower: warm-up)."""
    step: int
    steps: int
    params: int
    global_batch: int


@_kind("hb")
@dataclass(frozen=True)
class Heartbeat(Message):
    """One optimizer step done, sent by every rank: the watchdog's evidence of progress."""
    step: int
    peak: int
    step_s: Optional[float] = None  # wall time of the step


@_kind("phase")
@dataclass(frozen=True)
class Phase(Message):
    """The rank begins (or, with done, ends) something slower than a step: "eval" or "checkpoint"."""
    name: str
    step: int
    done: bool = False


@_kind("metrics")
@dataclass(frozen=True)
class Metrics(Message):
    """One logged step (rank 0, for the whole group). This is the description of a metrics.jsonl
    line: the supervisor writes these fields and adds `time` (unix seconds) and `attempt` (the
    launch it came from); rundir.py, monitor and the README point here."""
    step: int                     # optimizer steps done
    loss: float                   # the last step's training loss, the global batch's token mean
    lr: float                     # learning rate used by the step
    tokens_per_s: float           # the group's real target tokens per second, over the steps since the last report
    step_time_s: float            # rank 0's mean wall time of those steps
    comm_time_s: float            # of which in the gradient all_sum, or sharded its reduce-scatter and gather (mean)
    compute_time_s: float         # of which in the forward and backward pass (mean)
    grad_norm: float              # the last step's gradient norm (before clipping)
    devices: int                  # ranks in the group
    grad_bytes: int               # bytes of gradients each rank reduces per step (its trainable parameters)
    global_batch: int             # sequences per optimizer step, over every rank and micro-batch
    peak_memory: list             # each rank's peak memory in bytes, by rank
    param_checksum: list          # each rank's parameter checksum, by rank (equal when the ranks agree)
    # Sharded (rank/spread.py): the flat buffers each rank reduce-scatters and all-gathers per
    # step, in bytes (it sends (N-1)/N of each); 0 when it does not.
    scattered_bytes: int = 0
    gathered_bytes: int = 0
    # Each rank's rows of every global batch, by rank: equal, or split by --shares (rank/batcher.py).
    rows: Optional[list] = None
    # Each rank's own mean compute and sync seconds per step, by rank; a sync lasts until the slowest
    # rank joins it, so what a rank's took beyond the quickest rank's (rank_wait_s) is waiting for the others.
    rank_compute_s: Optional[list] = None
    rank_comm_s: Optional[list] = None
    rank_wait_s: Optional[list] = None
    # A pipeline's (--pipeline-stages): each rank's mean wait per step inside the 1F1B schedule, by rank
    # (of its rank_comm_s; the rest is the sync after the micro-batches): its stage's idle time.
    stage_idle_s: Optional[list] = None
    val_loss: Optional[float] = None  # validation loss, at an evaluation
    sample: Optional[str] = None  # the embedded GPT's text after a fixed prompt, at an evaluation (rank/sample.py)


@_kind("resumed")
@dataclass(frozen=True)
class Resumed(Message):
    """Restore finished at `step`; `checkpoint` is None when there was none yet (a fresh start)."""
    step: int
    checkpoint: Optional[str] = None


@_kind("checkpoint")
@dataclass(frozen=True)
class Checkpoint(Message):
    step: int
    path: str
    agreed: Optional[bool] = None          # every rank's parameters were identical when it was written
    param_checksum: Optional[list] = None  # each rank's checksum then
    stall_s: Optional[float] = None        # how long it held the training loop up (the write runs beside it)
    write_s: Optional[float] = None        # how long the write itself took (in the background)


@_kind("checksum")
@dataclass(frozen=True)
class Checksum(Message):
    """One rank's own parameter checksum after `step` (sent by every rank at each report and checkpoint)."""
    step: int
    value: int


@_kind("warning")
@dataclass(frozen=True)
class RankWarning(Message):
    """Something the user should know that does not stop the rank; the supervisor records it as
    the event it names: one of events.RANK_WARNINGS, so no rank can write, say, the end of the run."""
    event: str
    details: dict = field(default_factory=dict)

    def __post_init__(self):
        why = self.invalid({"event": self.event})
        if why:
            raise ValueError(why)

    @classmethod
    def invalid(cls, body: dict) -> Optional[str]:
        if body["event"] not in RANK_WARNINGS:
            return f"{cls.kind}: event {body['event']!r} is not one a rank warns of " \
                   f"({', '.join(sorted(RANK_WARNINGS))})"
        return None


@_kind("bad_step")
@dataclass(frozen=True)
class BadStep(Message):
    """A step whose loss or gradient norm was not finite on some rank (or whose loss spiked past
    --loss-spike): every rank skipped its update."""
    step: int
    loss: float
    grad_norm: float
    in_a_row: int
    data_step: Optional[int] = None     # the data step it trained on (rank/dataskip.py)
    loss_limit: Optional[float] = None  # rank 0's --loss-spike limit then (a loss above it is a bad step)


@_kind("oom")
@dataclass(frozen=True)
class OutOfMemory(Message):
    """The rank's peak passed its budget; it exits with EXIT_OUT_OF_MEMORY next."""
    rank: int
    step: int
    peak: int
    budget: int


@_kind("done")
@dataclass(frozen=True)
class Done(Message):
    step: int


@_kind("stopped")
@dataclass(frozen=True)
class Stopped(Message):
    """Stopped cleanly at --stop-after, after its checkpoint."""
    step: int


@dataclass(frozen=True)
class Malformed:
    """A line that carries the prefix but no valid message: logged, never acted on."""
    text: str
    why: str


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list,), "dict": (dict,)}


def _check(cls: Type[Message], body: dict) -> Optional[str]:
    """Why `body` is not a valid `cls`, or None."""
    for f in dataclasses.fields(cls):
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if f.name not in body:
            if not has_default:
                return f"{cls.kind}: missing {f.name}"
            continue
        value, optional = body[f.name], f.type.startswith("Optional[")
        if value is None and optional:
            continue
        want = _TYPES[f.type[len("Optional["):-1] if optional else f.type]
        if not isinstance(value, want) or (isinstance(value, bool) and bool not in want):
            return f"{cls.kind}: {f.name} is {type(value).__name__}, not {f.type}"
    return None


def emit(msg: Message) -> None:
    sys.stdout.write(msg.encode() + "\n")
    sys.stdout.flush()


def parse(line: str) -> Union[Message, Malformed, None]:
    """The message in `line`, a Malformed when it carries the prefix but no valid message, or None
    when it is ordinary log text. Fields the reader does not know are ignored (a newer rank)."""
    at = line.find(PREFIX)
    if at < 0:
        return None
    text = line[at + len(PREFIX):]
    try:
        body = json.loads(text)
    except ValueError as exc:
        return Malformed(text, f"not JSON ({exc})")
    if not isinstance(body, dict) or not isinstance(body.get("kind"), str):
        return Malformed(text, "no kind")
    cls = KINDS.get(body["kind"])
    if cls is None:
        return Malformed(text, f"unknown kind {body['kind']!r}")
    why = _check(cls, body) or cls.invalid(body)
    if why:
        return Malformed(text, why)
    return cls(**{f.name: body[f.name] for f in dataclasses.fields(cls) if f.name in body})
