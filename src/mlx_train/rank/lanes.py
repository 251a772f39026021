"""Data parallelism inside one CPU rank: each micro-batch split across threads ("lanes").

MLX's CPU build runs all the ops of a stream on that stream's one thread; only matmuls (BLAS) use
more cores. On the bench's llama (1 process, 2 cores) that leaves a core idle for the elementwise
ops, softmax and reductions that are most of a step. MLX streams belong to the thread that made
them, and each runs on its own thread, so N threads, each with its own stream and its own traced
copy of the gradient function, compute N shards of a micro-batch at once, with BLAS at its share
of one lane per core. Measured on the llama (forward + backward, 2 cores): 754 ms with BLAS on one
thread, 594 ms on two, 423 ms as two lanes of one.

The lanes' gradients are summed in lane order, so the same lane count gives the same bits (a
resume stays exact); the sum across ranks that follows is unchanged. Each lane holds its own
gradient tree until they are summed: lanes - 1 extra copies of the gradients.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, List, Sequence

import mlx.core as mx

# More lanes than this stop paying on the hosts we know (each is a thread, a stream and a copy of
# the gradients); BLAS still uses the rest of the rank's cores.
MAX_LANES = 8


def count(requested: int, on_cpu: bool, cores: int, rows: int, grad_bytes: int, memory_budget: int) -> int:
    """The lanes a rank runs: `requested` (0: one per core the rank owns), never more than the
    micro-batch has rows, 1 on a GPU (one device queue; nothing to gain), and only as many as
    leave their extra gradient copies under a tenth of the memory budget."""
    if not on_cpu:
        return 1
    n = min(requested or min(cores, MAX_LANES), max(1, rows))
    while n > 1 and (n - 1) * grad_bytes > memory_budget // 10:
        n -= 1
    return max(1, n)


def shards(rows: int, n: int) -> List[slice]:
    """`rows` split into `n` contiguous, nearly equal parts (the larger first)."""
    base, extra = divmod(rows, n)
    bounds, start = [], 0
    for i in range(n):
        stop = start + base + (i < extra)
        bounds.append(slice(start, stop))
        start = stop
    return bounds


class _Lane(threading.Thread):
    def __init__(self, index: int):
        super().__init__(name=f"mlx-train-lane-{index}", daemon=True)
        self.jobs: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self.results: "queue.SimpleQueue[Any]" = queue.SimpleQueue()

    def run(self) -> None:
        with mx.stream(mx.new_stream(mx.cpu)):  # this thread's own stream: its ops run beside the others'
            while True:
                job = self.jobs.get()
                try:
                    self.results.put((True, job()))
                except BaseException as e:  # noqa: BLE001  (handed to the caller, who raises it)
                    self.results.put((False, e))


# The process's lane threads, made as needed and never ended: a thread that has run MLX graphs
# and exits leaves MLX state behind that aborts the process at exit ("terminate called without
# an active exception", MLX 0.32), so they live as long as the process, like a thread pool.
_THREADS: List[_Lane] = []
_THREADS_LOCK = threading.Lock()


class Lanes:
    """`n` threads, each with its own MLX CPU stream, that run one job each at a time. The threads
    are the process's (shared by every Lanes; one caller at a time)."""

    def __init__(self, n: int):
        with _THREADS_LOCK:
            while len(_THREADS) < n:
                _THREADS.append(_Lane(len(_THREADS)))
                _THREADS[-1].start()
        self._lanes = _THREADS[:n]

    def __len__(self) -> int:
        return len(self._lanes)

    def run(self, jobs: Sequence[Callable[[], Any]], together: bool = True) -> List[Any]:
        """Job i on lane i; their results in order. `together=False` runs them one after the other
        (while their functions are traced). A job's error is raised here once every lane is done,
        so no lane is left busy. Arrays a job uses must already be evaluated: another thread's
        stream cannot run here."""
        if not together:
            return [self._one(i, job) for i, job in enumerate(jobs)]
        for lane, job in zip(self._lanes, jobs):
            lane.jobs.put(job)
        results = [lane.results.get() for lane in self._lanes[:len(jobs)]]
        for ok, value in results:
            if not ok:
                raise value
        return [value for _, value in results]

    def _one(self, i: int, job: Callable[[], Any]) -> Any:
        self._lanes[i].jobs.put(job)
        ok, value = self._lanes[i].results.get()
        if not ok:
            raise value
        return value
