"""mlx-train: data-parallel MLX training across a fleet of Macs and Linux boxes."""

from .config import DataConfig, DistributedConfig, ModelConfig, OptimConfig, TrainConfig

__version__ = "0.1.0"
__all__ = ["DistributedConfig", "TrainConfig", "ModelConfig", "DataConfig", "OptimConfig", "MemoryOptimizer",
           "__version__"]


def __getattr__(name):
    # Lazy so that `import mlx_train` stays cheap for the CLI and the config classes.
    if name == "MemoryOptimizer":
        from .memory import MemoryOptimizer

        return MemoryOptimizer
    raise AttributeError(name)
