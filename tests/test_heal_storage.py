"""Adapters (rank/hf.py write_adapters) on storage that refuses them: a tmpfs too small, a read-only
bind mount. The failure is checkpoint.WriteFailed, as for a checkpoint (the trainer turns it into
the checkpoint_failed event), with the cause named; adapters already there stay as they were and
no temporary directory is left."""

import os
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from mlx_train.rank import checkpoint, hf

from helpers import small_disk


@pytest.fixture
def disk(tmp_path):
    with small_disk(tmp_path / "disk", "1m") as d:
        yield d


def _params(n):
    return {"layers": [{"lora_a": mx.ones((n, 8)), "lora_b": mx.zeros((8, n))}]}


@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_unwritable_adapters_fail_as_a_checkpoint_does_and_keep_the_old_ones(disk, fault):
    out = disk / "adapters"
    hf.write_adapters(out, _params(16), {"rank": 8})
    before = np.array(mx.load(str(out / hf.ADAPTER_WEIGHTS))["layers.0.lora_a"])
    if fault == "disk full":
        params, want = _params(64 * 1024), "No space left on device (ENOSPC)"  # 4 MiB into 1 MiB
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True, timeout=30)
        params, want = _params(16), "Read-only file system (EROFS)"
    with pytest.raises(checkpoint.WriteFailed) as exc:
        hf.write_adapters(out, params, {"rank": 8})
    assert f"cannot write adapters to {out}" in str(exc.value) and want in str(exc.value), exc.value
    assert sorted(p.name for p in disk.iterdir()) == ["adapters"]  # no temporary left behind
    after = mx.load(str(out / hf.ADAPTER_WEIGHTS))["layers.0.lora_a"]
    assert np.array_equal(before, np.array(after))


@pytest.fixture
def disk8m(tmp_path):
    with small_disk(tmp_path / "disk8m", "8m") as d:
        yield d


def _bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.multiproc
def test_a_run_whose_adapters_cannot_be_written_goes_on(disk8m, tiny_model, chat_data, tmp_path):
    """A LoRA run on a full disk with room for its next checkpoint but not for the run's adapters
    beside it: checkpoint_failed names the adapters and the cause, the checkpoint itself is written,
    the previous adapters stay, and the next interval writes them again."""
    from helpers import cli, events

    run, env = disk8m / "run", {"MLX_TRAIN_CACHE": str(tmp_path / "cache")}
    cli("train", "--model", str(tiny_model), "--data", str(chat_data), "--seq-len", "64", "--batch-size", "4",
        "--fine-tune", "lora", "--lora-layers", "-1", "--lora-rank", "64", "--steps", "12", "--checkpoint-every", "4",
        "--log-every", "4", "--no-live", "--stop-after", "4", "--run-dir", str(run), env=env, check=True, timeout=600)
    first = run / "checkpoints" / "step-000004"
    adapters = _bytes(run / "adapters")
    assert adapters > 400 * 1024  # rank 64: well above the room left over below
    st = os.statvfs(disk8m)
    filler = disk8m / "filler"
    with filler.open("wb") as fh:  # room for one more checkpoint (with its adapters) and logs, not for more
        fh.write(b"\0" * (st.f_bavail * st.f_frsize - _bytes(first) - 200 * 1024))
    try:
        cli("train", "--resume", str(run), "--stop-after", "8", env=env, check=True, timeout=600)
    finally:
        filler.unlink()
    failed = events(run, "checkpoint_failed")
    assert [e["step"] for e in failed] == [8], failed
    assert "adapters not written" in failed[0]["reason"] and "(ENOSPC)" in failed[0]["reason"], failed
    assert events(run, "checkpoint")[-1]["step"] == 8 and checkpoint.verify(run / "checkpoints" / "step-000008") is None
    assert not [p.name for p in run.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    old = mx.load(str(first / "adapters" / hf.ADAPTER_WEIGHTS))
    kept = mx.load(str(run / "adapters" / hf.ADAPTER_WEIGHTS))
    assert all(np.array_equal(np.array(old[k]), np.array(kept[k])) for k in old)  # step 4's, intact
    cli("train", "--resume", str(run), env=env, check=True, timeout=600)
    new = mx.load(str(run / "adapters" / hf.ADAPTER_WEIGHTS))
    last = mx.load(str(run / "checkpoints" / "step-000012" / "adapters" / hf.ADAPTER_WEIGHTS))
    assert all(np.array_equal(np.array(new[k]), np.array(last[k])) for k in new)
    assert events(run)[-1]["event"] == "finish"


@pytest.mark.multiproc
def test_a_write_slower_than_the_checkpoint_interval_is_no_stall(tmp_path):
    """Each write takes 12 s more (MLX_TRAIN_TEST_SLOW_WRITE), longer than the watchdog's 10 s
    floor and than the steps between checkpoints: rank 0's wait for the previous write is announced
    and allowed for (120 s until a write was timed, then 5 x the writes' own times), so the run
    finishes without a stall and every checkpoint lands."""
    from helpers import TINY, cli, events

    run = tmp_path / "slow"
    cli("train", *TINY, "--devices", "2", "--steps", "6", "--checkpoint-every", "2", "--log-every", "1",
        "--eval-every", "100", "--max-restarts", "0", "--run-dir", str(run), "--no-live",
        env={"MLX_TRAIN_TEST_SLOW_WRITE": "12"}, check=True, timeout=300)
    assert not events(run, "stall") and not events(run, "restart")
    done = events(run, "checkpoint")
    assert [e["step"] for e in done] == [2, 4, 6] and all(e["write_s"] >= 12 for e in done), done
    assert events(run)[-1]["event"] == "finish"
