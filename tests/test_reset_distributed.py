"""reset-distributed stops recorded stray ranks on fleet hosts, and nothing else: a stray that wrote a
pid record, and the remote ranks a SIGKILLed supervisor left behind."""
from __future__ import annotations

import signal
import subprocess

import pytest

from helpers import (MLX_TRAIN, NODE_PYTHON, assert_ranks_gone, events, fleet_env, is_worker, pid_alive,
                     train_on_fleet, wait_for)

pytestmark = pytest.mark.fleet


def reset(fleet, cluster, tmp_path) -> subprocess.CompletedProcess:
    # MLX_TRAIN_STATE: the local half of the reset looks at an empty record dir, so ranks of
    # other runs on this machine are not this test's business.
    return subprocess.run([MLX_TRAIN, "reset-distributed", "--cluster", str(cluster)],
                          env=fleet_env(fleet, MLX_TRAIN_STATE=str(tmp_path / "state")),
                          capture_output=True, text=True, timeout=60)


def start_detached(fleet, host: str, code: str) -> int:
    res = fleet.ssh(host, f"nohup {NODE_PYTHON} -c '{code}' >/dev/null 2>&1 </dev/null & echo $!", check=True)
    return int(res.stdout.strip())


def _children(pid: int) -> list:
    """Child pids of `pid` (the fleet shares this machine's pid namespace)."""
    try:
        return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def test_reset_kills_recorded_stray_only(fleet, cluster, tmp_path):
    stray = start_detached(fleet, "h2", 'from mlx_train.rank import pidrecords; import time; '
                                        'pidrecords.write("stray-test", 1, "/tmp/nowhere"); time.sleep(600)')
    unrelated = start_detached(fleet, "h2", "import time; time.sleep(600)")
    try:
        wait_for(lambda: "stray-test" in fleet.ssh("h2", "ls ~/.mlx-train/ranks/ 2>/dev/null").stdout, 20,
                 "the stray's pid record")
        res = reset(fleet, cluster, tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "stray-test rank 1" in res.stdout, res.stdout
        wait_for(lambda: not pid_alive(stray), 10, "the stray's end")
        assert pid_alive(unrelated)
        assert "stray-test" not in fleet.ssh("h2", "ls ~/.mlx-train/ranks/ 2>/dev/null").stdout
    finally:
        for pid in (stray, unrelated):
            fleet.run_in("h2", ["kill", "-9", str(pid)], check=False)


def test_reset_stops_remote_ranks_orphaned_by_a_killed_supervisor(fleet, cluster, corpus, tmp_path):
    """A rank that cannot notice its supervisor is gone (here a sleeping laptop: the rank and its
    lifeline guardian both frozen with SIGSTOP) outlives a SIGKILLed supervisor."""
    run = tmp_path / "orphaned"
    proc = train_on_fleet(fleet, cluster, corpus, run, "--steps", "100000", "--no-live", popen=True)
    try:
        launch = wait_for(lambda: events(run, "launch"), 120, "the run's launch")[0]
        frozen = launch["ranks"][1]
        assert frozen["host"] == "h2"
        guardians = _children(frozen["pid"])
        assert guardians, "the rank has no lifeline guardian"
        fleet.run_in("h2", ["kill", "-STOP", str(frozen["pid"]), *map(str, guardians)], check=True)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert is_worker(frozen["pid"]), "the frozen rank did not outlive its supervisor: nothing to reset"
        res = reset(fleet, cluster, tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"{run.name} rank 1 (pid {frozen['pid']})" in res.stdout, res.stdout
        assert_ranks_gone([r["pid"] for r in launch["ranks"]], what="a rank outlived reset-distributed")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        for pid in (guardians if "guardians" in locals() else []):
            fleet.run_in("h2", ["kill", "-CONT", str(pid)], check=False)  # it sees its rank gone and ends
        for r in (launch["ranks"] if "launch" in locals() else []):
            if is_worker(r["pid"]):
                fleet.run_in(r["host"], ["kill", "-9", str(r["pid"])], check=False)
