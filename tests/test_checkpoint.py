import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest

from helpers import TINY, cli
from mlx_train.config import TrainConfig
from mlx_train.rank import checkpoint


def _arrays(seed):
    mx.random.seed(seed)
    return {"w": mx.random.normal((4, 3)), "b": mx.zeros((3,))}, {"w.m": mx.ones((4, 3)), "step": mx.array(7, dtype=mx.uint64)}


def test_round_trip_is_exact(tmp_path):
    model, opt = _arrays(0)
    checkpoint.save(tmp_path, 10, model, opt, meta={"identity": {"seed": 3}})
    got = checkpoint.load_latest(tmp_path).checkpoint
    assert got.step == 10 and got.meta == {"identity": {"seed": 3}}
    for k in model:
        assert np.array_equal(np.array(got.model[k]), np.array(model[k]))
    assert int(got.optimizer["step"].item()) == 7 and sorted(got.optimizer) == sorted(opt)


def test_identity_mismatch_names_what_differs():
    cfg = TrainConfig()
    same = {"identity": json.loads(json.dumps(cfg.identity()))}
    assert checkpoint.identity_mismatch(same, cfg.identity()) == 0
    other = dataclasses.replace(cfg, seed=cfg.seed + 1, steps=cfg.steps + 1)
    mask = checkpoint.identity_mismatch(same, other.identity())
    assert checkpoint.describe_mismatch(mask, other.identity()) == "seed, steps differ"
    assert checkpoint.identity_mismatch({}, cfg.identity()) == checkpoint.NO_IDENTITY


@pytest.mark.multiproc
def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    run = tmp_path / "run"
    cli("train", *TINY, "--devices", "2", "--steps", "20", "--checkpoint-every", "10", "--stop-after", "10",
        "--run-dir", str(run), check=True)
    manifest = run / "checkpoints" / "step-000010" / "manifest.json"
    body = json.loads(manifest.read_text())
    body["meta"]["identity"]["seed"] += 1  # as if copied in from a run with another seed
    manifest.write_text(json.dumps(body))
    proc = cli("train", "--resume", str(run))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "step-000010 belongs to a different run (seed differs)" in proc.stdout + proc.stderr
    assert not (run / "checkpoints" / "step-000020").exists()


def test_keeps_the_newest_k(tmp_path):
    model, opt = _arrays(0)
    for step in (1, 2, 3, 4, 5):
        checkpoint.save(tmp_path, step, model, opt, keep=2)
    assert [p.name for p in checkpoint.list_steps(tmp_path)] == ["step-000004", "step-000005"]


def test_damaged_newest_falls_back_to_the_previous(tmp_path):
    model, opt = _arrays(0)
    checkpoint.save(tmp_path, 1, model, opt)
    newest = checkpoint.save(tmp_path, 2, *_arrays(1))
    blob = newest / "model.safetensors"
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0xFF
    blob.write_bytes(bytes(data))
    result = checkpoint.load_latest(tmp_path)
    assert result.checkpoint.step == 1
    assert result.skipped == [(str(newest), "model.safetensors checksum mismatch")]


def test_a_format_1_checkpoint_with_sha256_digests_still_loads_and_is_still_verified(tmp_path):
    # Checkpoints written before format 2 (CRC32) name sha256 digests: a resume keeps reading them.
    model, opt = _arrays(0)
    old = checkpoint.save(tmp_path, 1, model, opt)
    manifest = json.loads((old / "manifest.json").read_text())
    assert all(d.startswith("crc32:") for d in manifest["files"].values())
    manifest["format"] = 1
    manifest["files"] = {name: checkpoint.sha256_file(old / name) for name in manifest["files"]}
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert checkpoint.load_latest(tmp_path).checkpoint.step == 1
    blob = old / "optimizer.safetensors"
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0x01
    blob.write_bytes(bytes(data))
    assert checkpoint.verify(old) == "optimizer.safetensors checksum mismatch"


def test_missing_manifest_and_half_written_dirs_are_ignored(tmp_path):
    model, opt = _arrays(0)
    checkpoint.save(tmp_path, 1, model, opt)
    newest = checkpoint.save(tmp_path, 2, model, opt)
    (newest / "manifest.json").unlink()
    (tmp_path / ".tmp-step-000003-999").mkdir()  # a crash mid-write
    result = checkpoint.load_latest(tmp_path)
    assert result.checkpoint.step == 1 and "manifest unreadable" in result.skipped[0][1]
    assert json.loads((tmp_path / "step-000001" / "manifest.json").read_text())["format"] == checkpoint.FORMAT
    checkpoint.remove_temporaries(tmp_path)  # at restore: what a write cut short left goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001", "step-000002"]


