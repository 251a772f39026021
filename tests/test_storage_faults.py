"""Storage faults with real filesystems: a run directory on a tmpfs that fills up, and a checkpoint
directory remounted read-only. A checkpoint that cannot be written is an event and one clear line,
training goes on, the previous checkpoint stays intact, and resume never meets a half-written one."""

import os
import subprocess

import pytest

from helpers import TINY, cli, events, metrics, small_disk
from mlx_train.rank import checkpoint

pytestmark = pytest.mark.multiproc

BASE = [*TINY, "--devices", "2", "--steps", "40", "--log-every", "10", "--eval-every", "100", "--no-live"]


def _mount(*argv: str) -> None:
    subprocess.run(["mount", *argv], check=True, capture_output=True, timeout=30)


@pytest.fixture
def disk(tmp_path):
    with small_disk(tmp_path / "disk", "8m") as d:
        yield d


def _fill(disk, leave: int):
    st = os.statvfs(disk)
    filler = disk / "filler"
    with filler.open("wb") as fh:
        fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_unwritable_checkpoint_is_an_event_and_never_resumed_half_written(disk, fault):
    run = disk / "run"
    cli("train", *BASE, "--checkpoint-every", "10", "--stop-after", "10", "--run-dir", str(run), check=True)
    ckpts = run / "checkpoints"
    if fault == "disk full":
        undo = _fill(disk, leave=300 * 1024).unlink  # room for logs and events, not for a checkpoint
        want = "No space left on device (ENOSPC)"
    else:
        _mount("--bind", str(ckpts), str(ckpts))
        _mount("-o", "remount,bind,ro", str(ckpts))
        undo = lambda: subprocess.run(["umount", str(ckpts)], check=True, timeout=30)  # noqa: E731
        want = "Read-only file system (EROFS)"
    try:
        out = cli("train", "--resume", str(run), "--checkpoint-every", "10", "--stop-after", "30", check=True).stdout
    finally:
        undo()
    failed = events(run, "checkpoint_failed")
    assert [e["step"] for e in failed] == [20, 30], failed
    assert all(want in e["reason"] and "step-000010" in e["reason"] for e in failed), failed
    assert "checkpoint_failed: cannot write step-000020" in out and want in out
    assert metrics(run)[-1]["step"] == 30  # training went on past the failed interval
    assert events(run)[-1]["event"] == "stopped"
    assert [p.name for p in ckpts.iterdir()] == ["step-000010"]  # nothing half-written, not even a temporary
    assert checkpoint.verify(ckpts / "step-000010") is None
    cli("train", "--resume", str(run), check=True)
    assert events(run, "resume")[-1]["step"] == 10
    assert events(run)[-1]["event"] == "finish" and (ckpts / "step-000040").is_dir()
