"""Deterministic sharded batching: (seed, step, micro-batch, rank) -> rows, for the byte corpora
(data.py) and the tokenized rows of pretrained models (token_data.py) alike."""

from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np

from mlx_train.config import DistributedConfig
from mlx_train.errors import UserError


class Batcher:
    """Maps (step, micro-batch, rank) to a disjoint slice of a per-epoch permutation of windows.

    Global batch `step` covers positions [step*G, (step+1)*G) of an endless sequence of epochs;
    micro-batch m of rank r takes positions m*N*B + r*B ... + B - 1 of it. The same positions are
    covered whatever N, B and accumulation are, so the data depends on the step alone: that is the
    whole "data position" a checkpoint needs, and it survives a change of the batch split.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, split: str = "train"):
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.n_windows = (len(tokens) - 1) // seq_len
        self.split = split
        self._perm_epoch, self._perm = -1, None

    def require(self, n: int, what: str) -> None:
        if self.n_windows < n:
            raise UserError(
                f"the {self.split} data has {self.n_windows} sequences of {self.seq_len} tokens, fewer than "
                f"{what} ({n}): lower --batch-size, --accumulation or --seq-len, or use more data")

    def _perm_for(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def window_ids(self, step: int, micro: int, rank: int, dist: DistributedConfig) -> np.ndarray:
        B, N = dist.batch_size_per_device, dist.num_devices
        start = step * dist.global_batch_size + micro * N * B + rank * B
        positions = np.arange(start, start + B)
        epochs, offsets = positions // self.n_windows, positions % self.n_windows
        return np.array([self._perm_for(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def batch(self, step: int, micro: int, rank: int, dist: DistributedConfig) -> Tuple[np.ndarray, np.ndarray]:
        ids = self.window_ids(step, micro, rank, dist)
        idx = ids[:, None] * self.seq_len + np.arange(self.seq_len + 1)[None, :]
        chunk = self.tokens[idx].astype(np.int32)
        return chunk[:, :-1], chunk[:, 1:]

    def tokens_in_step(self, step: int, dist: DistributedConfig) -> int:
        """Target tokens in global step `step` (every one is real in a byte corpus)."""
        return dist.global_batch_size * self.seq_len

    def micro_batches(self, step: int, rank: int, dist: DistributedConfig) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        for m in range(dist.gradient_accumulation):
            yield self.batch(step, m, rank, dist)
