"""Every process accounted for: a SIGKILLed supervisor of a 3-host run leaves no rank behind on any
host, even ranks blocked in an all_sum behind a frozen peer, and `train --resume` then finishes."""
from __future__ import annotations

import signal
import subprocess

import pytest

from helpers import MLX_TRAIN, assert_ranks_gone, events, fleet_env, is_worker, train_on_fleet, wait_for

pytestmark = pytest.mark.fleet


def test_killed_supervisor_leaves_no_remote_rank(fleet, cluster, corpus, tmp_path):
    run = tmp_path / "run"
    proc = train_on_fleet(fleet, cluster, corpus, run, "--steps", "40", "--checkpoint-every", "10", "--no-live",
                          popen=True)
    ranks = []
    try:
        wait_for(lambda: events(run, "checkpoint"), 120, "the run's first checkpoint")
        ranks = events(run, "launch")[0]["ranks"]
        assert sorted(r["host"] for r in ranks) == ["h1", "h2", "h3"]
        # h2's rank frozen: h1's and h3's block in their next all_sum, where nothing they run can help.
        fleet.run_in("h2", ["kill", "-STOP", str(ranks[1]["pid"])], check=True)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert_ranks_gone([r["pid"] for r in ranks], timeout=30, what="a remote rank outlived its SIGKILLed supervisor")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        for r in ranks:
            if is_worker(r["pid"]):
                fleet.run_in(r["host"], ["kill", "-9", str(r["pid"])], check=False)
    res = subprocess.run([MLX_TRAIN, "train", "--cluster", str(cluster), "--resume", str(run), "--no-live"],
                         env=fleet_env(fleet), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert events(run, "resume")[-1]["step"] >= 10 and events(run)[-1]["event"] == "finish"
