"""The memory planner's four entry points with a pretrained model (the tiny llama, made offline):
`MemoryOptimizer.suggest_config(model=DIR)`, `--optimize-memory`, the out-of-memory ladder and
`mlx-train optimize`, each with LoRA and with full fine-tuning."""

import signal

import pytest
import yaml

from helpers import cli, events, metrics
from mlx_train.config import DistributedConfig, FineTuneConfig, ModelConfig, Split, TrainConfig
from mlx_train.planning.memory import RUNTIME_OVERHEAD
from mlx_train.planning.oom import CrashFacts, OomPolicy
from mlx_train.planning.tuner import Trial, Tuner
from mlx_train.planning.planner import MemoryOptimizer

MiB = 2**20
FT = ["--seq-len", "64", "--devices", "2", "--log-every", "1", "--no-live"]


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    return {"MLX_TRAIN_CACHE": str(tmp_path_factory.mktemp("token-cache"))}


def _cfg(model, mode, batch=32, accumulation=1, budget=None):
    return TrainConfig(model=ModelConfig(name=str(model), seq_len=64), fine_tune=FineTuneConfig(mode=mode),
                       dist=DistributedConfig(2, batch, accumulation), memory_budget=budget)


def _budget(peak_mib: float) -> float:
    """memory_per_device whose usable part leaves `peak_mib` for the step (what --optimize-memory passes)."""
    return (RUNTIME_OVERHEAD + peak_mib * MiB) / 0.85


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_suggest_config_takes_a_model_directory(tiny_model, mode):
    roomy = MemoryOptimizer.suggest_config(model=str(tiny_model), num_devices=2, fine_tune=mode, seq_len=64,
                                           global_batch_size=64, memory_per_device=_budget(200))
    assert roomy.fits and (roomy.suggested_batch_size, roomy.gradient_accumulation) == (32, 1)
    assert roomy.model.fine_tune == mode and roomy.model.vocab_size > 256  # from its config.json
    assert any("config.json" in a for a in roomy.assumptions)
    tight = MemoryOptimizer.suggest_config(model=str(tiny_model), num_devices=2, fine_tune=mode, seq_len=64,
                                           global_batch_size=64, memory_per_device=_budget(8))
    assert tight.fits and tight.suggested_batch_size < 32 and tight.global_batch_size == 64
    assert tight.breakdown["total"] <= tight.hardware.usable_memory


def test_lora_plans_fewer_trainable_parameters_and_less_memory(tiny_model, tiny_model_4bit):
    plans = {(m.name, mode): MemoryOptimizer.suggest_config(model=str(m), num_devices=2, seq_len=64,
                                                            global_batch_size=16, memory_per_device=_budget(200),
                                                            fine_tune=FineTuneConfig(mode=mode))
             for m in (tiny_model, tiny_model_4bit) for mode in ("full", "lora")}
    full, lora = plans[(tiny_model.name, "full")], plans[(tiny_model.name, "lora")]
    assert lora.n_params < full.n_params and lora.breakdown["peak"] < full.breakdown["peak"]
    qlora = plans[(tiny_model_4bit.name, "lora")]
    assert qlora.model.quant_bits == 4 and qlora.breakdown["peak"] < lora.breakdown["peak"]


def test_a_bad_fine_tune_mode_is_refused(tiny_model):
    with pytest.raises(ValueError, match="fine-tune must be one of"):
        MemoryOptimizer.suggest_config(model=str(tiny_model), num_devices=1, fine_tune="qlora")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_crash_near_the_predicted_peak_of_a_pretrained_model_is_out_of_memory(tiny_model, mode):
    """A rank SIGKILLed before it reported any peak: the planner's prediction for the pretrained model's
    step is the evidence (it was missing, so such a crash was taken for some other fault)."""
    cfg = _cfg(tiny_model, mode)
    predicted = MemoryOptimizer.estimate(cfg)
    verdict = OomPolicy().judge(cfg, CrashFacts(1, -signal.SIGKILL, "", peak=0, budget=predicted))
    assert verdict is not None and "predicted" in verdict.reason
    # Far below its budget, the same crash is not memory.
    assert OomPolicy().judge(cfg, CrashFacts(1, -signal.SIGKILL, "", peak=0, budget=predicted * 4)) is None
    ladder = OomPolicy().next_config(cfg)
    assert (ladder.dist.batch_size_per_device, ladder.dist.gradient_accumulation) == (16, 2)


def test_the_tuner_skips_pretrained_settings_predicted_over_budget(tiny_model):
    base = _cfg(tiny_model, "lora", batch=4, accumulation=8)
    budget = MemoryOptimizer.estimate(_cfg(tiny_model, "lora", batch=8, accumulation=4)) - 1
    tuner = Tuner(base, budget, 3, False, measure=None)
    assert tuner.fits(Trial(Split(64, 2, 4, 8)))
    assert not tuner.fits(Trial(Split(64, 2, 32, 1)))
    assert tuner.trials[-1].status == "skipped (predicted over budget)"


@pytest.mark.multiproc
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_optimize_memory_splits_a_pretrained_models_batch(tmp_path, tiny_model, chat_data, cache_env, mode):
    run = tmp_path / mode
    out = cli("train", "--model", str(tiny_model), "--data", str(chat_data), *FT, "--fine-tune", mode,
              "--batch-size", "32", "--steps", "2", "--memory-budget", "20MiB", "--optimize-memory",
              "--run-dir", str(run), env=cache_env, check=True, timeout=600).stdout
    assert "--optimize-memory:" in out
    launch = events(run, "launch")[0]
    assert launch["global_batch"] == 64 and launch["batch_size_per_device"] < 32
    assert not events(run, "oom"), "the planner's split should fit without a recovery"
    assert max(metrics(run)[-1]["peak_memory"]) <= 20 * MiB


@pytest.mark.multiproc
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_out_of_memory_ladder_recovers_a_pretrained_run(tmp_path, tiny_model, chat_data, cache_env, mode):
    run = tmp_path / mode
    cli("train", "--model", str(tiny_model), "--data", str(chat_data), *FT, "--fine-tune", mode,
        "--batch-size", "32", "--steps", "3", "--memory-budget", "20MiB", "--max-restarts", "0",
        "--run-dir", str(run), env=cache_env, check=True, timeout=600)
    reconf = events(run, "reconfigure")
    assert events(run, "oom") and reconf
    assert reconf[-1]["new"]["batch_size_per_device"] < 32 and all(r["global_batch"] == 64 for r in reconf)
    assert events(run)[-1]["event"] == "finish"
    assert all(m["global_batch"] == 64 for m in metrics(run))


@pytest.mark.multiproc
def test_optimize_tunes_a_lora_fine_tune(tmp_path, tiny_model, chat_data, cache_env):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"model": {"name": str(tiny_model), "seq_len": 64}, "data": {"path": str(chat_data)},
                                    "fine_tune": {"mode": "lora"}, "dist": {"batch_size_per_device": 8}}))
    best = tmp_path / "best.yaml"
    out = cli("optimize", "--devices", "2", "--config", str(base), "--output", str(best), "--trial-steps", "3",
              "--memory-budget", "10MiB", env=cache_env, check=True, timeout=600).stdout
    assert "skipped (predicted over budget)" in out and "best:" in out
    chosen = TrainConfig.from_yaml(best)
    assert chosen.fine_tune.mode == "lora" and chosen.model.name == str(tiny_model)
    assert chosen.dist.global_batch_size == 16 and chosen.dist.batch_size_per_device < 8
