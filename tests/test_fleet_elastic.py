"""Elastic membership on the 3-host fleet: h3's link down for good with --min-devices 2 -> h3
excluded, the run resized to h1,h2 with the same global batch, and it ends within float tolerance
of the uninterrupted 3-host run; h3 back -> re-admitted at a checkpoint."""
from __future__ import annotations

import signal

import mlx.core as mx
import numpy as np
import pytest

import fleet as fleet_tools
from helpers import assert_ranks_gone, events, rank_pids, train_on_fleet, wait_for

pytestmark = pytest.mark.fleet

STEPS = ["--steps", "120", "--checkpoint-every", "20", "--log-every", "20", "--eval-every", "1000", "--no-live"]


def _params(run, step):
    return mx.load(str(run / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def _finish(proc, run):
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    assert events(run)[-1]["event"] == "finish", events(run)[-3:]
    return out


def test_host_lost_for_good_is_excluded_and_the_run_goes_on(fleet, cluster, corpus, tmp_path):
    straight = tmp_path / "straight"
    res = train_on_fleet(fleet, cluster, corpus, straight, *STEPS)
    assert res.returncode == 0, res.stdout[-3000:]
    run = tmp_path / "shrunk"
    proc = train_on_fleet(fleet, cluster, corpus, run, *STEPS, "--min-devices", "2", popen=True)
    try:
        wait_for(lambda: events(run, "checkpoint"), 120, "the first checkpoint")
        fleet_tools.link_down("h3")
        wait_for(lambda: events(run, "resize"), 120, "the resize without h3")
    except BaseException:
        proc.kill()
        fleet_tools.link_up("h3")
        raise
    try:
        out = _finish(proc, run)
    finally:
        fleet_tools.link_up("h3")
    exclude = events(run, "exclude")
    assert exclude and exclude[0]["host"] == "h3" and "unreachable" in exclude[0]["reason"], exclude
    resize = events(run, "resize")[0]
    assert resize["hosts"] == ["h1", "h2"] and resize["devices"] == 2 and resize["global_batch"] == 12, resize
    last = events(run, "launch")[-1]
    assert sorted(r["host"] for r in last["ranks"]) == ["h1", "h2"]
    assert "exclude h3" in out
    a, b = _params(straight, 120), _params(run, 120)
    for k in a:
        np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), rtol=1e-3, atol=1e-4, err_msg=k)
    assert_ranks_gone(rank_pids(run), timeout=90, what="a rank outlived the elastic run (h3's, once its link is back)")


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
