"""Fine-tuning real (mlx-lm) models end to end through the CLI, on a tiny llama made offline."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from helpers import cli, events, metrics
from tiny_llama import make_model_dir  # its fixtures (tiny_model, chat_data, ...) come in through conftest.py

# Small enough that a step takes milliseconds on 2 CPU cores.
FT = ["--seq-len", "64", "--batch-size", "4", "--lr", "2e-3", "--warmup", "2", "--no-live"]
LORA = ["--fine-tune", "lora", "--lora-layers", "-1", "--lora-rank", "4"]


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    return {"MLX_TRAIN_CACHE": str(tmp_path_factory.mktemp("token-cache"))}


def _train(run: Path, model: Path, data: Path, env: dict, *extra: str):
    return cli("train", "--model", str(model), "--data", str(data), *FT, "--run-dir", str(run), *extra,
               env=env, check=True, timeout=600)


def _adapters(path: Path) -> dict:
    return mx.load(str(path / "adapters.safetensors"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model, chat_data, cache_env):
    run = tmp_path_factory.mktemp("lora") / "run"
    _train(run, tiny_model, chat_data, cache_env, *LORA, "--devices", "2", "--steps", "40", "--log-every", "10",
           "--eval-every", "20", "--checkpoint-every", "20", "--mask-prompt")
    return run


@pytest.mark.multiproc
def test_two_rank_lora_learns_and_ranks_agree(lora_run, tiny_model):
    ms = metrics(lora_run)
    assert [m["step"] for m in ms] == [10, 20, 30, 40]
    assert ms[-1]["loss"] < ms[0]["loss"] - 1.0, [m["loss"] for m in ms]
    for m in ms:
        assert m["devices"] == 2 and m["param_checksum"][0] == m["param_checksum"][1], "ranks drifted apart"
    # Only the adapters train: they are what crosses the network, and all the optimizer holds.
    adapters = _adapters(lora_run / "adapters")
    assert adapters and all(k.endswith((".lora_a", ".lora_b")) for k in adapters)
    assert ms[-1]["grad_bytes"] == sum(v.nbytes for v in adapters.values())
    base = mx.load(str(tiny_model / "model.safetensors"))
    assert ms[-1]["grad_bytes"] < sum(v.nbytes for v in base.values()) / 5
    shown = cli("monitor", str(lora_run), "--once", "--performance", env={"COLUMNS": "200"}, check=True).stdout
    assert f"{sum(v.nbytes for v in adapters.values()):,}" in shown, shown  # what monitor says crosses the network
    opt = mx.load(str(lora_run / "checkpoints" / "step-000040" / "optimizer.safetensors"))
    assert {k.rsplit(".", 1)[0] for k in opt if k.endswith((".m", ".v"))} == set(adapters)
    # tokens/s counts real tokens: with --mask-prompt the questions and the padding are not among them.
    real_per_step = ms[-1]["tokens_per_s"] * ms[-1]["step_time_s"]  # the window's mean step: time cancels
    assert real_per_step < 0.6 * ms[-1]["global_batch"] * 64
    # Every checkpoint carries its adapters too.
    assert (lora_run / "checkpoints" / "step-000020" / "adapters" / "adapter_config.json").is_file()


@pytest.mark.multiproc
def test_adapters_load_in_mlx_lm_and_generate(lora_run, tiny_model):
    import mlx_lm

    model, tok = mlx_lm.load(str(tiny_model), adapter_path=str(lora_run / "adapters"))
    prompt = tok.apply_chat_template([{"role": "user", "content": "what colour is the red box?"}],
                                     add_generation_prompt=True)
    text = mlx_lm.generate(model, tok, prompt=prompt, max_tokens=8)
    assert text.startswith("the box"), text  # learned the reply's shape; random weights never say this
    out = cli("generate", str(lora_run), "--prompt", "what colour is the blue box?", "--max-tokens", "8", check=True)
    assert out.stdout.startswith("the box"), out.stdout


@pytest.mark.multiproc
def test_fused_model_gives_the_same_logits(lora_run, tiny_model, tmp_path):
    import mlx_lm

    out = tmp_path / "fused"
    cli("export", str(lora_run), "--fuse", str(out), check=True)
    fused, _ = mlx_lm.load(str(out))
    adapted, _ = mlx_lm.load(str(tiny_model), adapter_path=str(lora_run / "adapters"))
    base, _ = mlx_lm.load(str(tiny_model))
    x = mx.array([[3, 40, 41, 42, 43, 44, 45, 1]])
    a, b, c = (np.array(m(x)) for m in (fused, adapted, base))
    assert np.allclose(a, b, atol=1e-4, rtol=1e-4), np.abs(a - b).max()
    assert not np.allclose(a, c, atol=1e-2), "the adapters changed nothing"
    again = cli("export", str(lora_run), "--fuse", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr and len(again.stderr.splitlines()) == 1


def test_full_fine_tune(tmp_path, tiny_model, chat_data, cache_env):
    import mlx_lm

    run = tmp_path / "full"
    _train(run, tiny_model, chat_data, cache_env, "--fine-tune", "full", "--steps", "20", "--log-every", "10",
           "--lr", "1e-3")
    ms = metrics(run)
    assert ms[-1]["loss"] < ms[0]["loss"] - 0.5, [m["loss"] for m in ms]
    base = mx.load(str(tiny_model / "model.safetensors"))
    assert ms[-1]["grad_bytes"] == sum(v.nbytes for v in base.values())  # everything trains
    assert json.loads((run / "adapters" / "adapter_config.json").read_text())["fine_tune_type"] == "full"
    model, _ = mlx_lm.load(str(tiny_model), adapter_path=str(run / "adapters"))
    trained = dict(tree_flatten(model.parameters()))
    assert not np.allclose(np.array(trained["model.norm.weight"]), np.array(base["model.norm.weight"]))


def test_qlora_on_a_4bit_base(tmp_path, tiny_model_4bit, chat_data, cache_env):
    import mlx_lm

    run = tmp_path / "qlora"
    _train(run, tiny_model_4bit, chat_data, cache_env, *LORA, "--steps", "20", "--log-every", "10")
    ms = metrics(run)
    assert ms[-1]["loss"] < ms[0]["loss"] - 0.5, [m["loss"] for m in ms]
    model, tok = mlx_lm.load(str(tiny_model_4bit), adapter_path=str(run / "adapters"))
    assert any(type(m).__name__ == "QuantizedLinear" for _, m in model.named_modules())
    out = tmp_path / "fused"
    cli("export", str(run), "--fuse", str(out), check=True)
    fused, _ = mlx_lm.load(str(out))
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    deq = tmp_path / "fused-fp"
    cli("export", str(run), "--fuse", str(deq), "--dequantize", check=True)
    assert "quantization" not in json.loads((deq / "config.json").read_text())
    mlx_lm.load(str(deq))
    # --fine-tune full cannot train packed weights: one line before anything starts.
    bad = cli("train", "--model", str(tiny_model_4bit), "--data", str(chat_data), "--run-dir", str(tmp_path / "no"))
    assert bad.returncode == 2 and "quantized" in bad.stderr and not (tmp_path / "no").exists()


def test_resume_is_bit_exact(tmp_path, tiny_model, chat_data, cache_env):
    common = (*LORA, "--fine-tune", "dora", "--steps", "12", "--log-every", "4", "--checkpoint-every", "4")
    _train(tmp_path / "straight", tiny_model, chat_data, cache_env, *common)
    split = tmp_path / "split"
    _train(split, tiny_model, chat_data, cache_env, *common, "--stop-after", "6")
    assert not (split / "checkpoints" / "step-000012").exists()
    assert events(split)[-1]["event"] == "stopped" and events(split)[-1]["step"] == 6
    cli("train", "--resume", str(split), "--no-live", env=cache_env, check=True, timeout=600)
    # It resumed at the stop (a silent restart from step 0 would end with the same adapters): the
    # resume says step 6, and no step before it was trained twice.
    assert [e["step"] for e in events(split, "resume")] == [6]
    assert [m["step"] for m in metrics(split)] == [4, 8, 12]
    a, b = _adapters(tmp_path / "straight" / "adapters"), _adapters(split / "adapters")
    assert set(a) == set(b) and any(k.endswith(".m") for k in a)  # DoRA's magnitudes train too
    for k in a:
        assert np.array_equal(np.array(a[k]), np.array(b[k])), k
    assert metrics(tmp_path / "straight")[-1]["loss"] == metrics(split)[-1]["loss"]


# -- bad input: one line, exit 2, nothing written ---------------------------------------------------
def _refused(tmp_path, *args, env=None):
    run = tmp_path / "run"
    out = cli("train", *args, "--steps", "2", "--run-dir", str(run), env=env or {})
    assert out.returncode == 2, out.stdout + out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not run.exists()
    return out.stderr


def test_model_dir_without_config(tmp_path, chat_data):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    assert "no config.json" in _refused(tmp_path, "--model", str(tmp_path / "m"), "--data", str(chat_data))


def test_unknown_architecture(tmp_path, tiny_model, chat_data):
    m = tmp_path / "m"
    shutil.copytree(tiny_model, m)
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "model_type": "nosuchformer"}))
    assert "'nosuchformer' is not one mlx-lm knows" in _refused(tmp_path, "--model", str(m), "--data", str(chat_data))


def test_jsonl_line_with_no_known_key(tmp_path, tiny_model, cache_env):
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.jsonl").write_text('{"text": "fine"}\n\n{"question": "q", "answer": "a"}\n')
    err = _refused(tmp_path, "--model", str(tiny_model), "--data", str(d), env=cache_env)
    assert f"{d / 'train.jsonl'}:3 has none of the known keys (found: answer, question)" in err


def test_chat_data_without_a_chat_template(tmp_path, chat_data, cache_env):
    m = make_model_dir(tmp_path / "plain", chat_template=False)
    err = _refused(tmp_path, "--model", str(m), "--data", str(chat_data), env=cache_env)
    assert "train.jsonl:1 is chat data but the model's tokenizer has no chat template" in err


def test_lora_on_the_builtin_gpt(tmp_path):
    assert "needs a pretrained model" in _refused(tmp_path, "--fine-tune", "lora")


def test_a_missing_directory_is_not_fetched(tmp_path):
    from mlx_train.errors import UserError
    from mlx_train.rank.hf import model_path

    # Not org/name: a path, and a missing one is said so (nothing goes to the network).
    with pytest.raises(UserError, match="no such directory"):
        model_path(str(tmp_path / "nope" / "model"))


@pytest.mark.multiproc
def test_a_killed_rank_is_recovered_exactly(tmp_path, tiny_model, chat_data, cache_env):
    """SIGKILL one rank of a 2-rank LoRA run: the supervisor relaunches from the last checkpoint (base
    reloaded, adapters and optimizer state restored) and the result equals an uninterrupted run's."""
    import os
    import signal

    from helpers import popen, wait_for

    # 60 steps, the kill after step 30: the relaunch resumes from step 20's checkpoint and replays 10 steps,
    # which is what exactness needs shown (a longer run only costs time).
    common = [*FT, *LORA, "--devices", "2", "--steps", "60", "--log-every", "10", "--eval-every", "1000",
              "--checkpoint-every", "20"]
    _train(tmp_path / "straight", tiny_model, chat_data, cache_env, *common)
    run = tmp_path / "killed"
    proc = popen("train", "--model", str(tiny_model), "--data", str(chat_data), *common, "--run-dir", str(run),
                 env={**os.environ, **cache_env})
    try:
        wait_for(lambda: (run / "metrics.jsonl").exists() and metrics(run) and metrics(run)[-1]["step"] >= 30, 300,
                 "step 30")
        launch = events(run, "launch")[0]
        os.kill([r for r in launch["ranks"] if r["rank"] == 1][0]["pid"], signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    # The kill landed mid-run (after step 30 of 60): a run with no restart did not recover anything.
    assert events(run, "restart"), "rank 1 was SIGKILLed mid-run and the supervisor never restarted it"
    assert events(run, "resume")[0]["step"] % 20 == 0 and events(run)[-1]["event"] == "finish"
    a, b = _adapters(tmp_path / "straight" / "adapters"), _adapters(run / "adapters")
    for k in a:
        assert np.array_equal(np.array(a[k]), np.array(b[k])), f"{k} differs after recovery"


def test_a_hub_id_that_cannot_be_fetched(tmp_path, chat_data):
    # Offline (HF_HUB_OFFLINE) and an empty hub cache: the id is tried, nothing is downloaded.
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    err = _refused(tmp_path, "--model", "someorg/no-such-model", "--data", str(chat_data), env=env)
    assert "cannot fetch model 'someorg/no-such-model' from the Hugging Face hub" in err


def test_a_budget_that_cannot_hold_the_model(tmp_path, tiny_model, chat_data, cache_env):
    """The planner judges a pretrained model from its config.json before launch."""
    err = _refused(tmp_path, "--model", str(tiny_model), "--data", str(chat_data), "--seq-len", "64",
                   "--memory-budget", "2MiB", env=cache_env)
    assert "cannot hold this model" in err, err
    assert "--fine-tune lora" in err
