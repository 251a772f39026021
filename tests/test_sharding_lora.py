"""`--shard full` under LoRA, DoRA and QLoRA (rank/fullshard.py): the frozen base is held in slices
too and gathered a block at a time, the adapters train as at `full` for a full fine-tune.

One launch of 2 ring ranks on loopback. Each rank runs mlx-lm's own llama (tiny, offline) with
adapters, unsharded and at `full`, from the same seed and data, and reports per case: the losses
(within 1e-5 relative of the unsharded run's), the adapters it writes in mlx-lm's layout
(hf.write_adapters, as the trainer does: the same files and keys, close values), and what it
holds between steps (the MLX memory in use after a step, less what was in use before the model
was built): the base in halves, the slices' bytes against the base's. The gather's choice of
reduce-scatter (the backend's sum_scatter on NCCL/JACCL, a ring of send/recv on ring and MPI, else
an all_sum) is checked by name; the ring's runs in the training above, sum_scatter never here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import run_ring_ranks

TIMEOUT = 240  # seconds for the launch: a hung collective fails the test, never waits forever
STEPS = 3
ROWS, SEQ = 2, 16  # sequences per rank per step, tokens per sequence
# tests/tiny_llama.py's shape with the byte vocabulary (no tokenizer to train): mlx-lm's llama.
LLAMA = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0, vocab_size=256)
# (name, fine-tune mode, quantized base, --lora-layers, gradient clip): DoRA adapts one block of
# two, so one block has only a frozen base to gather; its small clip acts on every step.
CASES = [("lora", "lora", False, -1, 0.0), ("dora", "dora", False, 1, 0.05), ("qlora", "lora", True, -1, 0.0)]


# -- what each rank runs -------------------------------------------------------------------------

def _run(level: str, mode: str, quantized: bool, layers: int, clip: float, group, out: Path) -> dict:
    import gc

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from mlx_train.config import FineTuneConfig, OptimConfig
    from mlx_train.rank import hf
    from mlx_train.rank.step import Stepper, make_optimizer

    n, r = group.size(), group.rank()
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(LLAMA))
    if quantized:  # as mlx_lm.convert quantizes (tests/tiny_llama.quantize_model_dir)
        nn.quantize(model, group_size=32, bits=4)
    ft = FineTuneConfig(mode=mode, lora_layers=layers)
    hf.apply_fine_tune(model, ft, "tiny llama")
    mx.eval(model.parameters())
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    base_bytes = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if k not in trainable)
    stepper = Stepper(model, hf.masked_lm_loss, make_optimizer(OptimConfig(warmup_steps=1), STEPS), "fp32", clip,
                      group, shard=level, backend="ring")
    losses, norms = [], []
    for step in range(STEPS):
        tokens = np.random.default_rng(step).integers(0, 256, (n * ROWS, SEQ + 1)).astype(np.int32)
        mine = tokens[r * ROWS:(r + 1) * ROWS]
        stats = stepper.step([(mine[:, :-1], mine[:, 1:])])
        losses.append(stats.loss)
        norms.append(stats.grad_norm)
    gc.collect()
    held = mx.get_active_memory() - before  # the model, the slices, AdamW's state: between steps
    where = out / f"adapters-{mode}{'-q' if quantized else ''}-{level}-{r}"
    hf.write_adapters(where, stepper.whole_params(), hf.adapter_config("tiny llama", ft, len(model.layers)))
    spread = stepper.spread
    return {"losses": losses, "norms": norms, "held": held, "base_bytes": base_bytes, "adapters": str(where),
            "frozen_held": getattr(spread, "frozen_held_bytes", base_bytes),
            "scatter": getattr(spread, "scatter", None)}


def rank_main(out_dir: str) -> None:
    import mlx.core as mx

    group = mx.distributed.init(backend="ring", strict=True)
    out = Path(out_dir)
    results = {name: {level: _run(level, mode, q, layers, clip, group, out) for level in ("none", "full")}
               for name, mode, q, layers, clip in CASES}
    (out / f"report-{group.rank()}.json").write_text(json.dumps({"rank": group.rank(), "results": results}))


# -- the launch ----------------------------------------------------------------------------------

def _same_adapters(mine: Path, theirs: Path) -> None:
    import mlx.core as mx

    assert sorted(p.name for p in mine.iterdir()) == sorted(p.name for p in theirs.iterdir())
    assert json.loads((mine / "adapter_config.json").read_text()) == \
        json.loads((theirs / "adapter_config.json").read_text())
    a, b = mx.load(str(mine / "adapters.safetensors")), mx.load(str(theirs / "adapters.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert np.allclose(np.array(a[k]), np.array(b[k]), rtol=1e-4, atol=1e-6), k


@pytest.mark.multiproc
def test_full_shard_slices_a_lora_base_and_trains_its_adapters_as_unsharded(tmp_path):
    reports = run_ring_ranks(2, "test_sharding_lora", (tmp_path,), tmp_path, TIMEOUT)
    assert [rep["rank"] for rep in reports] == [0, 1]
    for rep in reports:
        for name, res in rep["results"].items():
            where = f"rank {rep['rank']}, {name}"
            none, full = res["none"], res["full"]
            rel = max(abs(a - b) / abs(a) for a, b in zip(none["losses"], full["losses"]))
            assert rel <= 1e-5, f"{where}: loss off the unsharded run's by {rel:.3g} relative"
            if name == "dora":
                assert min(full["norms"]) > 0.05, f"{where}: the clipping case never clipped"
            _same_adapters(Path(full["adapters"]), Path(none["adapters"]))
            # The base in slices: half of it (plus padding) on each of 2 ranks ...
            assert full["frozen_held"] <= full["base_bytes"] / 2 + 64, where
            # ... and so what the rank holds between steps is half the unsharded run's (the base,
            # the adapters and their state all in halves), give or take the allocator's rounding
            # of small buffers up to a size class (measured up to ~25 KB on this tiny QLoRA base,
            # whose slices are a few KB each); a whole base held would be 40 KB (QLoRA) to 213 KB more.
            assert none["held"] > full["base_bytes"], where
            assert full["held"] <= none["held"] / 2 + 32 * 1024, \
                f"{where}: holds {full['held']} bytes between steps, the unsharded run {none['held']}"
            assert full["scatter"] == "ring", f"{where}: ring has no sum_scatter: a ring of send/recv"


def test_the_gather_reduce_scatters_with_sum_scatter_only_where_the_backend_has_it():
    from mlx_train.rank import fullshard

    assert fullshard.scatter_of("nccl") == fullshard.scatter_of("jaccl") == fullshard.SUM_SCATTER
    for backend in ("ring", "mpi"):  # never tried where absent: on ring it may hang
        assert fullshard.scatter_of(backend) == fullshard.RING, backend
    for backend in ("any", None):  # an unknown backend: the all_sum, which runs on every one
        assert fullshard.scatter_of(backend) == fullshard.ALL_SUM, backend
    # The Stepper's backend reaches every trainable group's gather (one process: nothing is gathered,
    # so this shows the choice made, not sum_scatter run); frozen groups scatter nothing.
    import mlx.optimizers as optim

    from mlx_train.config import ModelConfig
    from mlx_train.rank.model import build_model

    for backend, how in (("jaccl", fullshard.SUM_SCATTER), ("ring", fullshard.RING), (None, fullshard.ALL_SUM)):
        model, _ = build_model(ModelConfig(n_layers=2, d_model=16, n_heads=2, seq_len=8))
        spread = fullshard.FullShard("full", optim.AdamW(1e-3), 0.0, None, backend=backend)
        spread.own(model, model.trainable_parameters())
        assert {f.scatter for f in spread.flats + [spread.rest]} == {how}, backend
