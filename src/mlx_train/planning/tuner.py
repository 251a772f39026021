"""The search behind `mlx-train optimize`: which settings to try, in which order, and when to stop.

The candidates keep the global batch: each (precision, checkpointing) direction with every
per-device batch that divides it (accumulation makes up the rest). Settings the memory planner
predicts over the budget are never run. The rest are ranked by the scaling model
(planning/perf.py: step = accumulation x micro-batch compute + the gradient all-reduce, with
checkpointing's extra forward) and tried fastest-predicted first; after each trial the model is
calibrated on what was measured (compute and sync time per step), and the search stops when the
next candidate is predicted slower than the best measured by EARLY_STOP_GAIN. On several hosts
the ring's connections per address are tried last, on the best setting.

With `--shard auto` on several devices the shard levels are candidates too: each setting is tried at
the least level the planner says fits the budget (a higher level only adds traffic to the same
compute, so it never wins at the same setting), which lets a bigger micro-batch that only fits
sharded compete with the smaller ones that fit unsharded. The sync time is calibrated per level; a
level not yet measured is predicted from the measured ones by its traffic (SHARD_TRAFFIC).

With several devices and the built-in GPT, each number of pipeline stages that divides them is one
trial more after the search (`stage_candidates`), fitted by the per-stage memory model
(planning/stages.py): a model whose state fits no device at data parallel can still run staged.

Running a trial is the controller's job (controller/optimize.py hands the tuner a `measure`).
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import Callable, List, Optional

from mlx_train.config import SHARD_LEVELS, Split, TrainConfig
from mlx_train.planning import perf

EARLY_STOP_GAIN = 0.03
# Bytes a level moves per step against data parallel's all-reduce (ZeRO, arXiv 1910.02054, section 7):
# a reduce-scatter and an all-gather are one all-reduce; `full` gathers the weights twice.
SHARD_TRAFFIC = {"none": 1.0, "optimizer": 1.0, "gradients": 1.0, "full": 1.5}
# Checkpointing recomputes each block's forward during backward: one forward more on top of
# forward + backward (~3 forwards), before calibration.
CHECKPOINT_COST = 4 / 3
PREDICTED_SLOWER = "skipped (predicted slower)"


@dataclass
class Trial:
    split: Split
    connections: int = 1
    tokens_per_s: float = 0.0
    peak: int = 0
    status: str = "pending"   # ok | over budget | failed | skipped (...)
    predicted: float = 0.0    # the model's tokens/s when the trial was ranked (0: not yet calibrated)
    compute_s: float = 0.0    # measured per step (metrics' compute_time_s), filled by `measure`
    comm_s: float = 0.0       # measured gradient sync per step (comm_time_s)

    def apply(self, cfg: TrainConfig) -> TrainConfig:
        cfg = self.split.apply(cfg)
        return dataclasses.replace(cfg, dist=dataclasses.replace(cfg.dist, ring_connections=self.connections,
                                                                 pipeline_stages=self.split.stages))


class StepModel:
    """perf.predict_step for the tuner's candidates. Compute per step = (fixed + accumulation x
    per_micro) x the direction's factor: `fixed` holds the work that scales with the (constant)
    samples per step and the update, `per_micro` what each micro-batch costs on top. Sync: the
    measured comm_time_s (the same bytes for every candidate), nothing before. Tokens per step
    are the same for every candidate, so tokens/s = (measured tokens/s x step time) / step."""

    def __init__(self) -> None:
        self.fixed, self.per_micro = 1.0, 0.0   # units until the first measurement
        self.factor = {"ckpt": CHECKPOINT_COST, "bf16": 1.0, "other": CHECKPOINT_COST}
        self.comm = {}  # measured sync per step, by shard level
        self.tokens_per_step: Optional[float] = None

    def comm_s(self, t: Trial) -> float:
        level = t.split.shard
        if level in self.comm:
            return self.comm[level]
        if not self.comm:
            return 0.0
        # From the measured levels, scaled by the bytes each moves.
        return statistics.median(c / SHARD_TRAFFIC[lv] for lv, c in self.comm.items()) * SHARD_TRAFFIC[level]

    def compute_s(self, t: Trial) -> float:
        s = t.split
        c = self.fixed + s.accumulation * self.per_micro
        return c * (self.factor["ckpt"] if s.checkpointing else 1.0) * (self.factor["bf16"] if s.precision == "bf16" else 1.0)

    def step_s(self, t: Trial) -> float:
        # The trainer's phased step: nothing hides the sync (perf.MLX_OVERLAPS is False).
        return max(1e-9, perf.predict_step(self.compute_s(t), 0.0, 2, comm_s=self.comm_s(t)).step_s)

    def tokens_per_s(self, t: Trial) -> float:
        return self.tokens_per_step / self.step_s(t) if self.tokens_per_step else 0.0

    def calibrate(self, measured: List[Trial]) -> None:
        ok = [t for t in measured if t.status == "ok" and t.compute_s > 0]
        if not ok:
            return
        levels = {t.split.shard for t in ok}
        self.comm = {lv: statistics.median(t.comm_s for t in ok if t.split.shard == lv) for lv in levels}
        groups = {}
        for t in ok:
            groups.setdefault(_direction(t), []).append(t)
        # The line's shape (cost per micro-batch against the rest) from the direction that has
        # tried the most accumulations; its scale from fp32 without checkpointing when measured.
        shape = max(groups, key=lambda d: (len({t.split.accumulation for t in groups[d]}), d == "plain"))
        intercept, slope = _line([t.split.accumulation for t in groups[shape]], [t.compute_s for t in groups[shape]])
        ratio = slope / intercept if intercept > 0 else 0.0
        scale = "plain" if "plain" in groups else shape
        prior = 1.0 if scale == "plain" else self.factor[scale]
        self.fixed = statistics.median(t.compute_s / (prior * (1 + t.split.accumulation * ratio))
                                       for t in groups[scale])
        self.per_micro = ratio * self.fixed
        for d, seen in groups.items():
            if d != "plain" and (d != scale or scale == "plain"):
                self.factor[d] = statistics.median(t.compute_s / (self.fixed + t.split.accumulation * self.per_micro)
                                                   for t in seen)
        self.tokens_per_step = statistics.median(t.tokens_per_s * (t.compute_s + t.comm_s) for t in ok)

    def rank(self, candidates: List[Trial]) -> List[Trial]:
        """Fastest predicted first; ties: bigger batches, no checkpointing, fp32, the lesser level."""
        for t in candidates:
            t.predicted = self.tokens_per_s(t)
        return sorted(candidates, key=lambda t: (self.step_s(t), -t.split.batch, t.split.checkpointing,
                                                 t.split.precision != "fp32", SHARD_LEVELS.index(t.split.shard)))


def _direction(t: Trial) -> str:
    """Which factor of the model a trial measures: plain (fp32), ckpt (fp32) or bf16; mixed: other."""
    return {(False, "fp32"): "plain", (True, "fp32"): "ckpt", (False, "bf16"): "bf16"}.get(
        (t.split.checkpointing, t.split.precision), "other")


def _line(xs: List[int], ys: List[float]) -> tuple:
    """Least-squares (intercept, slope) of ys over xs; slope 0 while xs has one value."""
    mx_, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx_) ** 2 for x in xs)
    if var == 0:
        return my, 0.0
    slope = sum((x - mx_) * (y - my) for x, y in zip(xs, ys)) / var
    return my - slope * mx_, slope


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
        self.model = StepModel()

    def trial_config(self, t: Trial) -> TrainConfig:
        return dataclasses.replace(t.apply(self.base), steps=self.trial_steps, log_every=1, eval_every=10**6,
                                   checkpoint_every=10**6, memory_budget=self.budget)

    def fits(self, t: Trial) -> bool:
        """The planner's verdict; settings it predicts over the budget at every level allowed are listed,
        never run. A setting that fits is given the least level it fits at."""
        from mlx_train.planning.planner import MemoryOptimizer, levels_allowed

        cfg = self.trial_config(t)
        if not cfg.model.kind.knows_shape:
            return True
        if t.split.stages > 1:
            return self._stages_fit(t, cfg)
        levels = levels_allowed(self.base.shard, t.split.devices) if self.base.shard == "auto" else (t.split.shard,)
        for level in levels:
            at = dataclasses.replace(t.split, shard=level)
            if MemoryOptimizer.estimate(self.trial_config(dataclasses.replace(t, split=at))) <= self.budget:
                t.split = at
                return True
        t.status = "skipped (predicted over budget)"  # at every level allowed
        self.trials.append(t)
        return False

    def _stages_fit(self, t: Trial, cfg: TrainConfig) -> bool:
        """A pipeline's trial fits when every stage's peak does (planning/stages.py; the built-in GPT's
        full fp32 training without checkpointing: other pipelines are not predicted, so they run)."""
        from mlx_train.config import ModelKind
        from mlx_train.planning.memory import ModelShape
        from mlx_train.planning.stages import stage_memory

        if cfg.model.kind is not ModelKind.GPT or cfg.fine_tune.mode != "full" or t.split.precision != "fp32" \
                or t.split.checkpointing:
            return True
        shape, s = ModelShape.from_config(cfg.model), t.split.stages
        if s <= shape.n_layers and all(stage_memory(shape, s, i, t.split.batch, t.split.accumulation).peak
                                       <= self.budget for i in range(s)):
            return True
        t.status = "skipped (predicted over budget)"
        self.trials.append(t)
        return False

    def stage_candidates(self) -> List[Trial]:
        """One trial per number of pipeline stages S that divides the devices (a row per S, beside the
        setting the search chose): the built-in GPT's full training in fp32, the best trial's micro-batch
        where the replica's rows allow it. The search's scaling model does not predict a pipeline, so
        each runs."""
        from mlx_train.config import ModelKind

        base, n = self.base, self.base.dist.num_devices
        if base.model.kind is not ModelKind.GPT or base.fine_tune.mode != "full" or base.shard not in ("auto", "none"):
            return []
        best, g = self.best(), base.dist.global_batch_size
        want = best.split.batch if best is not None else base.dist.batch_size_per_device
        out = []
        for stages in range(2, min(n, base.model.n_layers) + 1):
            replicas = n // stages
            if n % stages or g % replicas or stages == base.dist.pipeline_stages:
                continue
            rows = g // replicas
            batch = max(b for b in range(1, min(want, rows) + 1) if rows % b == 0)
            out.append(Trial(Split(g, n, batch, rows // batch, False, "fp32", "none", stages),
                             base.dist.ring_connections))
        return out

    def measure(self, t: Trial) -> Trial:
        self.trials.append(t)
        self._measure(t, self.trial_config(t))
        return t

    def best(self) -> Optional[Trial]:
        ok = [t for t in self.trials if t.status == "ok"]
        return max(ok, key=lambda t: t.tokens_per_s, default=None)

    def candidates(self) -> List[Trial]:
        split = Split.of(self.base)
        per_device_total = split.batch * split.accumulation
        return [Trial(dataclasses.replace(split, batch=b, accumulation=per_device_total // b, checkpointing=ckpt,
                                          precision=precision), self.base.dist.ring_connections)
                for ckpt, precision in ((False, "fp32"), (True, "fp32"), (False, "bf16"))
                for b in _batches(per_device_total)]

    def run(self) -> Optional[Trial]:
        pending = [t for t in self.candidates() if self.fits(t)]
        while pending:
            self.model.calibrate(self.trials)
            pending = self.model.rank(pending)
            best, top = self.best(), pending[0]
            if best is not None and top.predicted and top.predicted < best.tokens_per_s * (1 - EARLY_STOP_GAIN):
                for t in pending:  # the model says none of the rest can win
                    t.status = PREDICTED_SLOWER
                self.trials += pending
                break
            pending.pop(0)
            self.measure(top)
            if top.status == "over budget":  # bigger batches of the same direction will not fit either
                same = [t for t in pending if (t.split.checkpointing, t.split.precision)
                        == (top.split.checkpointing, top.split.precision) and t.split.batch >= top.split.batch]
                for t in same:
                    t.status = "skipped (a smaller batch ran out of memory)"
                    pending.remove(t)
                self.trials += same
        for t in self.stage_candidates():
            if self.fits(t):
                self.measure(t)
        best = self.best()
        if best is not None and self.multi_host:
            for k in (2, 4):
                t = self.measure(dataclasses.replace(best, connections=k, status="pending", tokens_per_s=0.0, peak=0,
                                                     predicted=0.0, compute_s=0.0, comm_s=0.0))
                if t.status != "ok" or t.tokens_per_s < self.best().tokens_per_s * (1 + EARLY_STOP_GAIN):
                    break
        return self.best()
