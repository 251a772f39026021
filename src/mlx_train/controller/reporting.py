"""Where the run's logged steps go: metrics.jsonl and, with `--report-to tensorboard,wandb`, trackers.

The supervisor hands each logged step to a list of sinks (mlx-lm's trainer callbacks): a callable
`(step, record)` or an object with `.log(step, record)`. metrics.jsonl is one (MetricsFile), the
experiment trackers another (Reporters), so a tracker sees exactly the records monitor reads. Each
backend is one class with the same three calls (open, log, close); `Reporters` fans a record out to
them and shields the run from them: a backend that raises is dropped with one `report_failed` event
and training goes on. The packages are optional (`pip install 'mlx-train[tracking]'`); a missing one
stops the run before launch.
"""

from __future__ import annotations

import importlib
import netrc
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Protocol, Union

from mlx_train.config import REPORT_TO, TrainConfig
from mlx_train.errors import UserError
from mlx_train.events import Event
from mlx_train.rundir import RunDir

# Record fields that are not curves: bookkeeping, or one value per rank.
_NOT_SCALARS = {"step", "time", "attempt", "devices", "param_checksum", "peak_memory", "sample"}
# Curves grouped the way TensorBoard and W&B fold tags at the first "/".
_SECTION = {"loss": "train", "val_loss": "eval", "lr": "train", "grad_norm": "train"}


class Sink(Protocol):
    def log(self, step: int, record: dict) -> None: ...


SinkLike = Union[Sink, Callable[[int, dict], None]]


def as_callback(sink: SinkLike) -> Callable[[int, dict], None]:
    return sink.log if hasattr(sink, "log") else sink


class MetricsFile:
    """metrics.jsonl: the record monitor, status, optimize and a resumed run's trackers read."""

    def __init__(self, run: RunDir):
        self.run = run

    def log(self, step: int, record: dict) -> None:
        self.run.append(self.run.metrics_path, record)


def scalars(record: dict) -> Dict[str, float]:
    """The record's curves, tagged e.g. train/loss, eval/val_loss, perf/tokens_per_s."""
    out = {f"{_SECTION.get(k, 'perf')}/{k}": float(v) for k, v in record.items()
           if k not in _NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}
    peaks = record.get("peak_memory")
    if isinstance(peaks, list) and peaks:
        out["perf/peak_memory_max"] = float(max(peaks))
    idle, step = record.get("stage_idle_s"), record.get("step_time_s")
    if isinstance(idle, list) and idle and step:  # a pipeline's: its stages' mean idle share (bubble.py)
        out["perf/bubble"] = sum(idle) / len(idle) / float(step)
    return out


