import json

import numpy as np
import pytest

from mlx_train.config import DataConfig, DistributedConfig
from mlx_train.rank.data import Batcher, load_corpus
from mlx_train.errors import UserError


def _all_ids(b, step, dist):
    return {(m, r): b.window_ids(step, m, r, dist) for m in range(dist.gradient_accumulation)
            for r in range(dist.num_devices)}


def test_shards_are_disjoint_and_cover_the_global_batch():
    b = Batcher(np.arange(10_000) % 256, seq_len=16, seed=3)
    dist = DistributedConfig(num_devices=4, batch_size_per_device=5, gradient_accumulation=3)
    for step in (0, 1, 57):
        ids = np.concatenate(list(_all_ids(b, step, dist).values()))
        assert len(ids) == dist.global_batch_size
        assert len(set(ids.tolist())) == len(ids), "two shards share a sequence"


def test_shards_are_deterministic_and_independent_of_the_split():
    dist_a = DistributedConfig(num_devices=2, batch_size_per_device=8, gradient_accumulation=1)
    dist_b = DistributedConfig(num_devices=2, batch_size_per_device=2, gradient_accumulation=4)
    a = Batcher(np.arange(50_000) % 256, 32, seed=1)
    b = Batcher(np.arange(50_000) % 256, 32, seed=1)
    for step in (0, 5):
        ids_a = np.concatenate(list(_all_ids(a, step, dist_a).values()))
        ids_b = np.concatenate(list(_all_ids(b, step, dist_b).values()))
        assert sorted(ids_a.tolist()) == sorted(ids_b.tolist())
    assert np.array_equal(a.window_ids(3, 0, 1, dist_a), Batcher(np.arange(50_000) % 256, 32, 1).window_ids(3, 0, 1, dist_a))
    assert not np.array_equal(a.window_ids(3, 0, 1, dist_a), Batcher(np.arange(50_000) % 256, 32, 2).window_ids(3, 0, 1, dist_a))


def test_epochs_wrap_with_a_new_order():
    b = Batcher(np.arange(16 * 10 + 1) % 256, 16, seed=0)  # 10 windows
    dist = DistributedConfig(1, 5, 1)
    first = np.concatenate([b.window_ids(0, 0, 0, dist), b.window_ids(1, 0, 0, dist)])
    assert sorted(first.tolist()) == list(range(10))
    second = np.concatenate([b.window_ids(2, 0, 0, dist), b.window_ids(3, 0, 0, dist)])
    assert sorted(second.tolist()) == list(range(10)) and not np.array_equal(first, second)


def test_targets_are_inputs_shifted():
    b = Batcher(np.arange(1000) % 256, 8, seed=0)
    x, y = b.batch(0, 0, 0, DistributedConfig(1, 3, 1))
    assert x.shape == y.shape == (3, 8)
    assert np.array_equal(x[:, 1:], y[:, :-1])


def test_stdlib_corpus_split_is_deterministic_and_disjoint():
    a, b = load_corpus(DataConfig()), load_corpus(DataConfig())
    assert np.array_equal(a.val, b.val) and len(a.train) > 1_000_000 and len(a.val) > 10_000
    assert a.vocab_size == 256


def test_user_data_formats(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello world " * 200)
    (tmp_path / "docs" / "b.md").write_text("more text " * 200)
    assert len(load_corpus(DataConfig(str(tmp_path / "docs"))).train) > 3000
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"doc {i} " * 50}) for i in range(20)))
    assert load_corpus(DataConfig(str(jl))).train.dtype == np.uint8
    npy = tmp_path / "ids.npy"
    np.save(npy, np.arange(5000) % 1000)
    c = load_corpus(DataConfig(str(npy)))
    assert c.vocab_size == 1000 and len(c.train) + len(c.val) == 5000


@pytest.mark.parametrize("content, fragment", [
    ('{"txt": "x"}\n', "'text' field"),
    ("not json\n", "'text' field"),
])
def test_bad_jsonl(tmp_path, content, fragment):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(UserError, match=fragment):
        load_corpus(DataConfig(str(p)))


def test_missing_path_and_too_little_data(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_corpus(DataConfig(str(tmp_path / "nope")))
    with pytest.raises(UserError, match="fewer than one global batch"):
        Batcher(np.arange(100), 16, 0).require(64, "one global batch")
