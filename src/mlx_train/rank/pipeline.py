"""A training pipeline: the model's layers split over S consecutive ranks, 1F1B over the step's
micro-batches (docs/pipeline.md).

Ranks are replica x S + stage: the stages of one replica are consecutive ranks, so each stage's
peers are its ring neighbours (the ring backend's send/recv reach no further). Stage s holds a
contiguous range of the layers (`stage_layers`), the first stage also the embeddings, the last the
final norm, the head and the loss: `GPTStage` for the built-in GPT, `LMStage` for mlx-lm's llama
family. A stage's parameters are its trainable ones, so under LoRA/DoRA only the adapters get
gradients and optimizer state and the gathered whole tree is one set of adapters.

MLX 0.32's send/recv have no gradient, so each stage differentiates only itself: a forward is
`mx.vjp` of the stage's function with its output's cotangent given as a `recv` from the next stage
that is not yet evaluated. Evaluating the output (to send it) runs the forward alone and keeps,
inside the unevaluated backward graph, exactly the activations that backward needs; evaluating the
gradients later runs the recv and the backward. A recv has no inputs to order it by, so every
transfer is evaluated on its own, in the schedule's order (each direction between two stages then
carries its messages in micro-batch order). Where a stage sends to and receives from the same peer
at one point of the schedule (1F1B's steady state), both go in one evaluation on two streams (ring:
a thread each, so neither waits on the other), or in an order by stage parity (other backends),
so two neighbours never both wait in a send.

After the micro-batches: with R > 1 replicas, a stage's gradients are summed over its replicas;
the global norm is the all_sum of the stages' sums of squares; AdamW updates this stage's
parameters only. The checkpoint layout is the whole model's, so a pipelined run resumes
unpipelined and the other way round; it moves piece by piece (`whole_pieces`, `load_pieces`: a
layer's parameters or one of its moments, one collective each), so no rank holds the whole model.

The Pipeline answers the Stepper's calls (rank/step.py), so the trainer drives either alike.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_train.errors import UserError
from mlx_train.rank import checkpoint
from mlx_train.rank.model import _checkpointed
from mlx_train.rank.spread import _assign, pack, unpack
from mlx_train.rank.step import StepStats

FORWARD, BACKWARD = "F", "B"


def stage_layers(n_layers: int, weights: Sequence[float]) -> List[range]:
    """Contiguous layer ranges, one per stage, in proportion to `weights` (e.g. each host's memory;
    equal weights, equal stages up to one layer), every stage at least one layer. Largest
    remainders get the layers left over, the earlier stage on a tie."""
    stages = len(weights)
    if stages < 1 or any(not (w > 0) for w in weights):
        raise ValueError(f"stage weights must be positive, got {list(weights)}")
    if n_layers < stages:
        raise UserError(f"{stages} pipeline stages need at least {stages} layers; the model has {n_layers}: "
                        "use fewer --pipeline-stages")
    # Each stage gets one layer, the rest go by weight: no stage is ever empty.
    spare = n_layers - stages
    ideal = [spare * w / sum(weights) for w in weights]
    counts = [1 + int(x) for x in ideal]
    order = sorted(range(stages), key=lambda s: (-(ideal[s] - int(ideal[s])), s))
    for s in order[:n_layers - sum(counts)]:
        counts[s] += 1
    bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def schedule(stage: int, stages: int, micro: int) -> List[Tuple[str, int]]:
    """Stage `stage`'s 1F1B order of forwards and backwards over `micro` micro-batches: S - 1 - s
    forwards to fill the pipeline, then one forward and one backward by turns, then the backwards
    left. Every stage holds at most S - s micro-batches' activations; the bubble is (S-1)/(M+S-1)."""
    warm = min(stages - 1 - stage, micro)
    ops = [(FORWARD, i) for i in range(warm)]
    for j in range(micro - warm):
        ops += [(FORWARD, warm + j), (BACKWARD, j)]
    return ops + [(BACKWARD, j) for j in range(micro - warm, micro)]


