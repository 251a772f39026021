"""`mlx-train optimize --distributed` tunes for the whole cluster: every trial on all 3 hosts.

(It once kept only the first host: --devices defaulted to 1.)"""
from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from helpers import FLEET_HOSTS, MLX_TRAIN, fleet_env

pytestmark = pytest.mark.fleet


def test_optimize_distributed_runs_every_trial_on_every_host(fleet, cluster, corpus, tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"model": {"n_layers": 2, "d_model": 64, "n_heads": 2, "seq_len": 64},
                                    "data": {"path": str(corpus)}, "dist": {"batch_size_per_device": 2}}))
    best = tmp_path / "best.yaml"
    res = subprocess.run([MLX_TRAIN, "optimize", "--distributed", "--cluster", str(cluster), "--config", str(base),
                          "--output", str(best), "--trial-steps", "3"],
                         env=fleet_env(fleet), capture_output=True, text=True, timeout=480)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"optimize: {len(FLEET_HOSTS)} devices" in res.stdout, res.stdout
    # Each measured trial says where its ranks ran, from the trial's own launch event.
    trials = re.findall(r"tok/s.*; ranks (.+)$", res.stdout, re.M)
    assert trials, res.stdout
    every_host = ", ".join(f"{r}@{h}" for r, h in enumerate(FLEET_HOSTS))
    assert all(t.strip() == every_host for t in trials), (trials, every_host)
    chosen = yaml.safe_load(best.read_text())["dist"]
    assert chosen["num_devices"] == len(FLEET_HOSTS)
