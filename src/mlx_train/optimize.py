"""`mlx-train optimize`: short measured trials over settings; the best is written as a config file.

Search, after DeepSpeed's autotuner: for each (precision, checkpointing) direction, grow the
per-device batch (accumulation keeps the global batch) while tokens/s still improves by at least
EARLY_STOP_GAIN; a direction whose first trial is already worse than the best so far by that much is
not explored further. Settings the memory planner predicts over the budget are never run. On
several hosts the ring's connections per address are tried last, on the best setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from rich.console import Console
from rich.table import Table

from .config import TrainConfig
from .console import ProgressView
from .errors import UserError
from .memory_units import human, parse_bytes
from .rundir import RunDir

EARLY_STOP_GAIN = 0.03


@dataclass
class Trial:
    batch: int
    accumulation: int
    checkpointing: bool
    precision: str
    connections: int = 1
    tokens_per_s: float = 0.0
    peak: int = 0
    status: str = "pending"   # ok | over budget | failed | skipped (predicted over budget)

    def apply(self, cfg: TrainConfig) -> TrainConfig:
        dist = dataclasses.replace(cfg.dist, batch_size_per_device=self.batch, gradient_accumulation=self.accumulation,
                                   ring_connections=self.connections)
        return dataclasses.replace(cfg, dist=dist, grad_checkpoint=self.checkpointing, precision=self.precision)


def _batches(per_device_total: int) -> List[int]:
    """Per-device batches that keep the global batch: divisors, doubling from 1."""
    out, b = [], 1
    while b <= per_device_total:
        if per_device_total % b == 0:
            out.append(b)
        b *= 2
    return out


class Tuner:
    def __init__(self, base: TrainConfig, hosts, budget: int, trial_steps: int, console: Console):
        self.base, self.hosts, self.budget = base, hosts, budget
        self.trial_steps, self.console = trial_steps, console
        self.trials: List[Trial] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="mlx-train-optimize-"))

    def trial_config(self, t: Trial) -> TrainConfig:
        return dataclasses.replace(t.apply(self.base), steps=self.trial_steps, log_every=1, eval_every=10**6,
                                   checkpoint_every=10**6, memory_budget=self.budget)

    def fits(self, t: Trial) -> bool:
        """The planner's verdict; settings it predicts over the budget are listed, never run."""
        from .memory import MemoryOptimizer

        cfg = self.trial_config(t)
        if cfg.model.name != "gpt" or MemoryOptimizer.estimate(cfg) <= self.budget:
            return True
        t.status = "skipped (predicted over budget)"
        self.trials.append(t)
        return False

    def measure(self, t: Trial) -> Trial:
        from .supervisor import Supervisor

        cfg = self.trial_config(t)
        self.trials.append(t)
        run = RunDir(self.tmp / f"trial-{len(self.trials):02d}")
        run.prepare(cfg, resume=False)
        code = Supervisor(cfg, run, self.hosts, max_restarts=0, stall_timeout=120,
                          view=_Quiet(cfg.steps)).supervise()
        ms = [m for m in run.metrics() if m["step"] > 1]  # step 1 pays for start-up
        if code != 0 or not ms:
            t.status = "over budget" if any(e["event"] == "oom" for e in run.events()) else "failed"
            return t
        t.tokens_per_s = statistics.median(m["tokens_per_s"] for m in ms)
        t.peak = max(max(m["peak_memory"]) for m in ms)
        t.status = "ok"
        self.console.print(f"  batch {t.batch:>3} x acc {t.accumulation:>3}  ckpt {'on ' if t.checkpointing else 'off'} "
                           f"{t.precision}  conn {t.connections}: {t.tokens_per_s:,.0f} tok/s, peak {human(t.peak)}")
        return t

    def best(self) -> Optional[Trial]:
        ok = [t for t in self.trials if t.status == "ok"]
        return max(ok, key=lambda t: t.tokens_per_s, default=None)

    def explore(self, checkpointing: bool, precision: str) -> None:
        d = self.base.dist
        per_device_total = d.batch_size_per_device * d.gradient_accumulation
        prev: Optional[Trial] = None
        candidates = [Trial(b, per_device_total // b, checkpointing, precision, d.ring_connections)
                      for b in _batches(per_device_total)]
        for t in [t for t in candidates if self.fits(t)]:
            self.measure(t)
            if t.status == "over budget":
                break
            if t.status != "ok":
                continue
            leader = self.best()
            if prev is None and leader is not t and t.tokens_per_s < leader.tokens_per_s * (1 - EARLY_STOP_GAIN):
                break  # this direction starts clearly behind: not worth growing
            if prev is not None and t.tokens_per_s < prev.tokens_per_s * (1 + EARLY_STOP_GAIN):
                break  # the gain has flattened out
            prev = t

    def run(self) -> Optional[Trial]:
        self.explore(False, "fp32")
        first = self.best()
        # Checkpointing only pays when memory forbids the batches that run fastest without it.
        if first is None or any(t.status != "ok" for t in self.trials if not t.checkpointing):
            self.explore(True, "fp32")
        self.explore(False, "bf16")
        best = self.best()
        if best is not None and len({h.name for h in self.hosts}) > 1:
            for k in (2, 4):
                t = self.measure(dataclasses.replace(best, connections=k, status="pending", tokens_per_s=0.0, peak=0))
                if t.status != "ok" or t.tokens_per_s < self.best().tokens_per_s * (1 + EARLY_STOP_GAIN):
                    break
        return self.best()


class _Quiet(ProgressView):
    def __init__(self, total: int):
        super().__init__(total, live=False)

    def metrics(self, rec: dict) -> None:
        pass

    def note(self, text: str) -> None:
        pass


def optimize(a: argparse.Namespace) -> int:
    from .run import RunRequest, budget_for, check_inputs, hosts_for, resolve_config

    if a.trial_steps < 3:
        raise UserError("--trial-steps must be at least 3 (the first step pays for start-up)")
    req = RunRequest({"dist": {"num_devices": a.devices}}, a.config, distributed=a.distributed,
                     cluster_file=a.cluster)
    base = check_inputs(resolve_config(req))
    hosts = hosts_for(req, base)
    budget = parse_bytes(a.memory_budget) if a.memory_budget else (
        base.memory_budget or budget_for(hosts))
    console = Console(soft_wrap=True, width=None if Console().is_terminal else 140)
    console.print(f"optimize: {base.dist.num_devices} devices, global batch {base.dist.global_batch_size}, "
                  f"budget {human(budget)} per device, {a.trial_steps} steps per trial")
    tuner = Tuner(base, hosts, budget, a.trial_steps, console)
    best = tuner.run()
    console.print(_table(tuner.trials))
    if best is None:
        raise UserError("no candidate ran within the memory budget: raise --memory-budget or use a smaller model")
    out = best.apply(base)
    out.memory_budget = base.memory_budget
    out.to_yaml(a.output)
    if base.dist.num_devices == 1:
        from .perf import record_baseline

        record_baseline(out, best.tokens_per_s)
    console.print(f"best: {best.batch} per device x {best.accumulation} accumulation, checkpointing "
                  f"{'on' if best.checkpointing else 'off'}, {best.precision}, {best.connections} ring connection(s): "
                  f"{best.tokens_per_s:,.0f} tok/s; wrote {a.output} (use: mlx-train train --config {a.output})")
    return 0


def _table(trials: List[Trial]) -> Table:
    t = Table(title="trials, fastest first", title_justify="left")
    for col in ("rank", "batch/device", "accumulation", "checkpointing", "precision", "ring conn.", "tokens/s",
                "peak memory", "status"):
        t.add_column(col, justify="right")
    ranked = sorted(trials, key=lambda x: -x.tokens_per_s)
    for i, x in enumerate(ranked, 1):
        t.add_row(str(i) if x.status == "ok" else "-", str(x.batch), str(x.accumulation),
                  "on" if x.checkpointing else "off", x.precision, str(x.connections),
                  f"{x.tokens_per_s:,.0f}" if x.status == "ok" else "-", human(x.peak) if x.peak else "-", x.status)
    return t