@dataclass(frozen=True)
class Placement:
    """Where this rank sits: its stage, its replica, and the ranks next to it in its pipeline."""

    stage: int
    stages: int
    replica: int
    replicas: int

    @classmethod
    def of(cls, rank: int, world: int, stages: int) -> "Placement":
        if world % stages:
            raise UserError(f"{world} devices do not split into {stages} pipeline stages: the devices are "
                            "stages x replicas")
        return cls(rank % stages, stages, rank // stages, world // stages)

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    @property
    def prev(self) -> int:
        return self.replica * self.stages + self.stage - 1

    @property
    def next(self) -> int:
        return self.replica * self.stages + self.stage + 1


class GPTStage:
    """The built-in GPT's part on one stage (rank/model.py): which parameters, and its function
    from (parameters, input) to the next stage's input, or, on the last stage, the loss."""

    LAYER = re.compile(r"blocks\.(\d+)\.(.*)")  # a block's flat key: its number, the rest

    @staticmethod
    def fits(model: nn.Module) -> bool:
        return all(hasattr(model, a) for a in ("tok", "pos", "blocks", "ln_f", "head"))

    @staticmethod
    def count(model: nn.Module) -> int:
        return len(model.blocks)

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool):
        self.model, self.layers, self.first, self.last = model, layers, first, last
        self.width = model.tok.weight.shape[1]

    def params(self) -> dict:
        m, tree = self.model, {}
        if self.first:
            tree.update(tok=m.tok.trainable_parameters(), pos=m.pos.trainable_parameters())
        tree["blocks"] = [m.blocks[i].trainable_parameters() for i in self.layers]
        if self.last:
            tree.update(ln_f=m.ln_f.trainable_parameters(), head=m.head.trainable_parameters())
        return tree

    def whole_key(self, key: str) -> str:
        """A stage tree's flat key as the whole model names it (its blocks are numbered from 0)."""
        found = self.LAYER.match(key)
        return f"blocks.{self.layers[int(found.group(1))]}.{found.group(2)}" if found else key

    def drop_others(self) -> None:
        """Free the weights of the layers other stages hold (every rank built the whole model from
        one seed, so the stages start from the one-process model's weights)."""
        m, empty = self.model, lambda p: mx.zeros((0,), p.dtype)
        others = [b for i, b in enumerate(m.blocks) if i not in self.layers]
        others += ([] if self.first else [m.tok, m.pos]) + ([] if self.last else [m.ln_f, m.head])
        for module in others:
            module.update(tree_map(empty, module.parameters()))

    def __call__(self, params: dict, x: mx.array, targets: Optional[mx.array], scale: Optional[mx.array]) -> mx.array:
        m = self.model
        if self.first:
            m.tok.update(params["tok"])
            m.pos.update(params["pos"])
            x = m.tok(x) + m.pos(mx.arange(x.shape[1]))
        # --grad-checkpoint: as GPT.__call__ does, each block recomputes its activations in the
        # backward, so a forward in flight keeps only the blocks' inputs, not their insides.
        checkpointed = getattr(m, "grad_checkpoint", False)
        for i, block_params in zip(self.layers, params["blocks"]):
            m.blocks[i].update(block_params)
            x = _checkpointed(m.blocks[i], x) if checkpointed else m.blocks[i](x)
        if not self.last:
            return x
        m.ln_f.update(params["ln_f"])
        m.head.update(params["head"])
        logits = m.head(m.ln_f(x)).astype(mx.float32)
        return nn.losses.cross_entropy(logits, targets, reduction="mean") * scale  # rank/model.py's lm_loss


# mlx-lm families whose model is embed_tokens -> layers(h, mask) -> norm -> lm_head (or the tied
# embeddings), nothing else in between (read in mlx-lm 0.32: gemma scales its embeddings, others
# add what this stage would silently skip, so they are refused, not guessed at).
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


