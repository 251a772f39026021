"""A pipelined fine-tune exports as an unpipelined one does (controller/export.py, rank/pipeline.py).

The trainer itself on the tiny mlx-lm llama (2 layers, so one on each stage), 2 steps of 2
micro-batches of 2 rows of chat data: one 2-rank launch trains it on 2 stages, full and LoRA; this
process trains the same two runs unpipelined (one thread a micro-batch, as a stage runs it; two
lanes would change the first step's loss by 1e-3 relative, a matter of the lanes, not of the
pipeline). The losses agree within 1e-5 relative; `export --fuse` of each pipelined run writes
the unpipelined run's files (the same names, config and tensors within 1e-5), and `mlx_lm.load`
opens it. The same launch stops a 4-step pipelined LoRA run at its step-2 checkpoint and resumes
it: its losses and its adapters are the straight run's, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from helpers import run_ring_ranks, train_in_process  # (the tiny llama's fixtures come in through conftest.py)

TIMEOUT = 240
MODES = ("full", "lora")


def _train(model: str, data: str, run_dir: str, mode: str, stages: int, steps: int = 2, resume: bool = False,
           stop_after=None) -> list:
    """The trainer on `run_dir` (written as the controller would: its config.yaml); rank 0's losses."""
    import mlx.core as mx

    from mlx_train.config import DataConfig, DistributedConfig, FineTuneConfig, ModelConfig, OptimConfig, TrainConfig
    from mlx_train.rundir import RunDir

    group = mx.distributed.init()
    ft = FineTuneConfig(mode=mode, **({} if mode == "full" else {"lora_rank": 4, "lora_layers": -1}))
    cfg = TrainConfig(model=ModelConfig(name=model, seq_len=64), data=DataConfig(path=data), fine_tune=ft,
                      optim=OptimConfig(lr=2e-3, warmup_steps=1),
                      dist=DistributedConfig(num_devices=group.size(), batch_size_per_device=2, backend="ring",
                                             gradient_accumulation=2, pipeline_stages=stages, cpu_threads=1),
                      steps=steps, log_every=1, eval_every=2, checkpoint_every=2)
    if group.rank() == 0 and not resume:
        Path(run_dir).mkdir(parents=True)
        RunDir(run_dir).save_config(cfg)  # what `export` reads the base model's name from
    seen, _ = train_in_process(cfg, group, run_dir, resume, stop_after)
    return [(m.loss, m.grad_norm, m.val_loss) for m in seen]


def rank_main(out_dir: str, model: str, data: str) -> None:
    import mlx.core as mx

    group = mx.distributed.init(backend="ring", strict=True)
    report = {mode: _train(model, data, str(Path(out_dir) / f"piped-{mode}"), mode, 2) for mode in MODES}
    # A LoRA run stopped at its checkpoint and resumed, against the same run straight through.
    out = Path(out_dir)
    report["straight"] = _train(model, data, str(out / "lora-straight"), "lora", 2, steps=4)
    report["stopped"] = _train(model, data, str(out / "lora-resumed"), "lora", 2, steps=4, stop_after=2)
    report["resumed"] = _train(model, data, str(out / "lora-resumed"), "lora", 2, steps=4, resume=True)
    (Path(out_dir) / f"report-{group.rank()}.json").write_text(json.dumps({"rank": group.rank(), **report}))


def test_export_fuse_of_a_pipelined_run(tmp_path, tiny_model, chat_data, token_cache):
    import mlx.core as mx
    import mlx_lm

    from mlx_train.controller.export import fuse

    piped_losses = run_ring_ranks(2, "test_pipeline_export", (tmp_path, tiny_model, chat_data), tmp_path, TIMEOUT)[0]
    x = mx.array([[3, 40, 41, 42, 43, 44, 45, 1]])
    base = np.array(mlx_lm.load(str(tiny_model))[0](x))
    for mode in MODES:
        one_losses = _train(str(tiny_model), str(chat_data), str(tmp_path / f"one-{mode}"), mode, 1)
        piped, one = (fuse(str(tmp_path / f"{kind}-{mode}"), str(tmp_path / f"fused-{kind}-{mode}"))
                      for kind in ("piped", "one"))
        assert sorted(p.name for p in piped.iterdir()) == sorted(p.name for p in one.iterdir()), mode
        assert json.loads((piped / "config.json").read_text()) == json.loads((one / "config.json").read_text())
        got, want = mx.load(str(piped / "model.safetensors")), mx.load(str(one / "model.safetensors"))
        assert sorted(got) == sorted(want), mode
        diff = max(float(mx.abs(got[k].astype(mx.float32) - want[k].astype(mx.float32)).max()) for k in want)
        assert diff < 1e-5, (mode, diff)
        for got, want in zip(piped_losses[mode], one_losses):  # the same training (loss, validation loss)
            assert abs(got[0] - want[0]) < 1e-5 * want[0] and (got[2] is None) == (want[2] is None), (mode, got, want)
            assert got[2] is None or abs(got[2] - want[2]) < 1e-5 * want[2], (mode, got, want)
        logits = np.array(mlx_lm.load(str(piped))[0](x))  # mlx-lm opens it, and it is the fine-tuned model
        assert not np.allclose(logits, base, atol=1e-3), f"{mode}: the fine-tune changed nothing"
    _generate(tmp_path / "piped-lora")
    assert piped_losses["stopped"] + piped_losses["resumed"] == piped_losses["straight"]
    assert len(piped_losses["straight"]) == 4 and len(piped_losses["resumed"]) == 2
    for name in ("adapters.safetensors", "adapter_config.json"):
        got, want = (tmp_path / kind / "adapters" / name for kind in ("lora-resumed", "lora-straight"))
        assert got.read_bytes() == want.read_bytes(), name


def _generate(run: Path) -> None:
    """`generate` on a pipelined run: it samples where the model fits this host; where the weights
    alone exceed this host's memory it says so in one line, and where the model can run instead."""
    import pytest

    from mlx_train.controller import export
    from mlx_train.errors import UserError

    assert isinstance(export.sample(str(run), "hi", max_tokens=2), str)
    need = export.weights_bytes(Path(export.run_model(str(run))[0])) + export.weights_bytes(run / "adapters")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export, "system_memory", lambda: need - 1)
        with pytest.raises(UserError) as refused:
            export.sample(str(run), "hi", max_tokens=2)
    line = str(refused.value)
    assert "\n" not in line and "needs" in line and "more memory" in line and "mlx_lm.chat" in line, line
