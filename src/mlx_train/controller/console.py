"""What the supervisor shows on the terminal: a live progress bar on a TTY, plain lines elsewhere."""

from __future__ import annotations

import sys
import time
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ProgressView:
    def __init__(self, total: int, start: int = 0, live: Optional[bool] = None):
        self.total = total
        self.live = sys.stdout.isatty() if live is None else live
        # Plain output goes to logs and pipes: one message per line, never wrapped.
        self.console = Console(soft_wrap=not self.live)
        self.started = time.time()
        self.first_step = start
        self.loss = self.val = self.tps = None
        self._progress: Optional[Progress] = None
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[tps]} tok/s"),
                TimeRemainingColumn(), console=self.console, transient=False)
            self._task = self._progress.add_task("train", total=total, completed=start, loss="-", val="-", tps="-")
            self._progress.start()

    def metrics(self, rec: dict) -> None:
        self.loss, self.tps = rec["loss"], rec["tokens_per_s"]
        self.val = rec.get("val_loss", self.val)
        val = f"{self.val:.3f}" if self.val is not None else "-"
        if self._progress:
            self._progress.update(self._task, completed=rec["step"], loss=f"{self.loss:.3f}", val=val,
                                  tps=f"{self.tps:,.0f}")
        else:
            done = rec["step"] - self.first_step
            eta = (time.time() - self.started) / done * (self.total - rec["step"]) if done > 0 else None
            print(f"step {rec['step']}/{self.total}  loss {self.loss:.4f}  val {val}  "
                  f"{self.tps:,.0f} tok/s  eta {fmt_duration(eta)}", flush=True)

    def note(self, text: str) -> None:
        (self._progress.console if self._progress else self.console).print(text, highlight=False)

    def close(self) -> None:
        if self._progress:
            self._progress.stop()