class LMStage:
    """An mlx-lm llama-family model's part on one stage (rank/hf.py loads it): the embeddings on
    the first, its layers under the causal mask, the final norm, the head and the masked loss
    (hf.masked_lm_loss's) on the last. Its parameters are the trainable ones only: with LoRA/DoRA
    the adapters, the frozen (possibly quantized) base a constant of the stage's function."""

    LAYER = re.compile(r"model\.layers\.(\d+)\.(.*)")

    @staticmethod
    def fits(model: nn.Module) -> bool:
        inner = getattr(model, "model", None)
        return all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")) \
            and getattr(getattr(model, "args", None), "model_type", None) in LLAMA_LIKE

    @staticmethod
    def count(model: nn.Module) -> int:
        return len(model.model.layers)

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool):
        self.model, self.layers, self.first, self.last = model, layers, first, last
        self.width = model.args.hidden_size  # (a quantized embedding's weight is packed: not its shape)
        self.tied = getattr(model.args, "tie_word_embeddings", False) or not hasattr(model, "lm_head")
        if self.tied and first != last and model.model.embed_tokens.trainable_parameters():
            raise UserError("--pipeline-stages with tied embeddings trains them on the first and the last stage "
                            "at once, which is not done yet: fine-tune with --fine-tune lora (the embeddings "
                            "stay frozen) or without --pipeline-stages (docs/pipeline.md)")

    def params(self) -> dict:
        m, inner = self.model, self.model.model
        tree: dict = {"layers": [inner.layers[i].trainable_parameters() for i in self.layers]}
        if self.first:
            tree["embed_tokens"] = inner.embed_tokens.trainable_parameters()
        if self.last:
            tree["norm"] = inner.norm.trainable_parameters()
        tree = {"model": tree}
        if self.last and not self.tied:
            tree["lm_head"] = m.lm_head.trainable_parameters()
        return tree

    def whole_key(self, key: str) -> str:
        found = self.LAYER.match(key)
        return f"model.layers.{self.layers[int(found.group(1))]}.{found.group(2)}" if found else key

    def drop_others(self) -> None:
        m, inner, empty = self.model, self.model.model, lambda p: mx.zeros((0,), p.dtype)
        others = [b for i, b in enumerate(inner.layers) if i not in self.layers]
        if not self.first and not (self.last and self.tied):
            others.append(inner.embed_tokens)
        if not self.last:
            others += [inner.norm] + ([] if self.tied else [m.lm_head])
        for module in others:
            module.update(tree_map(empty, module.parameters()))

    def __call__(self, params: dict, x: mx.array, targets: Optional[mx.array], scale: Optional[mx.array]) -> mx.array:
        from mlx_lm.models.base import create_attention_mask

        m, inner, mine = self.model, self.model.model, params.get("model", {})
        if self.first:
            inner.embed_tokens.update(mine.get("embed_tokens", {}))
            x = inner.embed_tokens(x)
        # A stage's trainable tree drops layers with nothing to train (--lora-layers): {} for them.
        layer_params = mine.get("layers", [])
        window = getattr(inner, "sliding_window", None)
        for j, i in enumerate(self.layers):
            layer = inner.layers[i]
            layer.update(layer_params[j] if j < len(layer_params) else {})
            mask = create_attention_mask(x, None, window_size=window if getattr(layer, "use_sliding", False) else None)
            x = layer(x, mask, None)
        if not self.last:
            return x
        inner.norm.update(mine.get("norm", {}))
        x = inner.norm(x)
        if self.tied:
            logits = inner.embed_tokens.as_linear(x)
        else:
            m.lm_head.update(params.get("lm_head", {}))
            logits = m.lm_head(x)
        logits, real = logits.astype(mx.float32), targets >= 0
        ce = nn.losses.cross_entropy(logits, mx.maximum(targets, 0)) * real
        return ce.sum() / mx.maximum(real.sum(), 1) * scale


def load_only(part) -> None:
    """Read this stage's weights, and only them: the other stages' layers are dropped while still
    unevaluated, so a lazily loaded base (hf.load_model lazy=True: MLX reads a safetensors tensor
    when it is first evaluated) never has its other layers read, and a model built from a seed
    (the GPT: MLX draws its initial weights lazily, the keys split at construction) never draws
    them. A stage's peak is then its own layers' bytes, not the whole model's (tests/test_pipeline_load.py)."""
    part.drop_others()
    mx.eval(part.model.parameters())


def stage_kind(model: nn.Module):
    """The stage class for `model`: the built-in GPT, or an mlx-lm llama-family model."""
    for kind in (GPTStage, LMStage):
        if kind.fits(model):
            return kind
    name = getattr(getattr(model, "args", None), "model_type", type(model).__name__)
    raise UserError(f"--pipeline-stages runs the built-in GPT and mlx-lm's {', '.join(LLAMA_LIKE)} models; "
                    f"model {name!r} is none of them: drop --pipeline-stages (docs/pipeline.md)")


