"""Fully sharded training (--shard full, ZeRO-3) on the 3-host fleet: a model whose full fine-tune a
per-rank budget cannot hold under data parallel is refused up front at --shard none and trains at
--shard auto (which picks full) with at most half of data parallel's peak per rank and its losses;
a host lost for good mid-run re-shards the run over the 2 left, which finishes with nothing lost: h1,
rank 0's host, with the run directory private to each host, so the run resumes from the checkpoint
mirror's copy on h2 (a checkpoint survives the loss of any one host)."""
from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import yaml

import fleet as fleet_tools
from helpers import FLEET_HOSTS, assert_ranks_gone, events, metrics, rank_pids, train_on_fleet, wait_for

pytestmark = pytest.mark.fleet

# The smallest GPT found where the property shows (3.3M parameters; 16 bytes each under data parallel
# is 53 MB, 16/3 at full): with 2 sequences per rank data parallel's peak is ~100 MB a rank and full's
# ~40 MB (its last step's evaluation is its peak), while the planner's smallest data-parallel step
# (batch 1, checkpointing) needs 79 MiB and its smallest `gradients` step 57 MiB. So under BUDGET
# only `full` fits: the refusal names it and `auto` picks it.
MODEL = ["--layers", "4", "--width", "256", "--heads", "2", "--seq-len", "32", "--batch-size", "2"]
BUDGET = "42MiB"
STEPS = 6
RUN = [*MODEL, "--steps", str(STEPS), "--log-every", "1", "--eval-every", "1000", "--no-live"]
# No checkpoint before the end: a save at `full` gathers the whole parameters and AdamW state on every
# rank, a peak of its own that this comparison of the steps' peaks leaves out (docs/sharding.md).
STRAIGHT = [*RUN, "--checkpoint-every", "1000"]


def _losses(run) -> dict:
    """Each step's loss, the last logged for it (a resumed run logs the steps after its checkpoint again)."""
    return {m["step"]: m["loss"] for m in metrics(run)}


def _peaks(run) -> list:
    """Each rank's peak memory over the run, as the ranks reported it."""
    return [max(m["peak_memory"][r] for m in metrics(run)) for r in range(len(metrics(run)[0]["peak_memory"]))]


def _params(run, step):
    return mx.load(str(run / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def _same_losses(run, reference):
    ours, theirs = _losses(run), _losses(reference)
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1)), (ours, theirs)
    for step, loss in theirs.items():
        assert abs(ours[step] - loss) <= 1e-5 * abs(loss), (step, ours[step], loss)


@pytest.fixture(scope="module")
def data_parallel(fleet, cluster, corpus, tmp_path_factory):
    """The same training unsharded on the 3 hosts, given the memory it needs: the reference."""
    run = tmp_path_factory.mktemp("sharding") / "data-parallel"
    res = train_on_fleet(fleet, cluster, corpus, run, *STRAIGHT, "--shard", "none")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run


def test_refused_unsharded_under_a_budget_trains_fully_sharded(fleet, cluster, corpus, data_parallel, tmp_path):
    refused = tmp_path / "refused"
    res = train_on_fleet(fleet, cluster, corpus, refused, *STRAIGHT, "--shard", "none", "--memory-budget", BUDGET)
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stdout + res.stderr, res.stderr
    assert "--memory-budget 42.0 MiB" in lines[0] and "--shard none" in lines[0] and "--shard full" in lines[0], lines
    assert not refused.exists()  # refused before anything was written

    run = tmp_path / "sharded"
    res = train_on_fleet(fleet, cluster, corpus, run, *STRAIGHT, "--shard", "auto", "--memory-budget", BUDGET)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["shard_level"] == "full"
    assert [r["host"] for r in events(run, "launch")[0]["ranks"]] == ["h1", "h2", "h3"]
    assert not events(run, "oom") and all(m["devices"] == 3 for m in metrics(run))
    _same_losses(run, data_parallel)
    full, unsharded = _peaks(run), _peaks(data_parallel)
    print(f"peak per rank, MB: full {[round(p / 1e6, 1) for p in full]}, none {[round(p / 1e6, 1) for p in unsharded]}")
    assert max(full) <= 0.5 * min(unsharded), (full, unsharded)
    assert max(full) <= 42 * 2**20, full  # within the budget it was refused under at `none`
    assert_ranks_gone(rank_pids(run))


