"""The built-in byte-level GPT, and loading a user's model from `package.module:factory`."""

from __future__ import annotations

import importlib
import math
from typing import Callable, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from mlx_train.config import FineTuneConfig, ModelConfig, ModelKind
from mlx_train.errors import UserError

LossFn = Callable[[nn.Module, mx.array, mx.array], mx.array]


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        B, T, D = x.shape
        q, k, v = mx.split(self.qkv(x), 3, axis=-1)
        q, k, v = (t.reshape(B, T, self.n_heads, -1).transpose(0, 2, 1, 3) for t in (q, k, v))
        scale = 1.0 / math.sqrt(D // self.n_heads)
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
        return self.proj(y.transpose(0, 2, 1, 3).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.attn(self.ln1(x))
        return x + self.out(nn.gelu(self.fc(self.ln2(x))))


def _checkpointed(block: Block, x: mx.array) -> mx.array:
    # The block's parameters are passed explicitly so that the recomputation in the backward pass
    # sees the same (possibly down-cast) weights the forward pass used.
    def run(params, h):
        block.update(params)
        return block(h)

    return mx.checkpoint(run)(block.trainable_parameters(), x)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = [Block(cfg.d_model, cfg.n_heads) for _ in range(cfg.n_layers)]
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.grad_checkpoint = False

    def __call__(self, idx: mx.array) -> mx.array:
        x = self.tok(idx) + self.pos(mx.arange(idx.shape[1]))
        for block in self.blocks:
            x = _checkpointed(block, x) if self.grad_checkpoint else block(x)
        return self.head(self.ln_f(x))


def lm_loss(model: nn.Module, inputs: mx.array, targets: mx.array) -> mx.array:
    logits = model(inputs).astype(mx.float32)
    return nn.losses.cross_entropy(logits, targets, reduction="mean")


def build_model(cfg: ModelConfig, grad_checkpoint: bool = False,
                fine_tune: Optional[FineTuneConfig] = None, lazy: bool = False) -> Tuple[nn.Module, LossFn]:
    """Return `(model, loss_fn)`; `loss_fn(model, inputs, targets)` gives a scalar mean loss.
    `lazy`: a pretrained model's weights are not read until evaluated (a pipeline stage's only)."""
    from mlx_train.rank import hf

    if cfg.kind is ModelKind.PRETRAINED:  # a model directory or hub id: mlx-lm builds it (rank/hf.py)
        return hf.build(cfg, fine_tune or FineTuneConfig(), grad_checkpoint, lazy)
    if fine_tune is not None and fine_tune.mode != "full":
        raise UserError(f"--fine-tune {fine_tune.mode} needs a pretrained model (--model DIR or a hub id); "
                        f"model {cfg.name} trains in full: drop --fine-tune")
    if cfg.kind is ModelKind.GPT:
        model, loss = GPT(cfg), lm_loss
    else:
        model, loss = load_factory(cfg.name)(cfg)
    if grad_checkpoint:
        if not hasattr(model, "grad_checkpoint"):
            raise UserError(f"model {cfg.name} has no 'grad_checkpoint' attribute: drop --grad-checkpoint "
                            "or add one (see docs/model_development.md)")
        model.grad_checkpoint = True
    return model, loss


def load_factory(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"cannot import model module {module_name!r} ({exc}): check --model and that the "
                        "package is installed on every host") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserError(f"{module_name} has no callable {attr!r}: --model takes package.module:factory")
    return factory


def count_parameters(model: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))
