"""The search behind `mlx-train optimize`: which settings to try, in which order, and when to stop.

After DeepSpeed's autotuner: for each (precision, checkpointing) direction, grow the per-device
batch (accumulation keeps the global batch) while tokens/s still improves by at least
EARLY_STOP_GAIN; a direction whose first trial is already worse than the best so far by that much is
not explored further. Settings the memory planner predicts over the budget are never run. On
several hosts the ring's connections per address are tried last, on the best setting.

Running a trial is the controller's job (controller/tune.py hands the tuner a `measure`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, List, Optional

from mlx_train.config import TrainConfig

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
    """`measure(trial, cfg)` runs `cfg` for real and fills in the trial's status, tokens/s and peak."""

    def __init__(self, base: TrainConfig, budget: int, trial_steps: int, multi_host: bool,
                 measure: Callable[["Trial", TrainConfig], None]):
        self.base, self.budget, self.trial_steps = base, budget, trial_steps
        self.multi_host, self._measure = multi_host, measure
        self.trials: List[Trial] = []

    def trial_config(self, t: Trial) -> TrainConfig:
        return dataclasses.replace(t.apply(self.base), steps=self.trial_steps, log_every=1, eval_every=10**6,
                                   checkpoint_every=10**6, memory_budget=self.budget)

    def fits(self, t: Trial) -> bool:
        """The planner's verdict; settings it predicts over the budget are listed, never run."""
        from mlx_train.planning.planner import MemoryOptimizer, knows_shape

        cfg = self.trial_config(t)
        if not knows_shape(cfg.model) or MemoryOptimizer.estimate(cfg) <= self.budget:
            return True
        t.status = "skipped (predicted over budget)"
        self.trials.append(t)
        return False

    def measure(self, t: Trial) -> Trial:
        self.trials.append(t)
        self._measure(t, self.trial_config(t))
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
        if best is not None and self.multi_host:
            for k in (2, 4):
                t = self.measure(dataclasses.replace(best, connections=k, status="pending", tokens_per_s=0.0, peak=0))
                if t.status != "ok" or t.tokens_per_s < self.best().tokens_per_s * (1 + EARLY_STOP_GAIN):
                    break
        return self.best()
