"""The optimizer step's arithmetic: accumulation and the rank average give the same update as one
big batch (to float rounding), and precision / checkpointing change memory, not the maths."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_train.config import ModelConfig, OptimConfig
from mlx_train.rank.model import build_model
from mlx_train.rank.step import Stepper, _assign, make_optimizer

CFG = ModelConfig(n_layers=2, d_model=32, n_heads=2, seq_len=16)


def _stepper(precision="fp32", checkpoint=False):
    mx.random.seed(0)
    model, loss = build_model(CFG, grad_checkpoint=checkpoint)
    return Stepper(model, loss, make_optimizer(OptimConfig(warmup_steps=0), 10), precision, 1.0, None)


def _batch(n, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (n, CFG.seq_len + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def _params(s):
    return {k: np.array(v) for k, v in tree_flatten(s.params)}


def _close(a, b, atol):
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


def test_accumulation_matches_one_big_batch():
    x, y = _batch(8)
    big, acc = _stepper(), _stepper()
    s_big = big.step([(x, y)])
    s_acc = acc.step([(x[:4], y[:4]), (x[4:], y[4:])])
    assert s_big.loss == pytest.approx(s_acc.loss, abs=1e-5)
    assert s_big.grad_norm == pytest.approx(s_acc.grad_norm, rel=1e-4)
    _close(_params(big), _params(acc), atol=1e-6)


def test_checkpointing_changes_nothing_but_memory():
    x, y = _batch(4)
    plain, ckpt = _stepper(), _stepper(checkpoint=True)
    assert plain.step([(x, y)]).loss == pytest.approx(ckpt.step([(x, y)]).loss, abs=1e-6)
    _close(_params(plain), _params(ckpt), atol=1e-6)


def test_bf16_keeps_fp32_master_weights_and_trains():
    s = _stepper("bf16")
    x, y = _batch(8)
    first = s.step([(x, y)]).loss
    for _ in range(15):
        last = s.step([(x, y)]).loss
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(s.params))
    assert last < first - 0.5


def test_compiled_step_matches_the_uncompiled_one():
    x, y = _batch(8)
    compiled = _stepper()
    mx.random.seed(0)
    model, loss = build_model(CFG)
    eager = Stepper(model, loss, make_optimizer(OptimConfig(warmup_steps=0), 10), "fp32", 1.0, None, compile=False)
    for _ in range(3):
        a, b = compiled.step([(x[:4], y[:4]), (x[4:], y[4:])]), eager.step([(x[:4], y[:4]), (x[4:], y[4:])])
        assert a.loss == pytest.approx(b.loss, abs=1e-5)
    _close(_params(compiled), _params(eager), atol=1e-5)


def test_update_keeps_containers_that_hold_no_parameters():
    # A tree round trip through the all-reduce drops empty containers (mlx-lm's llama keeps a
    # `layer_types` list); the compiled update writes into the model's own tree and must skip them.
    kept = {"layer_types": [], "norm": {"weight": mx.zeros((2,))}}
    _assign(kept, {"norm": {"weight": mx.ones((2,))}})
    assert kept["layer_types"] == [] and kept["norm"]["weight"].tolist() == [1.0, 1.0]


def test_buckets_and_pieces_put_every_tensor_back_where_it_was():
    # Small buckets force everything the sync does: packing several tensors into one all_sum, a
    # tensor cut into even pieces and put back, and a bucket of mixed dtypes. On a group of one,
    # all_sum is the identity, so what comes back must be exactly what went in.
    from mlx_train.rank.step import sum_gradients

    rng = np.random.default_rng(0)
    tree = {"a": mx.array(rng.normal(size=(3, 5)).astype(np.float32)),
            "big": mx.array(rng.normal(size=(40, 7)).astype(np.float32)),
            "b": [mx.array(rng.normal(size=(4,)).astype(np.float32)), mx.array(np.arange(6, dtype=np.float16))]}
    group = mx.distributed.init()
    assert group.size() == 1
    for bucket in (64, 200, 10 ** 6):
        out = sum_gradients(tree, group, bucket_bytes=bucket)
        got, want = dict(tree_flatten(out)), dict(tree_flatten(tree))
        assert list(got) == list(want)
        for k in want:
            assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype
            np.testing.assert_array_equal(np.array(got[k]), np.array(want[k]), err_msg=f"{k} at bucket {bucket}")


def test_all_sum_size_follows_the_ring_backend_and_the_cores():
    from mlx_train.rank.step import BUCKET_BYTES, all_sum_bytes

    small = 3 * 2 ** 20
    one_direction = all_sum_bytes("ring", 2, 1, small)
    assert one_direction < 2 * 2 * 256 * 1024  # under the size MLX's ring sums in both directions
    assert all_sum_bytes("ring", 4, 1, small) < 2 * 4 * 256 * 1024
    # Enough cores, another backend, one rank, or a large gradient: the big buckets.
    for args in (("ring", 2, 8, small), ("mpi", 2, 1, small), ("ring", 1, 1, small), ("ring", 2, 1, 200 * 2 ** 20)):
        assert all_sum_bytes(*args) == BUCKET_BYTES, args


def test_clipping_folded_into_the_update_matches_clipping_first():
    # The clip is a factor inside each leaf's AdamW update (no clipped copy of the gradients): it
    # must give what clipping the gradients and then updating gives.
    import mlx.optimizers as optim

    x, y = _batch(8)
    mx.random.seed(0)
    model, loss = build_model(CFG)
    s = Stepper(model, loss, make_optimizer(OptimConfig(warmup_steps=0), 10), "fp32", 0.05, None)
    reference = make_optimizer(OptimConfig(warmup_steps=0), 10)
    reference.init(s.params)
    _, grads = s.grad_fn(s.params, mx.array(x), mx.array(y), mx.array(1.0))
    clipped, norm = optim.clip_grad_norm(grads, 0.05)
    expected = {k: np.array(v) for k, v in tree_flatten(reference.apply_gradients(clipped, s.params))}
    before = _params(s)
    stats = s.step([(x, y)])
    assert stats.grad_norm == pytest.approx(norm.item(), rel=1e-5) and stats.grad_norm > 0.05  # clipping engaged
    _close(_params(s), expected, atol=1e-6)
    assert any(not np.array_equal(before[k], expected[k]) for k in expected)
