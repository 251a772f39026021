"""Silent divergence: one rank's weights perturbed (the MLX_TRAIN_TEST_PERTURB hook) is caught by the
ranks' parameter checksums, named, and rolled back to the newest checkpoint written while they agreed."""

import json

import mlx.core as mx
import numpy as np
import pytest

from helpers import TINY, cli, events, metrics
from mlx_train.controller.divergence import odd_ranks


def test_odd_ranks_names_the_minority_or_the_one_unlike_rank_0():
    assert odd_ranks([7, 7, 7]) == []
    assert odd_ranks([7, 9, 7]) == [1]
    assert odd_ranks([9, 7, 7]) == [0]
    assert odd_ranks([7, 9]) == [1]
    assert odd_ranks([]) == []


COMMON = [*TINY, "--devices", "2", "--steps", "50", "--log-every", "10", "--eval-every", "100",
          "--checkpoint-every", "5"]


@pytest.mark.multiproc
def test_perturbed_rank_is_caught_and_rolled_back(tmp_path):
    straight, run = tmp_path / "straight", tmp_path / "perturbed"
    cli("train", *COMMON, "--run-dir", str(straight), "--no-live", check=True)
    out = cli("train", *COMMON, "--run-dir", str(run), "--no-live", env={"MLX_TRAIN_TEST_PERTURB": "23:1"},
              check=True).stdout
    # Step 25's checkpoint, the first after the perturbation, records the disagreement: caught there.
    diverged = events(run, "diverged")
    assert diverged and diverged[0]["rank"] == 1 and diverged[0]["step"] == 25 and diverged[0]["rollback_to"] == 20
    assert "rank 1 on localhost diverged" in out
    first = [e for e in events(run, "checkpoint") if e["time"] < diverged[0]["time"]]
    assert [(e["step"], e["agreed"]) for e in first] == [(5, True), (10, True), (15, True), (20, True), (25, False)]
    # On resume it is skipped for the one before it.
    skipped = events(run, "checkpoint_damaged")
    assert skipped and skipped[0]["path"].endswith("step-000025") and "disagreed" in skipped[0]["reason"]
    assert events(run, "resume")[-1]["step"] == 20
    assert events(run)[-1]["event"] == "finish"
    last = metrics(run)[-1]
    assert last["step"] == 50 and last["param_checksum"][0] == last["param_checksum"][1]
    # The rollback leaves no trace: the run ends where the unperturbed one does, bit for bit.
    a = mx.load(str(straight / "checkpoints" / "step-000050" / "model.safetensors"))
    b = mx.load(str(run / "checkpoints" / "step-000050" / "model.safetensors"))
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
    manifest = json.loads((run / "checkpoints" / "step-000050" / "manifest.json").read_text())
    assert manifest["meta"]["agreed"] is True
