"""Elastic membership on the 3-host fleet: h3's link down with --min-devices 2 -> h3 excluded, and
once it is back, re-admitted at a checkpoint. A host lost for good (excluded, the run resized to
the 2 left with the same global batch, ending on the uninterrupted run's weights) is
tests/test_fleet_sharding.py's, at --shard full, where the resize also re-shards."""
from __future__ import annotations

import signal

import pytest

import fleet as fleet_tools
from helpers import assert_ranks_gone, events, rank_pids, train_on_fleet, wait_for

pytestmark = pytest.mark.fleet


def _three_hosts_since(run) -> float:
    """When the run was last launched on all 3 hosts after a re-admission (inf: not yet)."""
    readmit = events(run, "readmit")
    launches = [e for e in events(run, "launch") if readmit and e["time"] > readmit[0]["time"]
                and sorted(r["host"] for r in e["ranks"]) == ["h1", "h2", "h3"]]
    return launches[0]["time"] if launches else float("inf")


def test_host_back_is_readmitted_at_a_checkpoint(fleet, cluster, corpus, tmp_path):
    run = tmp_path / "readmit"
    proc = train_on_fleet(fleet, cluster, corpus, run, "--steps", "600", "--checkpoint-every", "20", "--log-every", "20",
                          "--eval-every", "1000", "--no-live", "--min-devices", "2", popen=True)
    try:
        wait_for(lambda: events(run, "checkpoint"), 120, "the first checkpoint")
        fleet_tools.link_down("h3")
        try:
            wait_for(lambda: events(run, "exclude"), 120, "h3's exclusion")
        finally:
            fleet_tools.link_up("h3")
        wait_for(lambda: events(run, "readmit"), 180, "h3's re-admission")
        # Back on 3 hosts and making progress there: the property is shown, so the rest of the 600 steps
        # would only cost time. Ctrl-C ends it as a user would (every rank stopped, exit 130).
        wait_for(lambda: [e for e in events(run, "checkpoint") if e["time"] > _three_hosts_since(run)], 120,
                 "a checkpoint after the relaunch on 3 hosts")
    except BaseException:
        proc.kill()
        raise
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-3000:]
    assert events(run)[-1]["event"] == "interrupted", events(run)[-3:]
    kinds = [e["event"] for e in events(run)]
    assert kinds.index("exclude") < kinds.index("readmit"), kinds
    readmit = events(run, "readmit")[0]
    assert readmit["host"] == "h3"
    # Re-admitted at a checkpoint and relaunched from it, or from a newer one: rank 0 writes in the
    # background and finishes the write in progress when stopped, so the checkpoint that triggered
    # the re-admission may already have a successor. No step of progress is lost either way.
    restart = [e for e in events(run, "restart") if e["time"] <= readmit["time"]][-1]
    at = int(restart["reason"].rsplit("checkpoint of step ", 1)[1])
    resumed = [e["step"] for e in events(run, "resume") if e["time"] > readmit["time"]][0]
    assert resumed >= at and resumed in {e["step"] for e in events(run, "checkpoint")}, (resumed, at)
    resizes = events(run, "resize")
    assert [r["devices"] for r in resizes] == [2, 3] and resizes[1]["hosts"] == ["h1", "h2", "h3"], resizes
    assert sorted(r["host"] for r in events(run, "launch")[-1]["ranks"]) == ["h1", "h2", "h3"]
    assert all(r["global_batch"] == 12 for r in resizes)
    assert_ranks_gone(rank_pids(run), timeout=90)