def test_host_lost_for_good_mid_run_is_resharded_over_two(fleet, cluster, corpus, data_parallel, tmp_path):
    """Issue 17's "a host lost for good (--min-devices 2) in the middle of a --shard full run: re-sharded
    over 2, the run finishes, nothing lost", the host lost being the hardest one: h1, rank 0's, with its
    disk. Each host has a run directory of its own (a tmpfs in its mount namespace, as Macs without a
    shared disk have), so h1's checkpoints go with it and only the copy the mirror (rank 1, rank/trainer.py
    find_stores) wrote on h2 is left: a checkpoint survives the loss of any one host (issue 17 point 4)."""
    run = tmp_path / "lost"
    run.mkdir()  # empty (allowed), so that each host can mount its own disk there before the launch
    for h in FLEET_HOSTS:  # room for 3 checkpoints of 39.5 MB (--keep-checkpoints' default)
        fleet_tools.run_in(h, ["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(run)])
    proc = train_on_fleet(fleet, cluster, corpus, run, *RUN, "--checkpoint-every", "2", "--shard", "full",
                          "--min-devices", "2", popen=True)
    try:
        try:
            # Rank 0's first checkpoint, on h1's disk (the mirror writes its copy on h2's beside it). A step
            # of this model takes most of a second on the fleet: steps 3-6 are still ahead when h1 is cut.
            wait_for(lambda: [e for e in events(run, "checkpoint") if "mirror" not in e], 120, "the first checkpoint")
            fleet_tools.link_down("h1")
            out, _ = proc.communicate(timeout=300)
        finally:
            proc.kill()
            fleet_tools.link_up("h1")
        assert proc.returncode == 0, out[-3000:]
        assert events(run)[-1]["event"] == "finish", events(run)[-3:]
        exclude = events(run, "exclude")
        assert exclude and exclude[0]["host"] == "h1" and "unreachable" in exclude[0]["reason"], exclude
        assert "exclude h1" in out
        resize = events(run, "resize")[0]
        assert resize["hosts"] == ["h2", "h3"] and resize["devices"] == 2 and resize["global_batch"] == 6, resize
        assert resize["shard"] == "full", resize
        assert sorted(r["host"] for r in events(run, "launch")[-1]["ranks"]) == ["h2", "h3"]
        # Resumed on h2 from the mirror's copy (h1's disk is out of reach), not from scratch: a checkpoint
        # written before the resize (the first, or a newer one the mirror finished while the ranks waited).
        resumed = events(run, "resume")[-1]
        assert resumed["step"] >= 2 and resumed.get("host") == "h2", resumed
        assert resumed["step"] in {e["step"] for e in events(run, "checkpoint") if e["time"] < resize["time"]}
        assert {e.get("mirror") for e in events(run, "checkpoint")} >= {"h2", "h3"}  # h2's copies, then h3's
        # Nothing lost: every step after it taken again on 2 ranks, still fully sharded (the blocks are
        # gathered), each step's loss data parallel's on 3, and the same weights at the end.
        after = [m for m in metrics(run) if m["devices"] == 2]
        assert [m["step"] for m in after] == list(range(resumed["step"] + 1, STEPS + 1)), [m["step"] for m in after]
        assert all(m["gathered_bytes"] > 0 for m in after)
        _same_losses(run, data_parallel)
        # The last checkpoint is on h2's own disk, where rank 0 ran after the resize.
        final = tmp_path / "final.safetensors"
        last = run / "checkpoints" / f"step-{STEPS:06d}" / "model.safetensors"
        fleet_tools.run_in("h2", ["cp", str(last), str(final)])
        a, b = _params(data_parallel, STEPS), mx.load(str(final))
        for k in a:
            # Summed over 2 ranks after the resize, in another order than over 3: AdamW turns the last bits
            # of a near-zero gradient into a visibly different step for that weight (a CI run: 1.3e-5 on a
            # 4e-4 weight), so the tolerance is the elastic tests' own.
            np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), rtol=1e-3, atol=1e-4, err_msg=k)
        print(f"resumed at step {resumed['step']} on 2 ranks: " + json.dumps(resize))
        assert_ranks_gone(rank_pids(run), timeout=90, what="a rank outlived the run (h1's, once its link is back)")
    finally:
        for h in FLEET_HOSTS:
            fleet_tools.run_in(h, ["umount", "-l", str(run)], check=False)
