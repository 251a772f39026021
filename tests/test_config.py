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
