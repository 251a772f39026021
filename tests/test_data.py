import json
import re

import numpy as np
import pytest

from mlx_train.config import DataConfig, DistributedConfig
from mlx_train.rank.batcher import Batcher
from mlx_train.rank.data import load_corpus
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


# -- JSONL data for pretrained models (rank/token_data.py), with the tiny llama's tokenizer ----------
def _token_corpus(model_dir, data_dir, **kw):
    from mlx_train.rank.token_data import load_token_corpus

    return load_token_corpus(DataConfig(data_dir and str(data_dir), **kw), model_dir)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_packed_rows_learn_every_token_once_and_mask_padding(tiny_model, chat_data, token_cache):
    c = _token_corpus(tiny_model, chat_data)
    b = c.batcher("train", 32, seed=0)
    assert b.rows.shape == (b.n_windows, 33)
    targets = np.concatenate([np.where(b.learn[i, 1:], b.rows[i, 1:], -1) for i in range(b.n_windows)])
    learned = targets[targets >= 0]
    # Row r predicts tokens r*32+1 .. r*32+32: the stream after its first token, each once, padding never.
    assert np.array_equal(learned, c.train.tokens[1:][c.train.learn[1:]])
    assert (targets[len(c.train.tokens) - 1:] == -1).all()
    dist = DistributedConfig(2, 3, 2)
    total = sum(int((b.batch(5, m, r, dist)[1] >= 0).sum()) for m in range(2) for r in range(2))
    assert b.tokens_in_step(5, dist) == total < dist.global_batch_size * 32 + 1


def test_padded_rows_hold_one_example_each(tiny_model, chat_data, token_cache):
    c = _token_corpus(tiny_model, chat_data, packing="pad")
    b = c.batcher("train", 40, seed=0)
    assert b.n_windows == len(c.train) == 200
    first = c.train.tokens[c.train.starts[0]:c.train.starts[1]]
    assert np.array_equal(b.rows[0, :len(first)], first) and (b.rows[0, len(first):] == c.pad_id).all()
    x, y = b.batch(0, 0, 0, DistributedConfig(1, 4, 1))
    assert x.shape == y.shape == (4, 40) and (y == -1).any()


def test_mask_prompt_learns_only_the_reply(tiny_model, chat_data, token_cache):
    from mlx_train.rank.hf import load_tokenizer

    tok = load_tokenizer(tiny_model)
    full = _token_corpus(tiny_model, chat_data).train
    masked = _token_corpus(tiny_model, chat_data, mask_prompt=True).train
    assert np.array_equal(full.tokens, masked.tokens) and full.learn.all()
    first = slice(masked.starts[0], masked.starts[1])
    assert tok.decode(masked.tokens[first][masked.learn[first]].tolist()).startswith("the box is")
    assert 0 < masked.learn.sum() < len(masked.learn) / 2


def test_text_and_completion_formats_and_the_validation_split(tmp_path, tiny_model, token_cache):
    d = tmp_path / "d"
    d.mkdir()
    _write(d / "train.jsonl", [{"text": f"line {i}"} for i in range(10)] +
           [{"prompt": "p?", "completion": f"answer {i}"} for i in range(10)])
    c = _token_corpus(tiny_model, d, val_fraction=0.1)
    assert len(c.train) == 18 and len(c.val) == 2  # no valid.jsonl: the last 10% validates
    assert c.vocab_size == 512


def test_tokenized_once_then_read_from_the_cache(tmp_path, tiny_model, chat_data, token_cache):
    from mlx_train.rank.token_data import encode_file, tokenizer_digest

    digest = tokenizer_digest(tiny_model)
    first = _token_corpus(tiny_model, chat_data).train
    assert len(list((token_cache / "tokens").glob("*.npz"))) == 2  # train and valid
    again = encode_file(chat_data / "train.jsonl", None, digest, False)  # no tokenizer: must come from the cache
    assert np.array_equal(again.tokens, first.tokens) and np.array_equal(again.starts, first.starts)
    changed = tmp_path / "train.jsonl"
    _write(changed, [{"text": "other data"}])
    with pytest.raises(AttributeError):  # other content, another key: it tokenizes (and here has no tokenizer)
        encode_file(changed, None, digest, False)


@pytest.mark.parametrize("line, fragment", [
    ('{"question": "q"}', "train.jsonl:2 has none of the known keys (found: question)"),
    ("[1, 2]", "train.jsonl:2 has none of the known keys"),
    ("{broken", "train.jsonl:2 is not valid JSON"),
    ('{"messages": "hi"}', "train.jsonl:2 has none of the known keys (found: messages)"),
])
def test_bad_lines_name_file_and_line(tmp_path, tiny_model, token_cache, line, fragment):
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.jsonl").write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(UserError, match=re.escape(fragment)):
        _token_corpus(tiny_model, d)


def test_a_data_dir_needs_train_jsonl(tmp_path, tiny_model):
    with pytest.raises(UserError, match="has no train.jsonl"):
        _token_corpus(tiny_model, tmp_path)
    with pytest.raises(UserError, match="needs --data"):
        _token_corpus(tiny_model, None)


def test_the_builtin_gpt_reads_a_jsonl_folder_as_bytes(tmp_path, chat_data):
    c = load_corpus(DataConfig(str(chat_data)))
    assert c.vocab_size == 256 and b"user: what colour is the" in c.train.tobytes()
    assert b"assistant: the box is" in c.val.tobytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"text": "ok"}\n{"q": 1}\n')
    with pytest.raises(UserError, match=re.escape(f"{bad / 'train.jsonl'}:2 has none of the known keys")):
        load_corpus(DataConfig(str(bad)))
