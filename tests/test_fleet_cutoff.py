"""A rank cut off from its supervisor ends itself within a bound (issue 16): h3's link down for good
after the first checkpoint, the supervisor gives up, and the rank on h3, which no end of file can
reach across the partition, ends on the missing keepalive (controller/keepalive.py,
rank/lifeline.py); it is still gone once the link is back."""
from __future__ import annotations

import subprocess

import pytest

import fleet as fleet_tools
from helpers import events, is_worker, train_on_fleet, wait_for
from mlx_train.controller import keepalive
from mlx_train.rank import lifeline

pytestmark = pytest.mark.fleet

# The guardian notices the silence within one poll of the timeout; the margin is for a loaded machine.
BOUND_S = keepalive.TIMEOUT_S + lifeline.POLL_S + 10


def test_a_rank_cut_off_for_good_ends_itself(fleet, cluster, corpus, tmp_path):
    run = tmp_path / "run"
    proc = train_on_fleet(fleet, cluster, corpus, run, "--steps", "5000", "--checkpoint-every", "10",
                          "--stall-timeout", "10", "--max-restarts", "1", "--no-live", popen=True)
    h3 = []
    try:
        wait_for(lambda: events(run, "checkpoint"), 120, "the run's first checkpoint")
        h3 = [r["pid"] for r in events(run, "launch")[0]["ranks"] if r["host"] == "h3"]
        assert len(h3) == 1 and is_worker(h3[0])
        fleet_tools.link_down("h3")
        try:
            wait_for(lambda: not is_worker(h3[0]), BOUND_S, "the end of the rank cut off on h3")
            out, _ = proc.communicate(timeout=180)  # the supervisor gives up on its own, no hang
            assert proc.returncode not in (0, None), out[-3000:]
        finally:
            fleet_tools.link_up("h3")
        # The link carries packets again (a fresh session, no ControlMaster): anything the partition
        # kept alive would hear from its supervisor's side now; nothing of the run may be running there.
        wait_for(lambda: fleet.ssh("h3", "true", timeout=20).returncode == 0, 60, "h3 reachable again")
        h3 += [r["pid"] for e in events(run, "launch") for r in e["ranks"] if r["host"] == "h3"]
        assert not [p for p in h3 if is_worker(p)], "a rank on h3 came back to life with its link"
        # The fleet shares this machine's pid namespace: any rank of the run, of any attempt, shows here.
        left = subprocess.run(["pgrep", "-f", f"mlx_train.rank.worker .*--run-dir {run} "], capture_output=True,
                              text=True).stdout.split()
        assert not left, f"ranks of the run still running once h3's link is back: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        for pid in h3:
            if is_worker(pid):
                fleet.run_in("h3", ["kill", "-9", str(pid)], check=False)
