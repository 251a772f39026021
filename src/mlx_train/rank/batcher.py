"""Deterministic sharded batching: (seed, step, micro-batch, rank) -> rows, for the byte corpora
(data.py) and the tokenized rows of pretrained models (token_data.py) alike."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator, List, Sequence, Tuple

import numpy as np

from mlx_train.config import DistributedConfig
from mlx_train.errors import UserError


def split_rows(global_batch: int, weights: Sequence[float]) -> List[int]:
    """Each rank's rows of a global batch, proportional to its weight: integers summing to
    `global_batch`, every rank at least one row, the rounding by largest remainder (ties to the lower
    rank). Exact arithmetic (Fractions), so every rank computes the same split."""
    n = len(weights)
    if global_batch < n:
        raise UserError(f"a global batch of {global_batch} rows cannot give each of {n} ranks a row: raise "
                        "--batch-size or --accumulation")
    exact = [Fraction(w) for w in weights]
    # One row each first, the rest by weight: no rank is left without work however small its weight.
    spare, total = global_batch - n, sum(exact)
    quotas = [spare * w / total for w in exact]
    rows = [1 + int(q) for q in quotas]
    by_remainder = sorted(range(n), key=lambda r: (-(quotas[r] - int(quotas[r])), r))
    for r in by_remainder[:global_batch - sum(rows)]:
        rows[r] += 1
    return rows


@dataclass(frozen=True)
class Share:
    """One rank's window of every global batch: positions [offset, offset + sum(micro)) of it, in
    micro-batches of the sizes in `micro` (at most the configured micro-batch each)."""

    offset: int
    micro: Tuple[int, ...]

    @property
    def rows(self) -> int:
        return sum(self.micro)


def share_of(rank: int, rows: Sequence[int], batch: int, count: int = 0) -> Share:
    """Rank `rank`'s window, its rows cut into the fewest micro-batches of at most `batch` rows, as
    even as can be (at most two sizes, so at most two traced shapes). `count`: at least that many
    micro-batches (`--shard full` runs collectives in every micro-batch, so every rank takes the same
    number, `micro_batch_count`); a rank with fewer rows than that ends with empty ones."""
    mine = rows[rank]
    count = max(count, -(-mine // batch))
    size, extra = divmod(mine, count)
    return Share(sum(rows[:rank]), tuple(size + 1 if m < extra else size for m in range(count)))


def micro_batch_count(rows: Sequence[int], batches: Sequence[int]) -> int:
    """The micro-batches every rank takes when all must take the same number: the most any rank's
    rows need at its micro-batch (`batches`, by rank)."""
    return max(-(-r // b) for r, b in zip(rows, batches))


class Batcher:
    """Maps (step, micro-batch, rank) to a disjoint slice of a per-epoch permutation of windows.

    Global batch `step` covers positions [step*G, (step+1)*G) of an endless sequence of epochs;
    micro-batch m of rank r takes positions m*N*B + r*B ... + B - 1 of it. The same positions are
    covered whatever N, B and accumulation are, so the data depends on the step alone: that is the
    whole "data position" a checkpoint needs, and it survives a change of the batch split.
    Unequal shares (--shares) give each rank a contiguous window (offset, count) of the step's
    global batch instead (`window`): the union over the ranks is the same positions.
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
        return self.ids_at(step, dist.global_batch_size, micro * N * B + rank * B, B)

    def ids_at(self, step: int, global_batch: int, offset: int, count: int) -> np.ndarray:
        """The windows at positions [offset, offset + count) of global batch `step`."""
        positions = np.arange(step * global_batch + offset, step * global_batch + offset + count)
        epochs, offsets = positions // self.n_windows, positions % self.n_windows
        return np.array([self._perm_for(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def rows_of(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of the windows `ids`."""
        idx = ids[:, None] * self.seq_len + np.arange(self.seq_len + 1)[None, :]
        chunk = self.tokens[idx].astype(np.int32)
        return chunk[:, :-1], chunk[:, 1:]

    def batch(self, step: int, micro: int, rank: int, dist: DistributedConfig) -> Tuple[np.ndarray, np.ndarray]:
        return self.rows_of(self.window_ids(step, micro, rank, dist))

    def tokens_in_step(self, step: int, dist: DistributedConfig) -> int:
        """Target tokens in global step `step` (every one is real in a byte corpus)."""
        return dist.global_batch_size * self.seq_len

    def micro_batches(self, step: int, rank: int, dist: DistributedConfig) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        for m in range(dist.gradient_accumulation):
            yield self.batch(step, m, rank, dist)

    def window(self, step: int, global_batch: int, share: Share) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """A rank's micro-batches under unequal shares: its window of global batch `step`, in order."""
        offset = share.offset
        for size in share.micro:
            yield self.rows_of(self.ids_at(step, global_batch, offset, size))
            offset += size
