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
    # At step 25's checkpoint, the first report after the perturbation, each rank's own checksum
    # tells: caught there.
    diverged = events(run, "diverged")
    assert diverged and diverged[0]["rank"] == 1 and diverged[0]["step"] == 25 and diverged[0]["rollback_to"] == 20
    assert "rank 1 on localhost diverged" in out
    first = [e for e in events(run, "checkpoint") if e["time"] < diverged[0]["time"]]
    assert [(e["step"], e["agreed"]) for e in first][:4] == [(5, True), (10, True), (15, True), (20, True)]
    # Step 25's checkpoint is written in the background: stopped before it landed, or landed
    # recording the disagreement and skipped on resume for the one before it.
    assert all(e["path"].endswith("step-000025") and "disagreed" in e["reason"]
               for e in events(run, "checkpoint_damaged"))
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


def test_only_a_complete_set_of_the_ranks_own_reports_is_judged():
    from mlx_train.controller.divergence import Reports

    reports = Reports([0, 1, 2])
    assert reports.add(10, 0, 7) is None and reports.add(10, 2, 7) is None
    # Rank 1 died during step 10's gather: its report never comes, rank 0's stale list is not used.
    assert reports.add(20, 0, 8) is None and reports.add(20, 1, 8) is None
    assert reports.add(20, 2, 9) == [8, 8, 9]
    assert 10 not in reports.pending  # an older incomplete step is dropped, never judged later
    assert reports.add(10, 1, 3) is None and 10 not in reports.pending
    # A step reported twice (a metrics line and a checkpoint) is judged once.
    assert [reports.add(20, r, 8) for r in (0, 1, 2)] == [None, None, None]
    assert [reports.add(30, r, 5) for r in (0, 1, 2)] == [None, None, [5, 5, 5]]
