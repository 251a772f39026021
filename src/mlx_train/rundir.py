"""The run directory: a contract that the supervisor writes and monitor, status and tests read.

    config.yaml      resolved TrainConfig
    metrics.jsonl    one object per logged step: protocol.Metrics's fields, the time and the attempt
    events.jsonl     one object per event: its name (events.Event), the time and its fields
    checkpoints/     see checkpoint.py
    logs/rank-N.log  each rank's output
    .lock            held by the supervisor that owns the run (its pid and start time inside)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional

from mlx_train import procs
from mlx_train.config import TrainConfig
from mlx_train.errors import UserError
from mlx_train.events import ENDINGS, Event, event as as_event

RUNS_ROOT = Path("runs")


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


class RunDir:
    def __init__(self, path: Path | str):
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.yaml")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    events_path = property(lambda self: self.path / "events.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    logs = property(lambda self: self.path / "logs")

    @property
    def run_id(self) -> str:
        return self.path.resolve().name

    def log_path(self, rank: int) -> Path:
        return self.logs / f"rank-{rank}.log"

    def exists(self) -> bool:
        return self.config_path.is_file()

    def load_config(self) -> TrainConfig:
        try:
            return TrainConfig.from_yaml(self.config_path)
        except ValueError as exc:
            raise UserError(f"{self.config_path}: {exc}") from None

    def prepare(self, cfg: TrainConfig, resume: bool) -> None:
        """Create the directory for `cfg`, refusing to mix two different runs in one place."""
        if self.exists():
            old = self.load_config()
            if old.identity() != cfg.identity():
                changed = sorted(k for k in cfg.identity() if old.identity()[k] != cfg.identity()[k])
                raise UserError(f"{self.path} holds a different run ({', '.join(changed)} differ): choose another "
                                "--run-dir, or --resume it without changing those settings")
            if not resume:
                raise UserError(f"{self.path} already holds a run: add --resume {self.path} to continue it, "
                                "or choose another --run-dir")
        elif resume:
            raise UserError(f"nothing to resume in {self.path}: no config.yaml there")
        elif self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise UserError(f"{self.path} exists and is not a run directory (no config.yaml): choose a new or "
                            "empty --run-dir")
        made = []
        try:
            for d in (self.path, self.checkpoints, self.logs):
                if not d.is_dir():
                    d.mkdir(parents=True)
                    made.append(d)
            self.save_config(cfg)
        except OSError as exc:
            for d in reversed(made):  # leave nothing behind that we made
                shutil.rmtree(d, ignore_errors=True)
            raise UserError(f"cannot create the run directory {self.path} ({exc.strerror or exc}): choose another "
                            "--run-dir") from None

    def save_config(self, cfg: TrainConfig) -> None:
        """Write config.yaml, the one place it is written: at prepare, and when the supervisor changes the
        run's config (a re-split, the OOM ladder, data to skip) so that --resume continues with it.
        Whole or not at all: a crash mid-write leaves the old file."""
        tmp = self.config_path.with_suffix(".yaml.tmp")
        cfg.to_yaml(tmp)
        tmp.replace(self.config_path)

    def append(self, path: Path, record: dict) -> None:
        try:
            with path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:
            # A full or read-only disk must not bring the supervisor down with its ranks running;
            # the record is said on stderr instead (one line) and the run goes on.
            print(f"warning: cannot record in {path} ({exc.strerror}): {json.dumps(record)[:300]}", file=sys.stderr,
                  flush=True)

    def event(self, kind: Event | str, **fields) -> dict:
        """Record one event; `kind` must be in the vocabulary (events.py): an unknown name raises ValueError."""
        record = {"event": as_event(kind).value, "time": time.time(), **fields}
        self.append(self.events_path, record)
        return record

    def metrics(self) -> List[dict]:
        return [r for r in read_jsonl(self.metrics_path) if _is_metric(r)]

    def events(self, kind: Optional[Event] = None) -> List[dict]:
        """The run's events (of one kind, if given). A name this version does not know (a newer
        writer) is kept: readers compare against Event members and pass it by."""
        return [r for r in read_jsonl(self.events_path) if _is_event(r) and (kind is None or r["event"] == kind)]

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Held while a supervisor owns the run: a second one is refused, not mixed in. The OS drops
        the lock with its holder, so a SIGKILLed supervisor leaves nothing to clean up."""
        self.path.mkdir(parents=True, exist_ok=True)
        fh = (self.path / ".lock").open("a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise UserError(f"{self.path} is already supervised by {holder}: wait for that run to end, or stop it "
                            "before resuming") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        try:
            yield
        finally:
            fh.close()

    def supervisor(self) -> Optional[int]:
        """The pid of the supervisor that last held the run's lock (see lock()), or None."""
        try:
            words = (self.path / ".lock").read_text().split()
        except (OSError, UnicodeDecodeError):  # a damaged lock file names no supervisor
            return None
        return int(words[1]) if len(words) > 1 and words[0] == "pid" and words[1].isdigit() else None

    def supervised(self) -> bool:
        """Is the run's supervisor (on this machine) still running?"""
        pid = self.supervisor()
        return pid is not None and procs.alive(pid)

    def ended(self) -> bool:
        """Did the run end (finished, failed, interrupted, stopped), by its events?"""
        evs = self.events()
        return bool(evs) and evs[-1]["event"] in ENDINGS


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_metric(r) -> bool:
    """A record as the supervisor writes it from protocol.Metrics (which says what each field means), with
    the fields monitor and status read checked; anything else is skipped."""
    return (isinstance(r, dict) and isinstance(r.get("step"), int) and all(_number(r.get(k)) for k in (
        "loss", "tokens_per_s")) and isinstance(r.get("devices"), int) and r["devices"] > 0
        and isinstance(r.get("global_batch"), int)
        and all(isinstance(r.get(k), list) and len(r[k]) == r["devices"] and all(isinstance(x, int) for x in r[k])
                for k in ("peak_memory", "param_checksum"))
        and all(_number(r[k]) for k in ("val_loss", "time", "compute_time_s", "comm_time_s", "grad_bytes") if k in r))


def _is_event(r) -> bool:
    return isinstance(r, dict) and isinstance(r.get("event"), str) and _number(r.get("time"))


def read_jsonl(path: Path) -> Iterator[dict]:
    """Records of a JSONL file; a torn last line (a writer mid-append) and undecodable lines are skipped."""
    if not path.is_file():
        return
    with path.open(errors="replace") as fh:
        for line in fh:
            try:
                yield json.loads(line)
            except ValueError:
                continue


def newest_run(root: Path = RUNS_ROOT) -> Optional[RunDir]:
    runs = [RunDir(p) for p in root.glob("*/") if (p / "config.yaml").is_file()] if root.is_dir() else []
    return max(runs, key=lambda r: r.config_path.stat().st_mtime, default=None)
