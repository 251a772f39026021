"""Training across the 3-host fleet, one rank per host, on both backends, and surviving a killed rank."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.fleet
REPO = Path(__file__).resolve().parent.parent
MLX_TRAIN = str(Path(sys.executable).parent / "mlx-train")
TINY = ["--layers", "2", "--width", "64", "--heads", "2", "--seq-len", "64", "--batch-size", "4"]


def fleet_env(fleet) -> dict:
    return {**os.environ, "PATH": f"{fleet.ssh_wrapper_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def setup(fleet, tmp_path_factory):
    """A cluster file and a corpus, both where every host sees them (the fleet shares /tmp)."""
    d = tmp_path_factory.mktemp("fleet-train")
    data = d / "data"
    data.mkdir()
    # Not the stdlib corpus: the controller's Python and the nodes' may be different patch releases.
    for f in (REPO / "src" / "mlx_train").glob("*.py"):
        shutil.copy(f, data / f.name)
    cluster = d / "cluster.yaml"
    subprocess.run([MLX_TRAIN, "configure", "--distributed", "--inventory", str(fleet.inventory_path),
                    "--output", str(cluster), "--hostfile", str(d / "hostfile.json")],
                   env=fleet_env(fleet), check=True, capture_output=True, text=True, timeout=60)
    return cluster, data


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def assert_no_stray_ranks(run: Path) -> None:
    # The fleet shares this machine's pid namespace, so the ranks' pids are checked right here.
    pids = [r["pid"] for e in events(run) if e["event"] == "launch" for r in e["ranks"]]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and _is_worker(p) for p in pids):
        time.sleep(0.2)
    assert not [p for p in pids if Path(f"/proc/{p}").exists() and _is_worker(p)], "a rank outlived its run"


def _is_worker(pid: int) -> bool:
    try:
        return b"mlx_train.rank.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def train(fleet, setup, run: Path, *extra, popen=False):
    cluster, data = setup
    argv = [MLX_TRAIN, "train", "--cluster", str(cluster), *TINY, "--data", str(data), "--run-dir", str(run), *extra]
    if popen:
        return subprocess.Popen(argv, env=fleet_env(fleet), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(argv, env=fleet_env(fleet), capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("backend", ["ring", "mpi"])
def test_run_finishes_one_rank_per_host(fleet, setup, tmp_path, backend):
    run = tmp_path / "run"
    res = train(fleet, setup, run, "--steps", "20", "--backend", backend)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ev = events(run)
    assert ev[-1]["event"] == "finish"
    launch = next(e for e in ev if e["event"] == "launch")
    assert launch["backend"] == backend
    assert [r["host"] for r in launch["ranks"]] == ["h1", "h2", "h3"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["devices"] == 3 for m in metrics)
    assert all(len(set(m["param_checksum"])) == 1 and len(m["param_checksum"]) == 3 for m in metrics)
    for rank, host in enumerate(("h1", "h2", "h3")):
        hello = next(json.loads(line.split(" ", 1)[1]) for line in (run / "logs" / f"rank-{rank}.log").read_text().splitlines()
                     if line.startswith("@mlx-train ") and '"hello"' in line)
        assert hello["host"] == host and hello["python"] == "/opt/mlx-train/venv/bin/python"
    assert (run / "checkpoints").is_dir()
    assert_no_stray_ranks(run)


def test_killed_remote_rank_is_recovered(fleet, setup, tmp_path):
    run = tmp_path / "run"
    proc = train(fleet, setup, run, "--steps", "60", "--checkpoint-every", "10", popen=True)
    try:
        deadline = time.monotonic() + 90
        launch = None
        while time.monotonic() < deadline and launch is None:
            ckpts = [e for e in events(run) if e["event"] == "checkpoint"] if (run / "events.jsonl").exists() else []
            if ckpts:
                launch = next(e for e in events(run) if e["event"] == "launch")
            time.sleep(0.2)
        assert launch, "the run never reached its first checkpoint"
        victim = launch["ranks"][1]
        assert victim["host"] == "h2"
        fleet.run_in("h2", ["kill", "-9", str(victim["pid"])], check=True)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
    assert proc.returncode == 0, out[-3000:]
    kinds = [e["event"] for e in events(run)]
    for kind in ("rank_exit", "restart", "resume", "finish"):
        assert kind in kinds, kinds
    assert kinds.index("restart") < kinds.index("resume") < kinds.index("finish")
    assert_no_stray_ranks(run)


def test_status_shows_every_host_and_its_running_rank(fleet, setup, tmp_path):
    cluster, _ = setup
    run = tmp_path / "status"
    proc = train(fleet, setup, run, "--steps", "100000", "--no-live", popen=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        out = subprocess.run([MLX_TRAIN, "status", "--cluster", str(cluster)], env=fleet_env(fleet),
                             capture_output=True, text=True, timeout=120)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {line.split("│")[1].strip(): line for line in out.stdout.splitlines()
            if line.startswith("│") and line.split("│")[1].strip() in ("h1", "h2", "h3")}
    assert sorted(rows) == ["h1", "h2", "h3"], out.stdout
    for rank, host in enumerate(("h1", "h2", "h3")):
        assert "yes" in rows[host] and "/opt/mlx-train/venv/bin/python" in rows[host]
        assert f"{run.name}: rank {rank}" in rows[host], rows[host]
    assert_no_stray_ranks(run)


def test_configure_records_each_hosts_facts(fleet, setup):
    import yaml

    from mlx_train.fleet.hosts import load_hosts
    from mlx_train.controller.run import budget_for

    cluster, _ = setup
    hosts = yaml.safe_load(cluster.read_text())["hosts"]
    assert [h["name"] for h in hosts] == ["h1", "h2", "h3"]
    assert [h["addr"] for h in hosts] == ["10.77.0.11", "10.77.0.12", "10.77.0.13"]
    assert all(h["iface"] == "eth0" and h["python"] == "/opt/mlx-train/venv/bin/python" for h in hosts)
    assert all(h["cores"] >= 1 and h["memory"] > 2**30 for h in hosts)
    # The memory planner's device memory for remote hosts comes from these facts.
    assert budget_for(load_hosts(str(cluster))) == int(min(h["memory"] for h in hosts) * 0.9)