def test_a_background_write_holds_the_state_of_its_step(tmp_path):
    """The trainer snapshots and writes beside the training loop: the file holds the weights of the
    step it was taken at, however many steps ran meanwhile; a failed write comes back as WriteFailed."""
    from mlx.utils import tree_flatten

    from mlx_train.config import ModelConfig, OptimConfig
    from mlx_train.rank.model import build_model
    from mlx_train.rank.step import Stepper, make_optimizer

    mx.random.seed(0)
    model, loss = build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2, seq_len=16))
    stepper = Stepper(model, loss, make_optimizer(OptimConfig(warmup_steps=0), 10), "fp32", 1.0, None)
    tokens = np.random.default_rng(0).integers(0, 256, (4, 17)).astype(np.int32)
    stepper.step([(tokens[:, :-1], tokens[:, 1:])])
    before = {k: np.array(v) for k, v in tree_flatten(stepper.params)}
    params = checkpoint.snapshot(dict(tree_flatten(stepper.params)))
    state = checkpoint.snapshot(dict(tree_flatten(stepper.optimizer.state)))
    writer = checkpoint.Writer()
    writer.start(lambda: checkpoint.save(tmp_path, 1, params, state))
    assert writer.busy
    for _ in range(3):  # training goes on beside the write
        stepper.step([(tokens[:, :-1], tokens[:, 1:])])
    path, seconds = writer.finish()
    assert path == tmp_path / "step-000001" and seconds > 0 and not writer.busy
    got = checkpoint.load_latest(tmp_path).checkpoint
    assert all(np.array_equal(before[k], np.array(got.model[k])) for k in before)
    assert any(not np.array_equal(before[k], np.array(v)) for k, v in tree_flatten(stepper.params))
    (tmp_path / "a-file").write_text("not a directory")
    writer.start(lambda: checkpoint.save(tmp_path / "a-file", 2, params, state))
    failed, _ = writer.finish()
    assert isinstance(failed, checkpoint.WriteFailed) and "a-file" in str(failed)
    assert writer.finish() is None


def test_a_streamed_checkpoint_is_mlx_s_file_byte_for_byte_whatever_order_the_pieces_come_in(tmp_path):
    """A checkpoint written piece by piece (checkpoint.Stream: the header from the layouts first,
    each array at its place as it comes) is the file mx.save_safetensors writes, byte for byte,
    however many keys and dtypes, pieces in any order; a piece that never comes fails the write;
    the adapters copied from it are hf.write_adapters' file from the arrays."""
    from mlx_train.rank import hf

    mx.random.seed(1)
    model = {f"layers.{i}.{n}": mx.random.normal((3 + i, 5)) for i in range(12) for n in ("attn.wq", "mlp.w1", "b")}
    model["embed"] = mx.random.normal((9, 4)).astype(mx.bfloat16)
    opt = {"step": mx.array(7, dtype=mx.uint64), "learning_rate": mx.array(3e-4),
           **{f"{k}.{m}": v * 2 for k, v in model.items() for m in ("m", "v")}}
    layouts = {name: checkpoint.file_layout(checkpoint.specs(tree))
               for name, tree in (("model", model), ("optimizer", opt))}
    stream = checkpoint.Stream(tmp_path / "ck", 4, layouts)
    for name, tree in (("optimizer", opt), ("model", model)):
        keys = list(tree)[::-1]  # not the layout's order, and in three pieces
        for part in (keys[:5], keys[5:20], keys[20:]):
            stream.put(name, [(k, tree[k]) for k in part])
    path = stream.close({"agreed": True}, keep=3)
    for name, tree in (("model", model), ("optimizer", opt)):
        mx.save_safetensors(str(tmp_path / f"{name}.safetensors"), tree)
        assert (path / f"{name}.safetensors").read_bytes() == (tmp_path / f"{name}.safetensors").read_bytes(), name
    assert checkpoint.verify(path) is None
    config = {"fine_tune_type": "lora"}
    hf.write_adapters(tmp_path / "from-arrays", model, config)
    hf.write_adapters(tmp_path / "copied", None, config, weights=path / "model.safetensors")
    assert (tmp_path / "copied" / hf.ADAPTER_WEIGHTS).read_bytes() == \
        (tmp_path / "from-arrays" / hf.ADAPTER_WEIGHTS).read_bytes()

    short = checkpoint.Stream(tmp_path / "ck", 5, layouts)
    short.put("model", model.items())
    short.put("optimizer", [(k, v) for k, v in opt.items() if k != "step"])
    with pytest.raises(RuntimeError, match="no piece held step"):
        short.close({}, keep=3)
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["step-000004"]  # nothing of step 5 left


def test_a_handoff_has_one_piece_in_flight_and_a_writer_that_failed_still_takes_every_piece():
    """checkpoint.Handoff: `give` returns once the writer is done with the previous piece (so the
    training thread holds at most that one and the next); a writer that failed goes on taking the
    pieces to the end, so a sharded save never waits for ever on it."""
    for fails in (False, True):
        handoff, taken = checkpoint.Handoff(), []

        def job():
            for piece in handoff.pieces():
                taken.append(piece)
            if fails:
                raise checkpoint.WriteFailed("disk full")
            return handoff.meta

        writer = checkpoint.Writer()
        writer.start(job)
        try:
            for i in range(5):
                handoff.give(i)
                assert taken[:i] == list(range(i))  # every earlier piece was taken before this one was given
        finally:  # the writer thread ends whatever happened
            handoff.end({"agreed": True})
            outcome, _ = writer.finish()
        assert taken == list(range(5)) and handoff.held == 4
        assert isinstance(outcome, checkpoint.WriteFailed) if fails else outcome == {"agreed": True}
