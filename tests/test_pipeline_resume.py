"""A pipelined run stopped mid-way resumes exactly, on its own split and on another (rank/pipeline.py).

The trainer itself on a tiny GPT (3 layers, 4 steps of 4 micro-batches of 4 rows, a checkpoint at
step 2). A 2-rank launch runs 2 stages straight through, then stopped at step 2 and resumed on 2
stages: the same losses, validation loss and parameter checksums, bit for bit (the checkpoint is
the whole model in fp32, each piece gathered with -0.0 where a stage has nothing, and the data
order is a function of the step: every stage reads the same rows, stopped and resumed or not,
recorded). The same launch runs 2 stages with --grad-checkpoint: the blocks recompute in the
backward, the losses are the same. A 3-rank launch resumes the 2-stage checkpoint on 3 stages
(another split of the layers: 2+1 before, 1+1+1 after): within 1e-5 relative, each stage reading
the uninterrupted run's rows.
(Resuming on one process is tests/test_pipeline.py's.) Then, in one process, a stage's activation
memory with and without --grad-checkpoint: the checkpointed step peaks lower; and a save's pieces:
a block's parameters or one moment at a time, its peak under the whole model's weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from helpers import run_ring_ranks, train_in_process, write_corpus

TIMEOUT = 240  # seconds for a whole launch: a hung transfer fails the test, never waits forever
MODEL = {"n_layers": 3, "d_model": 32, "n_heads": 2, "seq_len": 16}
ROWS, MICRO = 4, 4  # --batch-size 4 --accumulation 4: 16 rows a step
STEPS, STOP_AT = 4, 2


def _train(corpus: str, run_dir: str, stages: int, resume: bool = False, stop_after=None,
           grad_checkpoint: bool = False) -> dict:
    """The Trainer on `run_dir` with this process's group: rank 0's Metrics as dicts ("metrics")
    and what this rank read, step by step ("read": helpers.record_reads)."""
    import dataclasses

    import mlx.core as mx

    from mlx_train.config import DataConfig, DistributedConfig, ModelConfig, OptimConfig, TrainConfig

    group = mx.distributed.init()
    cfg = TrainConfig(model=ModelConfig(**MODEL), data=DataConfig(path=corpus), optim=OptimConfig(warmup_steps=2),
                      dist=DistributedConfig(num_devices=group.size(), batch_size_per_device=ROWS, backend="ring",
                                             gradient_accumulation=MICRO, pipeline_stages=stages),
                      steps=STEPS, log_every=1, eval_every=STEPS, checkpoint_every=STOP_AT,
                      grad_checkpoint=grad_checkpoint)
    seen, read = train_in_process(cfg, group, run_dir, resume, stop_after, record=True)
    return {"metrics": [dataclasses.asdict(m) for m in seen], "read": read}


def rank_main(out_dir: str, stages: str, corpus: str) -> None:
    import mlx.core as mx

    group = mx.distributed.init(backend="ring", strict=True)
    out, s = Path(out_dir), int(stages)
    report: dict = {"rank": group.rank()}
    if s == 2:
        report["straight"] = _train(corpus, str(out / "straight"), 2)
        report["stopped"] = _train(corpus, str(out / "piped"), 2, stop_after=STOP_AT)
        if group.rank() == 0:  # (rank 0 wrote it; the resume below writes step 4 into "piped" only later)
            shutil.copytree(out / "piped", out / "piped-on-3")
        report["resumed"] = _train(corpus, str(out / "piped"), 2, resume=True)
        report["checkpointed"] = _train(corpus, str(out / "checkpointed"), 2, grad_checkpoint=True)
    else:
        report["resumed"] = _train(corpus, str(out / "piped-on-3"), s, resume=True)
    (out / f"report-{group.rank()}.json").write_text(json.dumps(report))


def _corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


def _steps(ms: list) -> list:
    return [m["step"] for m in ms]


def test_pipeline_resumes_exactly_and_on_another_split(tmp_path):
    corpus = _corpus(tmp_path)
    twos = run_ring_ranks(2, "test_pipeline_resume", (tmp_path, 2, corpus), tmp_path, TIMEOUT)
    runs = {name: twos[0][name]["metrics"] for name in ("straight", "stopped", "resumed", "checkpointed")}
    straight, stopped, resumed = runs["straight"], runs["stopped"], runs["resumed"]
    # The data order: each step's rows, the same on every stage, stopped or not.
    reads = twos[0]["straight"]["read"]
    assert [step for step, _ in reads] == list(range(STEPS))
    for rep in twos:
        assert rep["straight"]["read"] == reads and rep["stopped"]["read"] + rep["resumed"]["read"] == reads
    assert _steps(straight) == [1, 2, 3, 4] and _steps(stopped) == [1, 2] and _steps(resumed) == [3, 4]
    # Every rank of a step works on its replica's 16 rows (one replica of 2 stages).
    assert all(m["rows"] == [ROWS * MICRO] * 2 and m["global_batch"] == ROWS * MICRO for m in straight)
    # On its own split: bit for bit, the parameters (checksums) too.
    for key in ("loss", "grad_norm", "param_checksum"):
        assert [m[key] for m in stopped + resumed] == [m[key] for m in straight], key
    assert resumed[-1]["val_loss"] == straight[-1]["val_loss"]
    # --grad-checkpoint recomputes the blocks in the backward: the same training.
    checkpointed = runs["checkpointed"]
    for got, want in zip(checkpointed, straight):
        assert abs(got["loss"] - want["loss"]) <= 1e-6 * want["loss"], (got["loss"], want["loss"])

    # On 3 stages, from the 2-stage checkpoint: another split of the layers, the same course.
    for f in tmp_path.glob("report-*.json"):
        f.unlink()
    threes = run_ring_ranks(3, "test_pipeline_resume", (tmp_path, 3, corpus), tmp_path, TIMEOUT)
    three = threes[0]["resumed"]["metrics"]
    assert _steps(three) == [3, 4]
    assert all(rep["resumed"]["read"] == reads[STOP_AT:] for rep in threes), "the same rows on 3 stages"
    for got, want in zip(three, straight[STOP_AT:]):
        assert abs(got["loss"] - want["loss"]) / want["loss"] < 1e-5, (got, want)
        assert abs(got["grad_norm"] - want["grad_norm"]) / want["grad_norm"] < 1e-5
    assert abs(three[-1]["val_loss"] - straight[-1]["val_loss"]) / straight[-1]["val_loss"] < 1e-5


def test_grad_checkpoint_lowers_a_stages_activation_memory():
    """A stage's step (one process: a 1-stage pipeline, the stage code of every stage) on a GPT whose
    activations outweigh its weights: --grad-checkpoint's peak is lower, its loss the same."""
    import mlx.core as mx
    import numpy as np

    from mlx_train.config import ModelConfig, OptimConfig
    from mlx_train.rank.model import build_model
    from mlx_train.rank.pipeline import Pipeline
    from mlx_train.rank.step import make_optimizer

    cfg = ModelConfig(n_layers=4, d_model=32, n_heads=2, seq_len=256)
    tokens = np.random.default_rng(0).integers(0, 256, (16, cfg.seq_len + 1)).astype(np.int32)
    batches = [(tokens[i:i + 8, :-1], tokens[i:i + 8, 1:]) for i in (0, 8)]
    peaks, losses = [], []
    for checkpointed in (False, True):
        mx.random.seed(0)
        model, _ = build_model(cfg, grad_checkpoint=checkpointed)
        pipe = Pipeline(model, make_optimizer(OptimConfig(), 10), "fp32", 1.0, mx.distributed.init(), 1)
        mx.synchronize()
        mx.reset_peak_memory()
        losses.append(pipe.step(batches).loss)
        peaks.append(mx.get_peak_memory())
    assert losses[1] == losses[0]
    assert peaks[1] < 0.7 * peaks[0], peaks  # attention scores alone: 8 x 2 x 256 x 256 fp32 a block


