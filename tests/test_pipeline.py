"""A training pipeline (rank/pipeline.py) trains as one process does on the same global batch.

The layer split and the 1F1B order are checked as functions. Then one launch per number of stages
(ring backend, loopback): each rank runs its stage of a tiny GPT from scratch over M = 4
micro-batches of 4 rows (the same 16 rows per step as one process with --accumulation 4), with a
gradient clip that acts; rank 0 then trains the same model in one process (the Stepper) and
compares: every rank's loss per step within 1e-5 relative, the same on every rank, the final
parameters (gathered whole from the stages) close, the optimizer state in the unsharded layout,
and the validation loss (forward only through the stages). The same launch does the same for an
mlx-lm llama, fine-tuned in full and with LoRA (2 layers at S = 2, 3 at S = 3). At S = 2 the
trainer itself runs pipelined and stops half-way: its checkpoint resumes in one process on the
one-process run's losses, every stage reading the one-process run's rows, step by step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from helpers import run_ring_ranks, train_in_process, write_corpus
from tiny_llama import make_model_dir, tiny_model  # noqa: F401  (a fixture)

TIMEOUT = 240  # seconds for a whole launch: a hung transfer fails the test, never waits forever
# The 50 steps (the GPT, the llama full and LoRA, at S = 2 and 3) were run by hand
# (MLX_TRAIN_PIPE_STEPS=50 ... -k trains_as_one -o timeout=1800, docs/pipeline.md): every step's
# loss within 1.7e-7 relative of one process in all six cases, the largest not at the end. The
# suite's 8 GPT and 3 llama steps show the same agreement (8.4e-8; bit for bit) in under a third of
# the time (28 s against 95 on the same loaded machine).
_STEPS = os.environ.get("MLX_TRAIN_PIPE_STEPS")
STEPS = int(_STEPS or 8)
MODEL = {"n_layers": 3, "d_model": 32, "n_heads": 2, "seq_len": 16}
ROWS, MICRO = 4, 4  # --batch-size 4 --accumulation 4
CLIP = 0.25  # below the tiny GPT's gradient norms: clipping acts on every step (over 50 too)
TRAIN_STEPS, STOP_AT = 4, 2  # the trainer's run (S = 2): stopped at STOP_AT, resumed in one process


def test_the_knob_counts_replicas_rows():
    from mlx_train.config import DistributedConfig, Split, TrainConfig

    d = DistributedConfig(num_devices=2, batch_size_per_device=4, gradient_accumulation=4, pipeline_stages=2)
    assert d.replicas == 1 and d.global_batch_size == 16  # the rows of --devices 1 --batch-size 4 --accumulation 4
    assert d.data_view() == DistributedConfig(num_devices=1, batch_size_per_device=4, gradient_accumulation=4)
    assert Split.of(TrainConfig(dist=d)).event()["pipeline_stages"] == 2
    with pytest.raises(ValueError, match="does not divide 3 devices"):
        DistributedConfig(num_devices=3, pipeline_stages=2)
    with pytest.raises(ValueError, match="drop --shares"):
        DistributedConfig(num_devices=2, pipeline_stages=2, shares="3,1")
    with pytest.raises(ValueError, match="drop --shard"):
        TrainConfig(dist=d, shard="optimizer")


def test_stage_layers_split_in_proportion():
    from mlx_train.errors import UserError
    from mlx_train.rank.pipeline import stage_layers

    assert stage_layers(8, [1, 1]) == [range(0, 4), range(4, 8)]
    assert stage_layers(7, [1, 1, 1]) == [range(0, 3), range(3, 5), range(5, 7)]
    assert stage_layers(10, [3, 1]) == [range(0, 7), range(7, 10)]  # 1 each, then 8 split 6:2
    assert stage_layers(3, [100, 1, 1]) == [range(0, 1), range(1, 2), range(2, 3)]  # never an empty stage
    with pytest.raises(UserError, match="at least 3 layers"):
        stage_layers(2, [1, 1, 1])


@pytest.mark.parametrize("stages,micro", [(2, 4), (3, 4), (4, 2), (3, 1)])
def test_schedule_is_1f1b(stages, micro):
    from mlx_train.rank.pipeline import BACKWARD, FORWARD, schedule

    for s in range(stages):
        ops = schedule(s, stages, micro)
        assert [i for k, i in ops if k == FORWARD] == list(range(micro))
        assert [i for k, i in ops if k == BACKWARD] == list(range(micro))
        warm = min(stages - 1 - s, micro)
        assert ops[:warm] == [(FORWARD, i) for i in range(warm)]
        # At most S - s micro-batches in flight (forward done, backward not): 1F1B's memory bound.
        live = np.cumsum([1 if k == FORWARD else -1 for k, _ in ops])
        assert live.max() == min(stages - s, micro) and live[-1] == 0
        # A micro-batch's backward on stage s follows its forward, and on the last stage at once.
        if s == stages - 1:
            assert ops == [op for i in range(micro) for op in ((FORWARD, i), (BACKWARD, i))]


# -- what each rank runs -------------------------------------------------------------------------

def _batches(step: int):
    tokens = np.random.default_rng(step).integers(0, 256, (ROWS * MICRO, MODEL["seq_len"] + 1)).astype(np.int32)
    return [(tokens[m * ROWS:(m + 1) * ROWS, :-1], tokens[m * ROWS:(m + 1) * ROWS, 1:]) for m in range(MICRO)]


def _val():
    tokens = np.random.default_rng(999).integers(0, 256, (ROWS, MODEL["seq_len"] + 1)).astype(np.int32)
    return [(tokens[:, :-1], tokens[:, 1:])]


def _model():
    import mlx.core as mx

    from mlx_train.config import ModelConfig
    from mlx_train.rank.model import build_model

    mx.random.seed(0)
    return build_model(ModelConfig(**MODEL))


def _train(corpus: str, run_dir: str, stages: int, resume: bool, stop_after=None) -> dict:
    """The Trainer on `run_dir` (this process's group): rank 0's Metrics as dicts ("metrics") and
    what this rank read, a digest of each step's micro-batches in order ("read")."""
    import dataclasses

    import mlx.core as mx

    from mlx_train.config import DataConfig, DistributedConfig, ModelConfig, OptimConfig, TrainConfig

    group = mx.distributed.init()
    cfg = TrainConfig(model=ModelConfig(**MODEL), data=DataConfig(path=corpus), optim=OptimConfig(warmup_steps=2),
                      dist=DistributedConfig(num_devices=group.size(), batch_size_per_device=ROWS, backend="ring",
                                             gradient_accumulation=MICRO, pipeline_stages=stages),
                      steps=TRAIN_STEPS, log_every=1, eval_every=TRAIN_STEPS, checkpoint_every=STOP_AT)
    seen, read = train_in_process(cfg, group, run_dir, resume, stop_after, record=True)
    return {"metrics": [dataclasses.asdict(m) for m in seen], "read": read}


LLAMA_STEPS = int(_STEPS or 3)
LORA = {"lora_rank": 4, "lora_scale": 2.0}  # a large scale: the adapters move the loss within 3 steps


def _llama(path: str, mode: str):
    import mlx.core as mx

    from mlx_train.config import FineTuneConfig, ModelConfig
    from mlx_train.rank import hf

    mx.random.seed(0)  # the adapters' initial values are random: the same on every rank and in one process
    ft = FineTuneConfig(mode=mode, **({} if mode == "full" else LORA))
    return hf.load_model(ModelConfig(name=path), ft), ft


def _llama_batches(step: int, vocab: int):
    """Token rows with some targets masked (-1: padding, a prompt), so the token weighting counts."""
    rng = np.random.default_rng(100 + step)
    tokens = rng.integers(0, vocab, (ROWS * MICRO, MODEL["seq_len"] + 1)).astype(np.int32)
    x, y = tokens[:, :-1], tokens[:, 1:].copy()
    y[rng.random(y.shape) < 0.3] = -1
    batches = [(x[m * ROWS:(m + 1) * ROWS], y[m * ROWS:(m + 1) * ROWS]) for m in range(MICRO)]
    counts = [int((b >= 0).sum()) for _, b in batches]
    return batches, (counts, sum(counts))


def _llama_case(group, path: str, mode: str, out_dir: str) -> dict:
    """An mlx-lm llama through the stages (full or LoRA) against one process on rank 0: losses, the
    trainable tree gathered whole, what each stage holds and keeps optimizer state for."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_train.config import OptimConfig
    from mlx_train.rank import hf
    from mlx_train.rank.pipeline import Pipeline
    from mlx_train.rank.step import Stepper, make_optimizer

    model, ft = _llama(path, mode)
    vocab = model.args.vocab_size
    pipe = Pipeline(model, make_optimizer(OptimConfig(warmup_steps=1), LLAMA_STEPS), "fp32", CLIP, group,
                    group.size(), backend="ring")
    losses = []
    for step in range(LLAMA_STEPS):
        batches, tokens = _llama_batches(step, vocab)
        losses.append(pipe.step(batches, tokens=tokens).loss)
    val = float(pipe.evaluate(_llama_batches(99, vocab)[0][:1]).item())
    whole = pipe.whole_params()  # a collective: every rank gathers, rank 0 keeps it
    params = {k: np.array(v) for k, v in tree_flatten(whole)}
    out = {"losses": losses, "val": val, "keys": sorted(params),
           "state_keys": sorted(k for k, _ in tree_flatten(pipe._moments())),
           "held": sorted(k for k, v in tree_flatten(model.parameters()) if v.size)}
    if group.rank() == 0:
        if mode != "full":  # what the trainer writes at a checkpoint: one set of adapters, from every stage
            from mlx_lm.tuner.utils import load_adapters
            from mlx_lm.utils import load_model

            written = Path(out_dir) / f"adapters-{mode}"
            hf.write_adapters(written, whole, hf.adapter_config(path, ft, len(model.layers)))
            # mlx-lm's own loader (mlx_lm.load's model half) puts them on the base, each where it was.
            loaded, _ = load_model(Path(path))
            loaded = dict(tree_flatten(load_adapters(loaded, str(written)).parameters()))
            out["loaded_same"] = all(np.array_equal(np.array(loaded[k]), v) for k, v in params.items())
        model, _ = _llama(path, mode)
        one = Stepper(model, hf.masked_lm_loss, make_optimizer(OptimConfig(warmup_steps=1), LLAMA_STEPS), "fp32",
                      CLIP)
        base = []
        for step in range(LLAMA_STEPS):
            batches, tokens = _llama_batches(step, vocab)
            base.append(one.step(batches, tokens=tokens).loss)
        base_params = {k: np.array(v) for k, v in tree_flatten(one.whole_params())}
        out["base"] = {"losses": base, "val": float(one.evaluate(_llama_batches(99, vocab)[0][:1]).item()),
                       "keys_same": list(params) == list(base_params),
                       "param_diff": max(float(np.max(np.abs(params[k] - base_params[k]))) for k in base_params)}
    return out


def rank_main(out_dir: str, stages: str, corpus: str = "", llama: str = "") -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_train.config import OptimConfig
    from mlx_train.rank.pipeline import Pipeline
    from mlx_train.rank.step import Stepper, make_optimizer

    group = mx.distributed.init(backend="ring", strict=True)
    r = group.rank()
    model, _ = _model()
    pipe = Pipeline(model, make_optimizer(OptimConfig(warmup_steps=2), STEPS), "fp32", CLIP, group, int(stages),
                    backend="ring")
    stats = [pipe.step(_batches(step)) for step in range(STEPS)]
    val = float(pipe.evaluate(_val()).item())
    params = {k: np.array(v) for k, v in tree_flatten(pipe.whole_params())}
    state = {k: np.array(v) for k, v in tree_flatten(pipe.optimizer_state())}
    report = {"rank": r, "stage": pipe.at.stage, "losses": [s.loss for s in stats],
              "norms": [s.grad_norm for s in stats],
              "skipped": any(s.skipped for s in stats), "val": val,
              "held": sorted(k for k, v in tree_flatten(model.parameters()) if v.size)}
    if r == 0:  # one process, the same 16 rows per step
        model, loss_fn = _model()
        one = Stepper(model, loss_fn, make_optimizer(OptimConfig(warmup_steps=2), STEPS), "fp32", CLIP)
        base = [one.step(_batches(step)) for step in range(STEPS)]
        base_params = {k: np.array(v) for k, v in tree_flatten(one.whole_params())}
        base_state = {k: np.array(v) for k, v in tree_flatten(one.optimizer_state())}
        report["base"] = {
            "losses": [s.loss for s in base], "norms": [s.grad_norm for s in base],
            "val": float(one.evaluate(_val()).item()),
            "keys_same": list(params) == list(base_params) and sorted(state) == sorted(base_state),
            "param_diff": max(float(np.max(np.abs(params[k] - base_params[k]))) for k in base_params),
            "state_diff": max(float(np.max(np.abs(state[k].astype(np.float64) - base_state[k])))
                              for k in base_state if state[k].ndim),
            "step_same": int(state["step"]) == int(base_state["step"]) == STEPS}
    if llama:  # an mlx-lm model in the same launch: full, then LoRA (adapters only train)
        report["llama"] = {mode: _llama_case(group, llama, mode, out_dir) for mode in ("full", "lora")}
    if corpus:  # the trainer itself, stopped half-way: the test resumes its checkpoint in one process
        report["trained"] = _train(corpus, str(Path(out_dir) / "piped"), int(stages), resume=False, stop_after=STOP_AT)
    (Path(out_dir) / f"report-{r}.json").write_text(json.dumps(report))


# -- the launches --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model_3(tmp_path_factory) -> Path:
    """The tiny llama with 3 layers: one a stage at S = 3."""
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama-3", num_hidden_layers=3)


@pytest.mark.parametrize("stages", [2, 3])
def test_pipeline_trains_as_one_process(tmp_path, stages, request):
    corpus = tmp_path / "corpus"
    if stages == 2:
        write_corpus(corpus)
    # A llama of one layer a stage, fine-tuned in the same launch; the trainer's run at S = 2 only.
    llama = request.getfixturevalue("tiny_model" if stages == 2 else "tiny_model_3")
    args = (tmp_path, stages, corpus if stages == 2 else "", llama)
    reports = run_ring_ranks(stages, "test_pipeline", args, tmp_path, TIMEOUT)
    assert [rep["stage"] for rep in reports] == list(range(stages))
    base = reports[0]["base"]
    assert min(base["norms"]) > CLIP, "the clip must act for the norm's all_sum to matter"
    for rep in reports:
        assert not rep["skipped"]
        assert rep["losses"] == reports[0]["losses"], "every rank reports the same loss"
        rel = max(abs(a - b) / abs(b) for a, b in zip(rep["losses"], base["losses"]))
        assert rel < 1e-5, (rep["losses"], base["losses"])
        norm_rel = max(abs(a - b) / b for a, b in zip(rep["norms"], base["norms"]))
        assert norm_rel < 1e-5, (rep["norms"], base["norms"])
        assert abs(rep["val"] - base["val"]) / base["val"] < 1e-5
    assert base["keys_same"] and base["step_same"]  # the checkpoint layout of one process
    assert base["param_diff"] < 1e-4 and base["state_diff"] < 1e-4
    # Each stage holds its own layers only: the embeddings first, the head last.
    held = [{k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks") else "") for k in rep["held"]}
            for rep in reports]
    assert "tok" in held[0] and "head" in held[-1] and "tok" not in held[-1] and "head" not in held[0]
    blocks = [sorted(int(k.split(".")[1]) for k in h if k.startswith("blocks")) for h in held]
    assert sum(blocks, []) == list(range(MODEL["n_layers"]))
    if stages == 2:  # the trainer's checkpoint is the whole model: it resumes in one process, on course
        straight = _train(str(corpus), str(tmp_path / "straight"), 1, resume=False)
        resumed = _train(str(corpus), str(tmp_path / "piped"), 1, resume=True)
        # The data order unchanged: every stage read the one-process run's rows, step by step, and
        # the resumed run went on where the pipelined one stopped.
        assert [step for step, _ in straight["read"]] == list(range(TRAIN_STEPS))
        for rep in reports:
            assert rep["trained"]["read"] + resumed["read"] == straight["read"], rep["rank"]
        piped = reports[0]["trained"]["metrics"]
        assert [m["step"] for m in piped] == [1, 2] and [m["step"] for m in resumed["metrics"]] == [3, 4]
        for got, want in zip(piped + resumed["metrics"], straight["metrics"]):
            assert abs(got["loss"] - want["loss"]) / want["loss"] < 1e-5, (got, want)
        assert abs(resumed["metrics"][-1]["val_loss"] - straight["metrics"][-1]["val_loss"]) \
            / straight["metrics"][-1]["val_loss"] < 1e-5
        assert piped[-1]["global_batch"] == straight["metrics"][-1]["global_batch"] == ROWS * MICRO
    _check_llama(reports, tmp_path)


def _check_llama(reports: list, out_dir: Path) -> None:
    """The mlx-lm llama through the stages: full and LoRA train as one process; with LoRA only the
    adapters train (and hold AdamW state), and they come out as one set mlx-lm loads."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    for mode in ("full", "lora"):
        cases = [rep["llama"][mode] for rep in reports]
        base = cases[0]["base"]
        assert base["keys_same"] and base["param_diff"] < 1e-4, (mode, base)
        for case in cases:
            assert case["losses"] == cases[0]["losses"], "every rank reports the same loss"
            rel = max(abs(a - b) / abs(b) for a, b in zip(case["losses"], base["losses"]))
            assert rel < 1e-5, (mode, case["losses"], base["losses"])
            assert abs(case["val"] - base["val"]) / base["val"] < 1e-5
        # The embeddings on the first stage, the norm and head on the last, layer s on stage s.
        held = [set(c["held"]) for c in cases]
        embeds = [any(k.startswith("model.embed_tokens") for k in h) for h in held]
        heads = [any("lm_head" in k for k in h) for h in held]
        assert embeds == [True] + [False] * (len(held) - 1) and heads == [False] * (len(held) - 1) + [True]
        assert [{k.split(".")[2] for k in h if ".layers." in k} for h in held] == [{str(s)} for s in range(len(held))]
    lora = [rep["llama"]["lora"] for rep in reports]
    adapters = lora[0]["keys"]
    assert adapters and all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k in adapters), adapters
    # Each stage keeps AdamW moments for its own adapters only: the frozen base has none.
    for case in lora:
        assert case["state_keys"] and all(k.rsplit(".", 2)[-2] in ("lora_a", "lora_b") for k in case["state_keys"])
    assert sum(len(c["state_keys"]) for c in lora) == 2 * len(adapters)  # m and v of each adapter, once
    written = out_dir / "adapters-lora"
    saved = dict(tree_flatten(mx.load(str(written / "adapters.safetensors"))))
    assert sorted(saved) == adapters, "one set of adapters from every stage, in the whole model's names"
    assert lora[0]["loaded_same"], "mlx-lm loads them onto the base, each adapter where it trained"