class Pipeline:
    """One rank's stage of a pipelined step; answers the Stepper's calls (rank/step.py).

    `spread` is this object itself: what the trainer reads of a Stepper's spread (the bytes it
    moves; collective_backward: the model runs only with every stage, so no sampling alone)."""

    collective_backward = True
    scattered_bytes = 0

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, precision: str, grad_clip: float,
                 group: mx.distributed.Group, stages: int, weights: Optional[Sequence[float]] = None,
                 backend: Optional[str] = None):
        self.model, self.optimizer, self.grad_clip, self.group = model, optimizer, grad_clip, group
        self.world = group.size()
        self.at = Placement.of(group.rank(), self.world, stages)
        kind = stage_kind(model)
        self.layers = stage_layers(kind.count(model), weights or [1.0] * stages)
        self.part = kind(model, self.layers[self.at.stage], self.at.first, self.at.last)
        self.compute_dtype = mx.bfloat16 if precision == "bf16" else mx.float32
        self.duplex = backend == "ring"
        self.spread = self
        # The whole model's layout, in its own key order (checkpoints, norms in tree order).
        whole = tree_flatten(model.trainable_parameters())
        self.whole_keys = [k for k, _ in whole]
        self.whole_shapes = {k: (v.shape, v.dtype) for k, v in whole}
        self.params = self.part.params()
        self.keys = [k for k, _ in tree_flatten(self.params)]
        if not self.keys:
            raise UserError(f"pipeline stage {self.at.stage} (layers {self.layers[self.at.stage].start}-"
                            f"{self.layers[self.at.stage].stop - 1}) has nothing to train: --lora-layers adapts too "
                            "few of the last blocks for every stage to hold one; raise it or use fewer --pipeline-stages")
        self.mine = {self.part.whole_key(k) for k in self.keys}
        self.groups = self._piece_groups(kind, model)
        load_only(self.part)
        optimizer.init(self.params)
        itemsize = {k: mx.zeros((1,), d).itemsize for k, (_, d) in self.whole_shapes.items()}
        whole_bytes = sum(int(np.prod(s)) * itemsize[k] for k, (s, _) in self.whole_shapes.items())
        # A replicas' sum is one all_sum of the whole model's buffer (a checkpoint's, one per piece).
        self.gathered_bytes = whole_bytes if self.at.replicas > 1 else 0
        self._comm_s = 0.0
        self._streams = (mx.new_thread_local_stream(mx.cpu), mx.new_thread_local_stream(mx.cpu)) \
            if self.duplex else (None, None)

    # -- the Stepper's calls ----------------------------------------------------------------------
    def whole_params(self) -> Any:
        return self._gather_whole(self.params, [""])

    def param_layout(self) -> Any:
        return tree_unflatten([(k, mx.zeros(*self.whole_shapes[k])) for k in self.whole_keys])

    def optimizer_state(self) -> dict:
        return {**self._gather_whole(self._moments(), [f".{n}" for n in self._names()]), **self._scalars()}

    def optimizer_layout(self) -> dict:
        names = self._names()
        flat = [(f"{k}.{n}", mx.zeros(*self.whole_shapes[k])) for k in self.whole_keys for n in names]
        return {**tree_unflatten(flat), **self._scalars()}

    def load(self, params: Any, optimizer_state: dict) -> None:
        """Whole parameters and optimizer state (the unsharded layout): this stage keeps its part."""
        self._take({**dict(tree_flatten(params)), **dict(tree_flatten(optimizer_state))},
                   {k: v for k, v in optimizer_state.items() if k in ("step", "learning_rate")})

    def whole_pieces(self) -> Iterator[Tuple[List[tuple], List[tuple]]]:
        """The checkpoint piece by piece (rank/spread.py): for each group of `groups` (a layer, or
        a stage's embeddings or its norm and head), its parameters, then each of its moments; last,
        step and learning_rate. Each piece is one all_sum of that piece's bytes, to which the rank
        of replica 0 holding it contributes and every other rank -0.0 (x + -0.0 is x, bit for bit):
        every rank, the writers (rank 0, the mirror) among them, takes part in each in this order
        and holds one piece beside its stage, never the whole model."""
        first = self.at.replica == 0
        params = {self.part.whole_key(k): v for k, v in tree_flatten(self.params)} if first else {}
        moments = {self.part.whole_key(k): v for k, v in tree_flatten(self._moments())} if first else {}
        for stage, keys in self.groups:
            mine = first and stage == self.at.stage
            pairs = self._gather_piece(keys, "", params, mine)
            yield pairs, []
            del pairs  # the generator's own reference would keep the piece alive through the next gather
            for name in self._names():
                pairs = self._gather_piece(keys, f".{name}", moments, mine)
                yield [], pairs
                del pairs
        yield [], list(self._scalars().items())

    def piece_keys(self) -> list:
        """What whole_pieces gives, piece after piece: per group, its parameters, then each moment."""
        sfxs = [""] + [f".{n}" for n in self._names()]
        return [[f"{k}{sfx}" for k in keys] for _, keys in self.groups for sfx in sfxs]

    def load_pieces(self, pieces, extra: dict) -> None:
        """Each piece evaluated as it comes (every rank takes part in its broadcast) and kept only
        by the stage that holds it: a stage holds its own layers and one piece, never the model."""
        got: dict = {}
        it = iter(pieces)  # not zip or enumerate: their reused tuple would hold the previous piece
        for stage, _ in self.groups:
            for _ in range(1 + len(self._names())):
                piece = next(it)
                mx.eval(list(piece.values()))
                if stage == self.at.stage:
                    got.update(piece)
                del piece
        self._take(got, extra)

    def owned_checksum(self) -> int:
        """The whole parameters' crc32 (keys sorted: the save's checksum) with none gathered: each
        rank takes its own leaves' crcs, one all_gather of those (two ints a leaf), and each rank
        combines its own replica's stages' (checkpoint.combined_crc), so replicas are compared."""
        flat = {self.part.whole_key(k): v for k, v in tree_flatten(self.params)}
        mine = [checkpoint.leaf_crc(flat[k]) if k in flat else (0, 0) for k in self.whole_keys]
        rows = mx.array(mine, dtype=mx.int64)
        if self.world > 1:
            rows = mx.distributed.all_gather(rows, group=self.group)
        rows = np.array(rows).reshape(self.world, len(self.whole_keys), 2)
        at = {k: i for i, k in enumerate(self.whole_keys)}
        stage_of = {k: s for s, keys in self.groups for k in keys}
        base = self.at.replica * self.at.stages
        return checkpoint.combined_crc((int(rows[base + stage_of[k], at[k], 0]), int(rows[base + stage_of[k], at[k], 1]))
                                       for k in sorted(self.whole_keys))

    def set_params(self, params: Any) -> None:
        _assign(self.params, params)

    def step(self, micro_batches: Iterable[Tuple[Any, Any]], loss_limit: Optional[float] = None,
             tokens: Optional[Tuple[List[int], int]] = None) -> StepStats:
        """One optimizer step over this replica's micro-batches (every stage of it is given the
        same ones); the loss reported is the global batch's, the same on every rank."""
        t0 = time.perf_counter()
        batches = [(mx.array(x), mx.array(y)) for x, y in micro_batches]
        if tokens is None:
            shares, whole = [1.0 / (len(batches) * self.at.replicas)] * len(batches), float(self.at.replicas)
        else:
            counts, total = tokens
            shares, whole = [c / total for c in counts], total / max(sum(counts), 1)
        self._comm_s = 0.0
        grads, loss = self._run(batches, shares)
        idle = self._comm_s  # so far only the schedule's own transfers: the stage's waits in it
        if self.at.replicas > 1:
            t = time.perf_counter()
            grads = self._replicas_sum(grads)
            self._comm_s += time.perf_counter() - t
        # One all_sum: the norm's sums of squares (each stage's once: replica 0's) and the loss (the
        # last stages', each a replica's share of the global mean). A last stage whose replica's
        # loss is not finite, or over --loss-spike's limit, makes the norm non-finite everywhere,
        # so every rank skips the update alike.
        squares = sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads))
        squares = squares if self.at.replica == 0 else mx.array(0.0)
        if self.at.last:
            mean = loss * whole
            bad = mx.logical_not(mx.isfinite(mean)) if loss_limit is None \
                else mx.logical_or(mx.logical_not(mx.isfinite(mean)), mean > loss_limit)
            squares = squares + mx.where(bad, float("nan"), 0.0)
        t = time.perf_counter()
        both = mx.distributed.all_sum(mx.stack([squares, loss if self.at.last else mx.array(0.0)]), group=self.group)
        mx.eval(both)
        self._comm_s += time.perf_counter() - t
        norm, loss = mx.sqrt(both[0]), both[1]
        skipped = not bool(mx.isfinite(norm).item())
        if skipped:
            self.optimizer.state["step"] = self.optimizer.step + 1
        else:
            factor = mx.minimum(self.grad_clip / (norm + 1e-6), 1.0) if self.grad_clip > 0 else None
            if factor is not None:
                grads = tree_map(lambda g: g * factor.astype(g.dtype), grads)
            _assign(self.params, self.optimizer.apply_gradients(grads, self.params))
        mx.eval(self.params, self.optimizer.state)
        total_s = time.perf_counter() - t0
        return StepStats(float(loss.item()), float(norm.item()), total_s - self._comm_s, self._comm_s, skipped,
                         idle_s=idle)

    def evaluate(self, batches: Iterable[Tuple[Any, Any]]) -> mx.array:
        """The replica's mean loss over `batches` (every stage given the same ones), forward only,
        on every rank of the replica: the last stage's, passed back down the stages."""
        total, n = mx.array(0.0), 0
        cast = self._cast(self.params)
        for x, y in batches:
            x, y = mx.array(x), mx.array(y)
            h = x if self.at.first else self._recv(self._act_shape(x), self.at.prev)
            if not self.at.first:
                self._eval(h)
            out = self._boundary(self.part(cast, h, y, mx.array(1.0)))
            if self.at.last:
                total = total + out
            else:
                self._eval(self._send(out, self.at.next))
            n += 1
        mx.eval(total)
        # The loss goes back down the stages, one hop a time, as the activations came up.
        if not self.at.last:
            total = self._recv((), self.at.next, mx.float32)
            self._eval(total)
        if not self.at.first:
            self._eval(self._send(total, self.at.prev))
        return total / max(n, 1)

    # -- the schedule -----------------------------------------------------------------------------
    def _run(self, batches: List[Tuple[mx.array, mx.array]], shares: List[float]) -> Tuple[Any, mx.array]:
        at = self.at
        ops = schedule(at.stage, at.stages, len(batches))
        inputs: Dict[int, mx.array] = {}   # received activations, by micro-batch
        pending: Dict[int, tuple] = {}     # a forward's (cotangent recv, parameter grads, input grads)
        acc, loss = None, mx.array(0.0)
        leaves = [v for _, v in tree_flatten(self.params)]
        n_leaves = len(leaves)
        for n, (kind, i) in enumerate(ops):
            following = ops[n + 1] if n + 1 < len(ops) else None
            x, y = batches[i]
            if kind == FORWARD:
                if not at.first and i not in inputs:
                    inputs[i] = self._recv(self._act_shape(x), at.prev)
                    self._eval(inputs[i])
                h = x if at.first else inputs.pop(i)
                cot = mx.array(1.0) if at.last else self._recv(self._act_shape(x), at.next)

                # vjp takes arrays, not trees: the parameters' leaves, then the input. Differentiated
                # through the cast (bf16), the gradients come back in fp32, as the Stepper's.
                def fun(*args, _x=x, _y=y, _s=mx.array(shares[i])):
                    p = tree_unflatten(list(zip(self.keys, args[:n_leaves])))
                    return [self._boundary(self.part(self._cast(p), _x if at.first else args[-1], _y, _s))]

                primals = leaves if at.first else [*leaves, h]
                outs, vjps = mx.vjp(fun, primals, [cot])
                grads = (tree_unflatten(list(zip(self.keys, vjps[:n_leaves]))), *vjps[n_leaves:])
                if at.last:
                    loss = loss + outs[0]
                    pending[i] = (None, grads)
                    continue
                mx.eval(outs)  # the forward alone: the backward's graph keeps its activations
                pending[i] = (cot, grads)  # before the pair below: with M <= S - 1 - s it is this one's
                sent = self._send(outs[0], at.next)
                if following is not None and following[0] == BACKWARD:
                    self._eval(sent, pending[following[1]][0])  # that backward's cotangent, at once
                else:
                    self._eval(sent)
            else:
                cot, grads = pending.pop(i)
                if cot is not None:
                    self._eval(cot)  # at once if the pair above received it already
                dparams = grads[0]
                acc = dparams if acc is None else tree_map(mx.add, acc, dparams)
                mx.eval(acc, loss, grads[1:])
                if at.first:
                    continue
                sent = self._send(grads[1], at.prev)
                if following is not None and following[0] == FORWARD:
                    nxt = following[1]
                    inputs[nxt] = self._recv(self._act_shape(batches[nxt][0]), at.prev)
                    self._eval(sent, inputs[nxt])
                else:
                    self._eval(sent)
        return acc, loss

    # -- transfers: each its own evaluation -------------------------------------------------------
    def _send(self, x: mx.array, dst: int) -> mx.array:
        return mx.distributed.send(x, dst, group=self.group, stream=self._streams[0])

    def _recv(self, shape: tuple, src: int, dtype: Optional[mx.Dtype] = None) -> mx.array:
        return mx.distributed.recv(shape, dtype or self.compute_dtype, src, group=self.group, stream=self._streams[1])

    def _eval(self, *transfers: mx.array) -> None:
        """Transfers with one peer evaluated together: at once on two streams (ring), or the even
        stage sending first and the odd one receiving first (a backend with no threads for them)."""
        t = time.perf_counter()
        if self.duplex or len(transfers) == 1:
            mx.eval(*transfers)
        else:
            for a in (transfers if self.at.stage % 2 == 0 else transfers[::-1]):
                mx.eval(a)
        self._comm_s += time.perf_counter() - t

    def _boundary(self, out: mx.array) -> mx.array:
        """A stage's output as it crosses to the next: in the compute dtype, which the next stage's
        recv expects (a frozen bf16 or quantized base may hand on another dtype than its adapters'
        mixed result would; one dtype on the wire keeps both sides' shapes known in advance)."""
        return out if self.at.last else out.astype(self.compute_dtype)

    def _act_shape(self, x: mx.array) -> tuple:
        return (*x.shape[:2], self.part.width)

    def _cast(self, params: Any) -> Any:
        if self.compute_dtype == mx.float32:
            return params
        return tree_map(lambda p: p.astype(self.compute_dtype) if mx.issubdtype(p.dtype, mx.floating) else p, params)

    # -- the replicas' sum and the whole model (collectives over every rank) ----------------------
    def _whole_buffer(self, flat_mine: Dict[str, mx.array], suffixes: Sequence[str],
                      mine: bool) -> Tuple[mx.array, list]:
        """The whole model's flat buffer (its key order, each key with `suffixes`), this stage's
        entries from `flat_mine` where `mine`, -0.0 elsewhere (x + -0.0 is x, bit for bit)."""
        parts, names = [], []
        for k in self.whole_keys:
            shape, dtype = self.whole_shapes[k]
            for sfx in suffixes:
                name = f"{k}{sfx}"
                names.append((name, shape))
                value = flat_mine.get(name) if mine and k in self.mine else None
                parts.append(value.astype(mx.float32) if value is not None else mx.full(shape, -0.0, mx.float32))
        return pack(parts), names

    def _gather_whole(self, tree: Any, suffixes: Sequence[str]) -> Any:
        """Every stage's part of `tree` (the parameters, or with `suffixes` .m and .v AdamW's moments)
        as one whole tree, replica 0's copy: a collective, every rank calls it."""
        flat = {self.part.whole_key(k): v for k, v in tree_flatten(tree)}
        buffer, layout = self._whole_buffer(flat, suffixes, self.at.replica == 0)
        summed = mx.distributed.all_sum(buffer, group=self.group)
        like = [mx.zeros(s, mx.float32) for _, s in layout]
        out = unpack(summed, like)
        dtypes = {f"{k}{sfx}": self.whole_shapes[k][1] for k in self.whole_keys for sfx in suffixes}
        whole = [(name, v.astype(dtypes[name])) for (name, _), v in zip(layout, out)]
        mx.eval([v for _, v in whole])  # here, on every rank: a gather left lazy would wait forever
        return tree_unflatten(whole)

    def _gather_piece(self, keys: Sequence[str], sfx: str, flat: Dict[str, mx.array],
                      mine: bool) -> List[Tuple[str, mx.array]]:
        """One piece of the whole model (`keys`, each with `sfx`): one all_sum of its fp32 buffer,
        `flat`'s values where `mine`, -0.0 elsewhere; evaluated here, on every rank (a gather left
        lazy would wait forever)."""
        parts = [flat[f"{k}{sfx}"].astype(mx.float32) if mine else mx.full(self.whole_shapes[k][0], -0.0, mx.float32)
                 for k in keys]
        summed = mx.distributed.all_sum(pack(parts), group=self.group)
        pairs = [(f"{k}{sfx}", v.astype(self.whole_shapes[k][1])) for k, v in zip(keys, unpack(summed, parts))]
        del parts, summed
        mx.eval([v for _, v in pairs])
        return pairs

    def _piece_groups(self, kind, model: nn.Module) -> List[Tuple[int, List[str]]]:
        """The checkpoint's pieces: (the stage holding it, its whole-model keys in the model's
        order) for each layer, and for each stage's other parameters (the embeddings on the first,
        the final norm and head on the last). Every rank knows every stage's keys (its model has
        every module; only the other stages' weights are dropped)."""
        owner: Dict[str, Tuple[int, int]] = {}
        for s, layers in enumerate(self.layers):
            part = self.part if s == self.at.stage else kind(model, layers, s == 0, s == self.at.stages - 1)
            for k, _ in tree_flatten(part.params()):
                whole = part.whole_key(k)
                found = kind.LAYER.match(whole)
                owner[whole] = (s, int(found.group(1)) if found else -1)
        if set(owner) != set(self.whole_keys):
            raise RuntimeError(f"pipeline stages hold {sorted(set(owner) ^ set(self.whole_keys))[:5]} "
                               "not as the whole model does")
        groups: Dict[Tuple[int, int], List[str]] = {}
        for k in self.whole_keys:
            groups.setdefault(owner[k], []).append(k)
        return [(s, keys) for (s, _), keys in groups.items()]

    def _take(self, flat: Dict[str, mx.array], scalars: dict) -> None:
        """This stage's parameters and moments out of `flat` (whole-model keys), and `scalars`."""
        mine = tree_unflatten([(k, flat[self.part.whole_key(k)]) for k in self.keys])
        _assign(self.params, mine)
        moments = [(f"{k}.{n}", flat[f"{self.part.whole_key(k)}.{n}"]) for k in self.keys for n in self._names()]
        self.optimizer.state = {**tree_unflatten(moments), **scalars}
        mx.eval(self.params, self.optimizer.state)

    def _replicas_sum(self, grads: Any) -> Any:
        """This stage's gradients summed over the replicas of the stage. The ring backend has no
        sub-groups (Group.split), so it is one all_sum over every rank of the whole model's buffer
        in which each rank fills its stage's part: S times the stage's bytes on the wire."""
        flat = {self.part.whole_key(k): v for k, v in tree_flatten(grads)}
        buffer, layout = self._whole_buffer(flat, [""], True)
        out = dict(zip((n for n, _ in layout), unpack(mx.distributed.all_sum(buffer, group=self.group),
                                                       [mx.zeros(s, mx.float32) for _, s in layout])))
        summed = tree_unflatten([(k, out[self.part.whole_key(k)].astype(v.dtype)) for k, v in tree_flatten(grads)])
        mx.eval(summed)
        return summed

    def _moments(self) -> dict:
        return {k: v for k, v in self.optimizer.state.items() if k not in ("step", "learning_rate")}

    def _scalars(self) -> dict:
        return {k: v for k, v in self.optimizer.state.items() if k in ("step", "learning_rate")}

    def _names(self) -> List[str]:
        """The optimizer's per-parameter state entries (AdamW: m, v)."""
        first = self.keys[0]
        node = self.optimizer.state
        for part in first.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        return sorted(node)