def test_a_checkpoint_goes_a_layer_at_a_time():
    """A pipeline's save (one process: a 1-stage pipeline, the stage code of every stage) gives a
    block's parameters or one of its moments at a time, the embeddings and the head apart, in
    piece_keys' order, every key of the whole model's layout once; its peak beside the stage's state
    stays under the whole model's fp32 weights (the whole-model gather held its weights and moments)."""
    import gc

    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from mlx_train.config import ModelConfig, OptimConfig
    from mlx_train.planning.memory import ModelShape
    from mlx_train.rank.model import build_model
    from mlx_train.rank.pipeline import Pipeline
    from mlx_train.rank.step import make_optimizer

    cfg = ModelConfig(n_layers=6, d_model=64, n_heads=2, seq_len=16)
    mx.random.seed(0)
    model, _ = build_model(cfg)
    pipe = Pipeline(model, make_optimizer(OptimConfig(), 10), "fp32", 1.0, mx.distributed.init(), 1)
    tokens = np.random.default_rng(0).integers(0, 256, (4, cfg.seq_len + 1)).astype(np.int32)
    pipe.step([(tokens[:, :-1], tokens[:, 1:])])
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    held = mx.get_active_memory()
    got, sizes = [], []
    for pairs, moments in pipe.whole_pieces():
        got.append([k for k, _ in pairs + moments])
        sizes.append(sum(v.size for _, v in pairs + moments))
        del pairs, moments
    peak = mx.get_peak_memory() - held
    assert got[-1] == ["step", "learning_rate"] and got[:-1] == pipe.piece_keys()
    layout = [k for k, _ in tree_flatten(pipe.param_layout())]
    layout += [k for k, _ in tree_flatten(pipe.optimizer_layout()) if k not in ("step", "learning_rate")]
    assert sorted(k for piece in got[:-1] for k in piece) == sorted(layout)
    shape = ModelShape.from_config(cfg)
    # (One stage holds the embeddings and the head: one piece of its own, beside the blocks'.)
    assert len(got) == 3 * (cfg.n_layers + 1) + 1 and max(sizes[:-1]) == shape.largest_layer
    assert 0 < peak < 4 * shape.n_params, (peak, 4 * shape.n_params)
