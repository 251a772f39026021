"""`invoke train` is `mlx-train train`: no flag of its own, --distributed only when asked for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INVOKE = Path(sys.executable).parent / "invoke"


def _invoke(*args, cwd):
    return subprocess.run([str(INVOKE), "--search-root", str(ROOT), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_invoke_train_ignores_a_cluster_file_unless_distributed(tmp_path):
    # A cluster file in the working directory that nobody asked for, and a batch the data cannot fill:
    # without --distributed the run is refused for its data (the cluster file is not read).
    (tmp_path / "cluster.yaml").write_text("hosts: 3\n")
    big = "--batch-size 40000 --seq-len 512"
    local = _invoke("train", "--extra", big, cwd=tmp_path)
    assert local.returncode == 2 and "fewer than one global batch" in local.stderr, local.stderr
    dist = _invoke("train", "--distributed", "--extra", big, cwd=tmp_path)
    assert dist.returncode == 2 and "cluster.yaml" in dist.stderr, dist.stderr
    assert "Traceback" not in local.stderr + dist.stderr
