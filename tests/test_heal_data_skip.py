"""A bad stretch of data (the MLX_TRAIN_TEST_BAD_DATA hook: NaN on rank 1 whenever it trains on data
steps 25-27, in every attempt): three bad steps in a row roll the run back to its last checkpoint,
and the relaunch steps past that data instead of meeting it again. Resuming the finished run from a
checkpoint after the window replays it bit for bit; with the window taken out of the run's config,
the same relaunch meets the bad data again."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import yaml

from helpers import TINY, cli, events, metrics

pytestmark = pytest.mark.multiproc

JOB = [*TINY, "--devices", "2", "--steps", "60", "--log-every", "10", "--eval-every", "1000",
       "--checkpoint-every", "20", "--no-live"]
BAD = {"MLX_TRAIN_TEST_BAD_DATA": "25:1:3"}


def _model(path):
    return {k: np.array(v) for k, v in mx.load(str(path / "model.safetensors")).items()}


def test_rollback_steps_past_the_bad_data_window(tmp_path):
    run = tmp_path / "run"
    # One restart allowed: the rollback's. A relaunch meeting the bad data again would need another.
    out = cli("train", *JOB, "--max-restarts", "1", "--run-dir", str(run), env=BAD, check=True).stdout
    bad = events(run, "bad_step")
    assert [(e["step"], e["data_step"], e["in_a_row"]) for e in bad] == [(26, 25, 1), (27, 26, 2), (28, 27, 3)], bad
    rollback = events(run, "rollback")
    assert len(rollback) == 1 and rollback[0]["data_steps"] == [25, 27] and rollback[0]["skip"] == [25, 3], rollback
    assert "past the data of steps 26-28" in out
    resume = events(run, "resume")
    assert [e["step"] for e in resume] == [20]
    assert all(e["time"] < resume[0]["time"] for e in bad), "the relaunch met the bad data again"
    assert events(run)[-1]["event"] == "finish"
    last = metrics(run)[-1]
    assert last["step"] == 60 and last["loss"] == last["loss"] and last["param_checksum"][0] == last["param_checksum"][1]
    assert yaml.safe_load((run / "config.yaml").read_text())["skip_data"] == [[25, 3]]
    ckpts = run / "checkpoints"
    assert json.loads((ckpts / "step-000060" / "manifest.json").read_text())["meta"]["skip_data"] == [[25, 3]]

    # Exact resume past the window: drop the final checkpoint, resume from step 40, same weights.
    final = _model(ckpts / "step-000060")
    shutil.rmtree(ckpts / "step-000060")
    cli("train", "--resume", str(run), env=BAD, check=True)
    assert events(run, "resume")[-1]["step"] == 40
    again = _model(ckpts / "step-000060")
    assert all(np.array_equal(final[k], again[k]) for k in final)

    # Without the window the same relaunch from step 20 meets the bad data again.
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["skip_data"] = []
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for p in ckpts.iterdir():
        if p.name != "step-000020":
            shutil.rmtree(p)
    n_bad = len(events(run, "bad_step"))
    proc = cli("train", "--resume", str(run), "--max-restarts", "0", "--stop-after", "30", env=BAD)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    again = events(run, "bad_step")[n_bad:]
    assert [e["data_step"] for e in again] == [25, 26, 27], again
    assert events(run)[-1]["event"] == "failed"
