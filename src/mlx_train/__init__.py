"""mlx-train: data-parallel MLX training across a fleet of Macs and Linux boxes.

The package is drawn in levels; each imports only the levels below it (tests/test_layout.py):

    cli          the command line: parse, call one function, print one-line errors
    controller   one run: resolve the config, plan the launch, supervise the ranks, monitor
    fleet        hosts, the cluster file, ssh, configure, check-network, status, reset
    planning     memory model, planner, out-of-memory policy, tuner search
    rank         inside one training process: worker, trainer, step, model, data, checkpoints
    (top level)  the shared contracts: config, errors, procs, protocol, run directory, units

See docs/architecture.md.
"""

from mlx_train.config import DataConfig, DistributedConfig, ModelConfig, OptimConfig, TrainConfig

__version__ = "0.1.0"
__all__ = ["DistributedConfig", "TrainConfig", "ModelConfig", "DataConfig", "OptimConfig", "MemoryOptimizer",
           "__version__"]


def __getattr__(name):
    # Lazy so that `import mlx_train` stays cheap for the CLI and the config classes.
    if name == "MemoryOptimizer":
        from mlx_train.planning.planner import MemoryOptimizer

        return MemoryOptimizer
    raise AttributeError(name)
