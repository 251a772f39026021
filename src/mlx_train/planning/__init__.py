"""Planning: how much memory a step needs, which settings fit, and what to try after a failure.

Owns the memory model (`memory`), the planner search (`planner`: `MemoryOptimizer`), the
out-of-memory policy the supervisor consults (`oom`), the measured tuner's search (`optimize`)
and throughput arithmetic (`perf`). A device's own memory and its per-rank share are the rank's
(`rank/device.py`), which planning reads.

May import: the shared contracts and `mlx_train.rank` (device facts, model shapes). Never the
controller or the fleet: the controller calls planning, and hands the tuner a way to run trials.
"""
