"""reset-distributed stops a recorded stray rank on a fleet host and nothing else."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.fleet
MLX_TRAIN = str(Path(sys.executable).parent / "mlx-train")
PY = "/opt/mlx-train/venv/bin/python"


def fleet_env(fleet, state: Path) -> dict:
    # MLX_TRAIN_STATE: the local half of the reset looks at an empty record dir, so ranks of
    # other runs on this machine are not this test's business.
    return {**os.environ, "PATH": f"{fleet.ssh_wrapper_dir}{os.pathsep}{os.environ['PATH']}",
            "MLX_TRAIN_STATE": str(state), "COLUMNS": "200"}


def start_detached(fleet, host: str, code: str) -> int:
    res = fleet.ssh(host, f"nohup {PY} -c '{code}' >/dev/null 2>&1 </dev/null & echo $!", check=True)
    return int(res.stdout.strip())


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_reset_kills_recorded_stray_only(fleet, tmp_path):
    cluster = tmp_path / "cluster.yaml"
    env = fleet_env(fleet, tmp_path / "state")
    subprocess.run([MLX_TRAIN, "configure", "--distributed", "--inventory", str(fleet.inventory_path),
                    "--output", str(cluster), "--hostfile", str(tmp_path / "hostfile.json")],
                   env=env, check=True, capture_output=True, text=True, timeout=60)
    stray = start_detached(fleet, "h2", 'from mlx_train.rank import pidrecords; import time; '
                                        'pidrecords.write("stray-test", 1, "/tmp/nowhere"); time.sleep(600)')
    unrelated = start_detached(fleet, "h2", "import time; time.sleep(600)")
    try:
        deadline = time.monotonic() + 20
        while "stray-test" not in fleet.ssh("h2", "ls ~/.mlx-train/ranks/ 2>/dev/null").stdout:
            assert time.monotonic() < deadline, "the stray never wrote its pid record"
            time.sleep(0.2)
        res = subprocess.run([MLX_TRAIN, "reset-distributed", "--cluster", str(cluster)], env=env,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "stray-test rank 1" in res.stdout, res.stdout
        deadline = time.monotonic() + 10
        while alive(stray) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(stray)
        assert alive(unrelated)
        assert "stray-test" not in fleet.ssh("h2", "ls ~/.mlx-train/ranks/ 2>/dev/null").stdout
    finally:
        for pid in (stray, unrelated):
            fleet.run_in("h2", ["kill", "-9", str(pid)], check=False)
