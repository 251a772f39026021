"""A checkpoint of a sharded run survives the loss of rank 0's host with its disk (the checkpoint
mirror, rank/trainer.py find_stores): on the 3-host fleet with the run directory private to each
host, as on Macs without a shared disk, h1 (rank 0) is cut for good after a checkpoint and the run
resumes on h2 and h3 from the copy rank 1 wrote on h2, not from scratch, and finishes."""
from __future__ import annotations

import subprocess

import pytest

import fleet as fleet_tools
from helpers import FLEET_HOSTS, MLX_TRAIN, TINY, assert_ranks_gone, events, fleet_env, metrics, rank_pids, wait_for

pytestmark = pytest.mark.fleet

STEPS = 6
# Each write 2 s longer (a slow disk): a save waits for the one before it, so the run is still
# training when h1 is cut after the first checkpoint, and the relaunch has steps left to take.
SLOW = {"MLX_TRAIN_TEST_SLOW_WRITE": "2"}


def test_rank0s_host_lost_with_its_disk_resumes_from_the_mirror(fleet, cluster, corpus, tmp_path):
    run = tmp_path / "run"
    run.mkdir()  # empty (allowed), so that each host can mount its own disk there before the launch
    for h in FLEET_HOSTS:
        fleet_tools.run_in(h, ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(run)])
    argv = [MLX_TRAIN, "train", "--cluster", str(cluster), *TINY, "--data", str(corpus), "--run-dir", str(run),
            "--steps", str(STEPS), "--checkpoint-every", "2", "--log-every", "1", "--eval-every", "1000", "--no-live",
            "--shard", "full", "--min-devices", "2"]
    proc = subprocess.Popen(argv, env=fleet_env(fleet, **SLOW), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        try:
            # Rank 0's first checkpoint, on h1's disk (the mirror writes its copy on h2's beside it).
            wait_for(lambda: [e for e in events(run, "checkpoint") if "mirror" not in e], 120, "a checkpoint")
            fleet_tools.link_down("h1")
            out, _ = proc.communicate(timeout=300)
        finally:
            proc.kill()
            fleet_tools.link_up("h1")
        assert proc.returncode == 0, out[-3000:]
        assert events(run)[-1]["event"] == "finish", events(run)[-3:]
        resize = events(run, "resize")[0]
        assert resize["hosts"] == ["h2", "h3"] and resize["shard"] == "full", resize
        # Resumed on h2 from the mirror's copy (h1's disk is out of reach), not from scratch: that checkpoint,
        # or a newer one the mirror finished while the ranks waited for h1.
        resumed = events(run, "resume")[-1]
        assert resumed["step"] >= 2 and resumed.get("host") == "h2", resumed
        assert {e.get("mirror") for e in events(run, "checkpoint")} >= {"h2", "h3"}  # h2's copies, then h3's
        after = [m["step"] for m in metrics(run) if m["devices"] == 2]
        assert after == list(range(resumed["step"] + 1, STEPS + 1)), after
        assert_ranks_gone(rank_pids(run), timeout=90, what="a rank outlived the run (h1's, once its link is back)")
    finally:
        for h in FLEET_HOSTS:
            fleet_tools.run_in(h, ["umount", "-l", str(run)], check=False)
