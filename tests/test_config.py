import pytest

from mlx_train import DistributedConfig, TrainConfig
from mlx_train.config import ModelConfig, from_dict


def test_guide_example_and_global_batch():
    cfg = DistributedConfig(num_devices=4, batch_size_per_device=32, gradient_accumulation=4)
    assert cfg.global_batch_size == 4 * 32 * 4


@pytest.mark.parametrize("kwargs, fragment", [
    ({"batch_size_per_device": 0}, "batch_size_per_device must be a positive integer"),
    ({"gradient_accumulation": -1}, "gradient_accumulation must be a positive integer"),
    ({"num_devices": 2.5}, "num_devices must be a positive integer"),
    ({"backend": "tcp"}, "backend must be one of ring, mpi, any"),
    ({"num_devices": 2, "shares": "3,1,1"}, "shares gives 3 weights for 2 devices"),
    ({"num_devices": 2, "shares": "3,0"}, "shares must be 'equal', 'auto' or positive weights"),
    ({"num_devices": 2, "shares": "fast,slow"}, "shares must be 'equal', 'auto' or positive weights"),
])
def test_distributed_config_rejects(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        DistributedConfig(**kwargs)


def test_model_config_heads_divide_width():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        ModelConfig(d_model=100, n_heads=3)


def test_yaml_round_trip(tmp_path):
    cfg = DistributedConfig(num_devices=3, batch_size_per_device=5, gradient_accumulation=2, backend="mpi")
    path = tmp_path / "dist.yaml"
    cfg.to_yaml(path)
    assert DistributedConfig.from_yaml(path) == cfg
    full = TrainConfig(dist=cfg, precision="bf16", grad_checkpoint=True, steps=7)
    full.to_yaml(tmp_path / "full.yaml")
    assert TrainConfig.from_yaml(tmp_path / "full.yaml") == full


def test_unknown_key_and_wrong_type_are_named():
    with pytest.raises(ValueError, match="unknown key 'batch' in config.dist"):
        from_dict(TrainConfig, {"dist": {"batch": 3}})
    with pytest.raises(ValueError, match="config.steps must be int"):
        from_dict(TrainConfig, {"steps": "many"})


def test_corrupt_and_missing_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dist: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        TrainConfig.from_yaml(bad)
    with pytest.raises(ValueError, match="does not exist"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")


def test_identity_ignores_the_split_of_the_global_batch():
    a = TrainConfig(dist=DistributedConfig(2, 8, 1))
    b = TrainConfig(dist=DistributedConfig(2, 4, 2), grad_checkpoint=True)
    c = TrainConfig(dist=DistributedConfig(2, 4, 1))
    assert a.identity() == b.identity()
    assert a.identity() != c.identity()


# Resolution: flags beat the config file (or the resumed run's config.yaml), which beats the defaults.

def _resolve(argv, **opts):
    from mlx_train.cli import options
    from mlx_train.cli.main import build_parser
    from mlx_train.config import RunOptions
    from mlx_train.controller.run import resolve_config

    a = build_parser().parse_args(["train", *argv])
    run_opts = options.build(a, RunOptions)
    return resolve_config(options.given(a, TrainConfig), run_opts), run_opts


def test_flag_beats_file_beats_default(tmp_path):
    f = tmp_path / "train.yaml"
    f.write_text("steps: 77\nmodel: {n_layers: 3}\ndist: {batch_size_per_device: 5}\n")
    cfg, _ = _resolve(["--config", str(f), "--batch-size", "6", "--memory-budget", "1GiB"])
    assert cfg.dist.batch_size_per_device == 6          # flag over file
    assert cfg.steps == 77 and cfg.model.n_layers == 3   # file over default
    assert cfg.model.d_model == TrainConfig().model.d_model and cfg.optim == TrainConfig().optim  # defaults
    assert cfg.memory_budget == 2**30
    assert _resolve([])[0] == TrainConfig()


def test_resume_reads_the_runs_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    TrainConfig(steps=12, seed=4, model=ModelConfig(n_layers=2, d_model=64, n_heads=2)).to_yaml(run / "config.yaml")
    other = tmp_path / "other.yaml"
    other.write_text("steps: 999\n")
    cfg, opts = _resolve(["--resume", str(run), "--config", str(other), "--batch-size", "3"])
    assert opts.resume == str(run)
    assert (cfg.steps, cfg.seed, cfg.model.d_model) == (12, 4, 64)  # the run's, not --config's nor defaults
    assert cfg.dist.batch_size_per_device == 3


def test_config_is_frozen_and_changed_by_replace_which_checks():
    import dataclasses

    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        dataclasses.replace(cfg, steps=0)


def test_trusted_rebuilds_without_checks_what_the_controller_checked():
    cfg = TrainConfig(steps=9, dist=DistributedConfig(2, 4, 3))
    assert TrainConfig.trusted(cfg.to_dict()) == cfg
    # No checks run again: the rank takes the controller's word for it.
    assert TrainConfig.trusted({**cfg.to_dict(), "steps": 0}).steps == 0


def test_every_flag_comes_from_a_field():
    from mlx_train.cli.options import flagged_fields
    from mlx_train.config import RunOptions

    flags = {f.metadata["flag"] for cls in (TrainConfig, RunOptions) for _, f, _ in flagged_fields(cls)}
    assert flags == {"--devices", "--distributed", "--cluster", "--backend", "--model", "--layers", "--width",
                     "--heads", "--seq-len", "--data", "--batch-size", "--accumulation", "--link-gbps", "--steps", "--lr",
                     "--warmup", "--precision", "--grad-checkpoint", "--seed", "--loss-spike", "--optimize-memory",
                     "--memory-budget", "--config", "--run-dir", "--resume", "--log-every", "--eval-every",
                     "--checkpoint-every", "--keep-checkpoints", "--max-restarts", "--stall-timeout",
                     "--stop-after", "--no-live", "--rank-wrapper", "--min-devices", "--max-devices",
                     # pretrained models (docs/fine_tuning.md)
                     "--val-fraction", "--mask-prompt", "--packing", "--fine-tune", "--lora-rank", "--lora-scale",
                     "--lora-dropout", "--lora-layers", "--lora-keys",
                     # experiment tracking (controller/reporting.py)
                     "--report-to",
                     # the model and data copied to the hosts (docs/fleet.md)
                     "--ship-cache", "--ship-cache-days",
                     # a CPU rank's micro-batch across threads (rank/lanes.py)
                     "--cpu-threads",
                     # the training state split over the ranks (docs/sharding.md)
                     "--shard",
                     # each rank's share of the global batch (docs/advanced_training.md)
                     "--shares",
                     # layers across hosts: a training pipeline (docs/pipeline.md)
                     "--pipeline-stages"}


def test_run_options_from_flags():
    _, opts = _resolve(["--no-live", "--max-restarts", "0", "--stall-timeout", "8", "--distributed"])
    assert (opts.live, opts.max_restarts, opts.stall_timeout, opts.distributed) == (False, 0, 8.0, True)
    _, opts = _resolve([])
    from mlx_train.config import RunOptions

    assert opts == RunOptions() and opts.live is None and opts.max_restarts == 3
