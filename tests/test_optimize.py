"""`mlx-train optimize` runs real trials and writes a config `train --config` accepts."""

import pytest
import yaml

from helpers import cli, events

pytestmark = pytest.mark.multiproc


def test_optimize_writes_a_usable_config(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model: {n_layers: 2, d_model: 64, n_heads: 2, seq_len: 64}\ndist: {batch_size_per_device: 8}\n")
    best = tmp_path / "best.yaml"
    out = cli("optimize", "--devices", "2", "--config", str(base), "--output", str(best), "--trial-steps", "4",
              check=True, timeout=600).stdout
    assert "trials, fastest first" in out and "best:" in out
    chosen = yaml.safe_load(best.read_text())
    d = chosen["dist"]
    assert d["num_devices"] * d["batch_size_per_device"] * d["gradient_accumulation"] == 16, "global batch changed"
    run = tmp_path / "tuned"
    cli("train", "--config", str(best), "--steps", "3", "--run-dir", str(run), "--no-live", check=True)
    assert events(run, "launch")[0]["batch_size_per_device"] == d["batch_size_per_device"]


def test_optimize_skips_what_the_planner_says_cannot_fit(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model: {n_layers: 2, d_model: 64, n_heads: 2, seq_len: 64}\ndist: {batch_size_per_device: 64}\n")
    out = cli("optimize", "--config", str(base), "--output", str(tmp_path / "b.yaml"), "--trial-steps", "3",
              "--memory-budget", "12MiB", check=True, timeout=600).stdout
    assert "skipped (predicted over budget)" in out
    assert yaml.safe_load((tmp_path / "b.yaml").read_text())["dist"]["batch_size_per_device"] < 64
