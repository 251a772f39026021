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


@pytest.fixture
def disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tmp_path / "disk"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], check=True, capture_output=True,
                   timeout=30)
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True, timeout=30)


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
