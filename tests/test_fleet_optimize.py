"""`mlx-train optimize --distributed` tunes for the whole cluster: every trial on all 3 hosts.

(It once kept only the first host: --devices defaulted to 1.)"""
from __future__ import annotations

import subprocess
import threading
import time

import pytest
import yaml

from helpers import FLEET_HOSTS, MLX_TRAIN, events, fleet_env

pytestmark = pytest.mark.fleet


def test_optimize_distributed_runs_every_trial_on_every_host(fleet, cluster, corpus, tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"model": {"n_layers": 2, "d_model": 64, "n_heads": 2, "seq_len": 64},
                                    "data": {"path": str(corpus)}, "dist": {"batch_size_per_device": 2}}))
    best = tmp_path / "best.yaml"
    # The trials' run directories live beside the output only while the trial runs: watch them.
    seen, done = {}, threading.Event()

    def watch() -> None:
        while not done.is_set():
            for trial in tmp_path.glob(".mlx-train-optimize-*/trial-*"):
                try:
                    launch = events(trial, "launch")
                except (OSError, ValueError):
                    continue
                if launch:
                    seen[trial.name] = [(r["rank"], r["host"]) for r in launch[0]["ranks"]]
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        res = subprocess.run([MLX_TRAIN, "optimize", "--distributed", "--cluster", str(cluster), "--config", str(base),
                              "--output", str(best), "--trial-steps", "3"],
                             env=fleet_env(fleet), capture_output=True, text=True, timeout=480)
    finally:
        done.set()
        watcher.join(timeout=5)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"optimize: {len(FLEET_HOSTS)} devices" in res.stdout, res.stdout
    assert seen, "no trial was seen launching"
    for trial, ranks in seen.items():
        assert ranks == list(enumerate(FLEET_HOSTS)), (trial, ranks)
    chosen = yaml.safe_load(best.read_text())["dist"]
    assert chosen["num_devices"] == len(FLEET_HOSTS)
