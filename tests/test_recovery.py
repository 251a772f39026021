"""Out-of-memory recovery with real ranks: a budget that is too small, and a real crash under prlimit."""

import signal

import pytest

from helpers import cli, events, metrics, needs

pytestmark = pytest.mark.multiproc

SMALL = ["--layers", "2", "--width", "64", "--heads", "2", "--seq-len", "64"]


def _assert_recovered(run, global_batch):
    assert events(run, "oom"), "no oom event"
    reconf = events(run, "reconfigure")
    assert reconf and reconf[0]["old"]["batch_size_per_device"] > reconf[-1]["new"]["batch_size_per_device"]
    assert all(r["global_batch"] == global_batch for r in reconf)
    final = metrics(run)
    assert all(m["global_batch"] == global_batch for m in final)
    assert final[-1]["loss"] < final[0]["loss"]
    assert events(run)[-1]["event"] == "finish"
    launches = events(run, "launch")
    assert launches[-1]["batch_size_per_device"] * launches[-1]["gradient_accumulation"] * launches[-1]["devices"] \
        == global_batch


def test_budget_too_small_recovers_with_the_same_global_batch(tmp_path):
    """With --max-restarts 0: out-of-memory recovery walks its own ladder and uses up no restarts."""
    run = tmp_path / "budget"
    out = cli("train", *SMALL, "--devices", "2", "--batch-size", "64", "--steps", "20", "--log-every", "5",
              "--memory-budget", "40MiB", "--max-restarts", "0", "--run-dir", str(run), "--no-live",
              check=True).stdout
    assert "out of memory" in out
    first = events(run, "oom")[0]
    assert first["peak"] > first["budget"] == 40 * 2**20
    assert len(events(run, "restart")) == len(events(run, "reconfigure")) >= 1
    _assert_recovered(run, 128)


@needs("prlimit", "util-linux prlimit is not installed")
def test_gives_up_after_max_restarts(tmp_path):
    """A rank that dies every time (a CPU-time limit: SIGXCPU) is restarted --max-restarts times, then
    the run fails with the reason, exit 1."""
    run = tmp_path / "doomed"
    proc = cli("train", *SMALL, "--devices", "2", "--steps", "100000", "--max-restarts", "2",
               "--rank-wrapper", "prlimit --cpu=4:30", "--run-dir", str(run), "--no-live", timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert [e["attempt"] for e in events(run, "restart")] == [1, 2]
    failed = events(run)[-1]
    assert failed["event"] == "failed" and failed["reason"].endswith("gave up after 2 restarts"), failed
    assert sum(e.get("signal") == signal.SIGXCPU for e in events(run, "rank_exit")) >= 3
    assert not events(run, "oom")
    assert "gave up after 2 restarts" in proc.stdout


@needs("prlimit", "util-linux prlimit is not installed")
def test_rank_crashing_under_prlimit_is_recovered(tmp_path):
    """MLX's CPU build segfaults when an address-space limit stops an allocation (engine facts)."""
    run = tmp_path / "prlimit"
    cli("train", "--layers", "2", "--width", "128", "--heads", "4", "--seq-len", "256", "--batch-size", "64",
        "--steps", "3", "--log-every", "1", "--memory-budget", "600MiB", "--rank-wrapper", "prlimit --as=1100000000",
        "--run-dir", str(run), "--no-live", check=True, timeout=600)
    crash = events(run, "rank_exit")[0]
    assert crash["signal"] == 11, crash
    assert "crash" in events(run, "oom")[0]["evidence"]
    _assert_recovered(run, 64)


def test_nothing_smaller_left_stops_with_a_clear_message(tmp_path):
    # A budget below the planner's smallest step is refused before launch (test_cli_errors); the
    # planner's own figure for that step passes, and the real step (a little larger) does not fit.
    from mlx_train.config import ModelConfig
    from mlx_train.planning.memory import ModelShape, step_memory

    least = step_memory(ModelShape.from_config(ModelConfig(n_layers=2, d_model=64, n_heads=2, seq_len=64)), 1, 1,
                        True, "bf16").peak
    run = tmp_path / "hopeless"
    proc = cli("train", *SMALL, "--batch-size", "1", "--precision", "bf16", "--grad-checkpoint", "--steps", "5",
               "--memory-budget", str(least), "--run-dir", str(run), "--no-live")
    assert proc.returncode == 1
    assert "nothing smaller is left to try" in proc.stdout
    assert events(run)[-1]["event"] == "failed"


def test_optimize_memory_splits_the_global_batch_for_the_budget(tmp_path):
    run = tmp_path / "planned"
    out = cli("train", *SMALL, "--batch-size", "64", "--steps", "3", "--memory-budget", "40MiB",
              "--optimize-memory", "--run-dir", str(run), "--no-live", check=True).stdout
    launch = events(run, "launch")[0]
    assert launch["global_batch"] == 64 and launch["batch_size_per_device"] < 64
    assert not events(run, "oom"), "the planner's split should fit without a recovery"
    assert "--optimize-memory:" in out


@pytest.mark.parametrize("count", [1, 3])
def test_non_finite_steps_are_skipped_and_repeated_ones_rolled_back(tmp_path, count):
    """NaN weights on rank 1 for `count` steps (the documented test hook): every rank skips those
    updates alike; one stays a skip, three in a row roll the run back to its last checkpoint."""
    run = tmp_path / f"nan{count}"
    out = cli("train", *SMALL, "--batch-size", "4", "--devices", "2", "--steps", "60", "--log-every", "10",
              "--checkpoint-every", "20", "--run-dir", str(run), "--no-live",
              env={"MLX_TRAIN_TEST_POISON": f"25:1:{count}"}, check=True).stdout
    bad = events(run, "bad_step")
    assert [(e["step"], e["in_a_row"]) for e in bad] == [(26 + i, 1 + i) for i in range(count)], bad
    assert all(e["grad_norm"] != e["grad_norm"] for e in bad)  # NaN: rank 1's gradients reached everyone
    assert "skipped step 26" in out
    if count == 1:
        assert not events(run, "rollback") and not events(run, "restart")
    else:
        assert events(run, "rollback")[0]["step"] == 28
        assert events(run, "restart")[0]["reason"].startswith("3 steps in a row with a non-finite loss")
        assert events(run, "resume")[0]["step"] == 20
    final = metrics(run)[-1]
    assert final["step"] == 60 and final["loss"] == final["loss"]
    assert final["param_checksum"][0] == final["param_checksum"][1], "a rank applied an update the other skipped"
    assert events(run)[-1]["event"] == "finish"
