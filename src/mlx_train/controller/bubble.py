"""A pipelined run's stages from one metrics record: each stage's compute, its idle time inside the
1F1B schedule, and the bubble against the schedule's theory (docs/pipeline.md). `monitor
--performance` shows them as rows, the trackers as curves (reporting.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional


def theory(stages: int, micro: int) -> float:
    """1F1B's idle share of a step when every forward and backward takes the same time on every
    stage: (S - 1) / (M + S - 1)."""
    return (stages - 1) / (micro + stages - 1)


@dataclass(frozen=True)
class StageTime:
    replica: int
    stage: int
    rank: int
    compute_s: float      # its forward and backward work, and its update (rank_compute_s)
    idle_s: float         # its waits inside the schedule, the transfers included (stage_idle_s)
    sync_s: float         # the collectives after the micro-batches (rank_comm_s - idle_s)
    step_s: float         # the step's wall time (rank 0's: every rank ends a step in one all_sum)

    @property
    def bubble(self) -> float:
        """The measured idle share of the step."""
        return self.idle_s / self.step_s if self.step_s > 0 else 0.0


def stage_times(record: dict, stages: int) -> Optional[List[StageTime]]:
    """Every rank's stage times, replica by replica (rank = replica x S + stage); None when the
    record has none (not pipelined, or logged before they were)."""
    idle, compute, comm = (record.get(k) for k in ("stage_idle_s", "rank_compute_s", "rank_comm_s"))
    if stages < 2 or not all(isinstance(v, list) for v in (idle, compute, comm)) \
            or not len(idle) == len(compute) == len(comm) or len(idle) % stages:
        return None
    step = float(record.get("step_time_s", 0.0))
    return [StageTime(r // stages, r % stages, r, compute[r], idle[r], max(comm[r] - idle[r], 0.0), step)
            for r in range(len(idle))]


def replica_bubble(times: List[StageTime], replica: int) -> float:
    """A replica's measured bubble: its stages' mean idle share of the step."""
    mine = [t.bubble for t in times if t.replica == replica]
    return sum(mine) / len(mine) if mine else 0.0
