"""Inside one rank: what runs in every training process, on every host.

Owns the worker entry point (`python -m mlx_train.rank.worker`), the training loop, the optimizer
step and gradient sync, the models, the data and its sharding, checkpoints, the BLAS choice, this
device's memory, and the pid records a rank leaves for `reset-distributed`.

May import: the shared contracts (`mlx_train.config`, `errors`, `protocol`, `units`) and MLX.
Never the controller, the fleet or planning: a rank learns everything from its arguments and
talks back only through protocol lines on stdout.
"""
