"""A short text sample from the embedded byte-level GPT at each evaluation, so a newcomer watching
`mlx-train monitor` sees what the model has learnt, not only a loss.

Rank 0 writes it after the validation pass. It draws with its own fixed key, never from MLX's global
random state, so the training stream (and bit-exact resumption) is untouched; the same key at every
evaluation makes the samples differ only by what the model learnt in between.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

PROMPT_BYTES = 24
SAMPLE_BYTES = 60
TEMPERATURE = 0.8


def prompt_from(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """A fixed prompt from the data: the start of the first full line of the validation split."""
    n = max(1, min(PROMPT_BYTES, seq_len // 2))
    head = bytes(tokens[:4096].astype(np.uint8))
    start = head.find(b"\n") + 1
    while start < len(head) and head[start:start + 1] in b"\r\n":
        start += 1
    if start <= 0 or start + n > len(head):
        start = 0
    return np.asarray(tokens[start:start + n], dtype=np.int64)


def generate(model, prompt: np.ndarray, seq_len: int, seed: int, n: int = SAMPLE_BYTES) -> str:
    """`n` bytes after `prompt`, drawn at TEMPERATURE; the context slides to the last `seq_len` bytes."""
    keys = mx.random.split(mx.random.key(seed), n)
    tokens = [int(t) for t in prompt]
    for i in range(n):
        x = mx.array([tokens[-seq_len:]], dtype=mx.int32)
        logits = model(x)[0, -1].astype(mx.float32)
        tokens.append(int(mx.random.categorical(logits / TEMPERATURE, key=keys[i]).item()))
    return bytes(tokens).decode("utf-8", errors="replace")
