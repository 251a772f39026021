"""A short text sample from the embedded byte-level GPT at each evaluation, so a newcomer watching
`mlx-train monitor` sees what the model has learnt, not only a loss.

Rank 0 writes it after the validation pass. It draws with its own fixed key, never from MLX's global
random state, so the training stream (and bit-exact resumption) is untouched; the same key at every
evaluation makes the samples differ only by what the model learnt in between. Decoding keeps each
block's keys and values (one position per step instead of the whole text again), so a sample
costs about as much as one forward pass over it.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
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


def forward(model, tokens: mx.array, start: int, cache: list) -> mx.array:
    """The GPT's (model.py) logits for `tokens` at positions start.., given the keys and values of the
    positions before them in `cache` (one (k, v) per block, extended here)."""
    B, T = tokens.shape
    x = model.tok(tokens) + model.pos(mx.arange(start, start + T))
    for i, block in enumerate(model.blocks):
        attn, D = block.attn, x.shape[-1]
        q, k, v = mx.split(attn.qkv(block.ln1(x)), 3, axis=-1)
        q, k, v = (t.reshape(B, T, attn.n_heads, -1).transpose(0, 2, 1, 3) for t in (q, k, v))
        if cache[i] is not None:
            k, v = mx.concatenate([cache[i][0], k], axis=2), mx.concatenate([cache[i][1], v], axis=2)
        cache[i] = (k, v)
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(D // attn.n_heads),
                                                 mask="causal" if T > 1 else None)
        x = x + attn.proj(y.transpose(0, 2, 1, 3).reshape(B, T, D))
        x = x + block.out(nn.gelu(block.fc(block.ln2(x))))
    return model.head(model.ln_f(x))


def generate(model, prompt: np.ndarray, seq_len: int, seed: int, n: int = SAMPLE_BYTES) -> str:
    """The prompt and up to `n` bytes after it (as many as the model's `seq_len` positions allow),
    drawn at TEMPERATURE, as text."""
    n = max(0, min(n, seq_len - len(prompt)))
    keys = mx.random.split(mx.random.key(seed), max(n, 1))
    cache = [None] * len(model.blocks)
    tokens = [int(t) for t in prompt]
    logits = forward(model, mx.array([tokens], dtype=mx.int32), 0, cache)[0, -1]
    for i in range(n):
        nxt = int(mx.random.categorical(logits.astype(mx.float32) / TEMPERATURE, key=keys[i]).item())
        tokens.append(nxt)
        if i + 1 < n:
            logits = forward(model, mx.array([[nxt]], dtype=mx.int32), len(tokens) - 1, cache)[0, -1]
    return bytes(tokens).decode("utf-8", errors="replace")