class Reporter:
    """One tracker. `package` is the module the backend needs (checked before launch)."""
    name = ""
    package = ""

    def open(self, run: RunDir, config: TrainConfig) -> None:
        raise NotImplementedError

    def log(self, step: int, record: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def where(self) -> str:
        """Where the tracker writes, for the run's opening lines."""
        return self.name


class TensorBoard(Reporter):
    """Event files under runs/<id>/tensorboard/ (`tensorboard --logdir runs/<id>/tensorboard`)."""
    name, package = "tensorboard", "tensorboardX"

    def open(self, run: RunDir, config: TrainConfig) -> None:
        from tensorboardX import SummaryWriter

        logdir = run.path / "tensorboard"
        fresh = not any(logdir.glob("events.out.tfevents.*"))
        # tensorboardX names files by the second and opens them "wb": a writer opened again within
        # the same second (a quick resume) would write over the last one's file. Nanoseconds keep
        # the names distinct and in time order, the order TensorBoard reads them in.
        self.writer = SummaryWriter(logdir=str(logdir), flush_secs=10, filename_suffix=f".{time.time_ns()}")
        if fresh:  # the config once, when the run starts (a resume keeps it)
            self.writer.add_text("config", "```\n" + config.to_yaml() + "```", 0)

    def where(self) -> str:
        return f"TensorBoard in {self.writer.logdir}"

    def log(self, step: int, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        if isinstance(record.get("sample"), str):
            self.writer.add_text("eval/sample", record["sample"], step)

    def close(self) -> None:
        self.writer.close()


def _wandb_mode() -> str:
    """WANDB_MODE when the user set it; online when an API key is known; otherwise offline, which
    needs no account and no network (`wandb sync` uploads the run later)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


class Wandb(Reporter):
    """A W&B run named after the run id, its files under runs/<id>/wandb/. A resumed run continues
    the same W&B run (same id)."""
    name, package = "wandb", "wandb"

    def open(self, run: RunDir, config: TrainConfig) -> None:
        import wandb

        mode = _wandb_mode()
        # W&B refuses some characters in a run id that a --run-dir name may hold.
        run_id = re.sub(r"[^A-Za-z0-9_.-]", "-", run.run_id)[:64]
        kw = dict(project=os.environ.get("WANDB_PROJECT", "mlx-train"), dir=str(run.path), id=run_id,
                  name=run.run_id, resume="allow", config=config.to_dict(),
                  settings=wandb.Settings(silent=True, console="off", save_code=False, init_timeout=60))
        try:
            self.run = wandb.init(mode=mode, **kw)
        except Exception as exc:  # online, but the service cannot be reached: keep the history offline
            if mode != "online":
                raise
            print(f"warning: W&B online failed ({exc}); logging offline under {run.path / 'wandb'}",
                  file=sys.stderr, flush=True)
            self.run = wandb.init(mode="offline", **kw)

    def where(self) -> str:
        return f"W&B {self.run.settings.mode} in {Path(self.run.dir).parent}"

    def log(self, step: int, record: dict) -> None:
        data = dict(scalars(record))
        if isinstance(record.get("sample"), str):
            data["eval/sample"] = record["sample"]
        self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()


BACKENDS = {cls.name: cls for cls in (TensorBoard, Wandb)}
assert tuple(BACKENDS) == REPORT_TO


def check(names: List[str]) -> None:
    """Before launch: every backend asked for has its package, or one line saying how to get it."""
    for name in names:
        package = BACKENDS[name].package
        try:
            importlib.import_module(package)
        except ImportError:
            raise UserError(f"--report-to {name} needs {package}: pip install 'mlx-train[tracking]' (or "
                            f"pip install {package}), or drop {name} from --report-to") from None


class Reporters:
    """The backends of one run; none of their failures reaches the supervisor."""

    def __init__(self, run: RunDir, names: List[str], config: TrainConfig):
        self.run = run
        self.active: List[Reporter] = []
        # A restarted attempt logs again the steps since its checkpoint (bit-exact repeats):
        # trackers want steps that only go up, so those are not sent twice.
        self.last_step = max((m["step"] for m in run.metrics()), default=0)
        for name in names:
            backend = BACKENDS[name]()
            try:
                backend.open(run, config)
            except Exception as exc:
                self._failed(backend, "open", exc)
            else:
                self.active.append(backend)
                print(f"reporting to {backend.where()}", flush=True)

    def _failed(self, backend: Reporter, during: str, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"[:300]
        self.run.event(Event.REPORT_FAILED, backend=backend.name, during=during, reason=reason)
        print(f"warning: --report-to {backend.name} stopped reporting ({during}: {reason}); training goes on, "
              "metrics.jsonl has every step", file=sys.stderr, flush=True)

    def log(self, step: int, record: dict) -> None:
        if step <= self.last_step:
            return
        self.last_step = step
        for backend in list(self.active):
            try:
                backend.log(step, record)
            except Exception as exc:
                self.active.remove(backend)
                self._failed(backend, "log", exc)

    def close(self) -> None:
        for backend in self.active:
            try:
                backend.close()
            except Exception as exc:
                self._failed(backend, "close", exc)
        self.active = []


def open_reporters(run: RunDir, names: Optional[List[str]], config: TrainConfig) -> Optional[Reporters]:
    return Reporters(run, names, config) if names else None
