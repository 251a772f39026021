"""A checkpoint at `--shard full` (rank/fullshard.py) is saved and restored a group at a time: no
rank, rank 0 (which writes the files, piece by piece) included, ever holds the whole parameters
and AdamW state.

One launch of 2 ring ranks on loopback, each a Trainer at `full` on a GPT of 4 blocks: one step,
then a save and a restore, each with MLX's peak memory reset before. Each adds to what either
rank holds less than half the whole parameters and m, v (the old save gathered them all at once
on every rank, later kept them all on rank 0 for its one-call write; the old restore broadcast
them all at once); the restored parameters are the saved ones, and the checksum combined from
the owners' slices (no gather) is the gathered whole's. The reports' peaks are
docs/sharding.md's figures ("On the test fleet").
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import run_ring_ranks, write_corpus

TIMEOUT = 180  # seconds for the launch: a hung collective fails the test, never waits forever
MODEL = {"n_layers": 4, "d_model": 256, "n_heads": 4, "seq_len": 32}


def rank_main(out_dir: str, corpus: str) -> None:
    import dataclasses
    import gc
    import zlib

    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from mlx_train import protocol
    from mlx_train.config import DataConfig, DistributedConfig, ModelConfig, OptimConfig, TrainConfig
    from mlx_train.rank.trainer import Trainer

    group = mx.distributed.init(backend="ring", strict=True)
    out = Path(out_dir)
    cfg = TrainConfig(model=ModelConfig(**MODEL), data=DataConfig(path=corpus), optim=OptimConfig(warmup_steps=1),
                      dist=DistributedConfig(num_devices=2, batch_size_per_device=2, backend="ring"),
                      steps=1, log_every=1, eval_every=100, checkpoint_every=100, shard="full")
    protocol.emit = lambda message: None
    trainer = Trainer(cfg, group, str(out / "run"), 1 << 40)
    trainer.run(resume=False)  # one step, and its final checkpoint
    trainer.finish_write(block=True)
    layout = tree_flatten(trainer.stepper.param_layout())
    whole = 3 * sum(v.nbytes for _, v in layout)  # the parameters, m and v, whole
    gc.collect()
    held = mx.get_active_memory()  # the slices, their m and v, the data: between steps
    tokens = np.random.default_rng(0).integers(0, 256, (2, MODEL["seq_len"] + 1)).astype(np.int32)
    peaks, bases = {}, {}
    for what, call in (("step", lambda: trainer.stepper.step([(tokens[:, :-1], tokens[:, 1:])])),
                       ("save", lambda: (trainer.save(1), trainer.finish_write(block=True))),
                       ("restore", trainer.restore)):
        gc.collect()
        bases[what] = mx.get_active_memory()
        mx.reset_peak_memory()
        call()
        peaks[what] = mx.get_peak_memory()
        if what == "step":
            before = trainer.param_checksum()
            # The owners' crcs combined, no gather: the checksum of the whole parameters gathered.
            gathered = 0
            for _, v in sorted(tree_flatten(trainer.stepper.whole_params()), key=lambda kv: kv[0]):
                gathered = zlib.crc32(memoryview(v).cast("B"), gathered)
            owned = before == gathered
    report = {"rank": group.rank(), "whole": whole, "held": held, "peaks": peaks, "bases": bases,
              "same": trainer.param_checksum() == before, "owned": owned}
    del trainer
    # Sharded from unsharded: a data-parallel run's checkpoint (its final one, step 1) restored at
    # `full`, then saved again by the fully sharded run into a copy of its run directory.
    unsharded = Trainer(dataclasses.replace(cfg, shard="none"), group, str(out / "dp"), 1 << 40)
    unsharded.run(resume=False)
    unsharded.finish_write(block=True)
    want = unsharded.param_checksum()
    del unsharded
    if group.rank() == 0:
        shutil.copytree(out / "dp", out / "dp-full")
    sharded = Trainer(cfg, group, str(out / "dp-full"), 1 << 40)
    step = sharded.restore()
    report["from_unsharded"] = step == 1 and sharded.param_checksum() == want
    sharded.save(step)
    sharded.finish_write(block=True)
    (out / f"report-{group.rank()}.json").write_text(json.dumps(report))


@pytest.mark.multiproc
def test_a_fully_sharded_checkpoint_is_saved_and_restored_a_group_at_a_time(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    reports = run_ring_ranks(2, "test_fullshard_checkpoint", (tmp_path, corpus), tmp_path, TIMEOUT)
    assert [rep["rank"] for rep in reports] == [0, 1]
    assert all(rep["same"] for rep in reports), "the restored parameters are not the saved ones"
    assert all(rep["owned"] for rep in reports), "the owners' combined checksum is not the whole's"
    assert all(rep["from_unsharded"] for rep in reports), "the unsharded checkpoint was not resumed at full"
    # Saved again at `full`, the unsharded run's checkpoint is the same arrays, bit for bit.
    import mlx.core as mx
    import numpy as np

    ours, theirs = (tmp_path / run / "checkpoints" / "step-000001" for run in ("dp-full", "dp"))
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = mx.load(str(ours / name)), mx.load(str(theirs / name))
        assert sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype for k in a), name
        assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a), name  # fp32 and the step's ints
    for one in reports:
        for what in ("save", "restore"):
            # What a save or a restore adds to what a rank holds: gathered (or kept for the write)
            # at once, the whole parameters, m and v (40 MB here) and more; a piece at a time, one
            # block's parameters or one moment of it (3 MB) and its transients.
            added = one["peaks"][what] - one["bases"][what]
            assert added < one["whole"] / 2, f"rank {one['rank']}'s {what} added {added} bytes to what it holds: {one}"
