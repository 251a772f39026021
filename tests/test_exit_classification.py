"""How the supervisor reads a rank's exit, and the out-of-memory policy it consults (no processes)."""

import signal

import pytest

from mlx_train import protocol
from mlx_train.config import DistributedConfig, TrainConfig
from mlx_train.controller.supervisor import Status, classify_exit
from mlx_train.errors import UserError
from mlx_train.planning.oom import CrashFacts, OomPolicy
from mlx_train.rundir import RunDir

MiB = 2**20


def cfg(**kw) -> TrainConfig:
    return TrainConfig(dist=DistributedConfig(batch_size_per_device=kw.pop("batch", 8)), **kw)


def classify(code, *, finished=False, log="", peak=0, budget=0, reported=None, user_error="", c=None):
    facts = CrashFacts(rank=1, code=code, log=log, peak=peak, budget=budget, reported=reported)
    return classify_exit(c or cfg(), OomPolicy(), facts, "rank 1", 40, finished, user_error)


def test_a_finished_rank_exiting_zero_is_no_failure():
    assert classify(0, finished=True) is None


def test_exiting_zero_before_finishing_is_a_failure():
    out = classify(0)
    assert (out.status, out.step, out.reason) == (Status.FAILED, 40, "rank 1 exited before finishing")


def test_user_error_carries_the_rank_s_own_line():
    out = classify(protocol.EXIT_USER_ERROR, user_error="--data x: no such file")
    assert (out.status, out.reason) == (Status.USER_ERROR, "--data x: no such file")
    assert classify(protocol.EXIT_USER_ERROR).reason == "rank 1 rejected its input (exit code 2)"


def test_the_rank_s_own_budget_stop_is_out_of_memory():
    report = {"rank": 1, "step": 3, "peak": 50 * MiB, "budget": 40 * MiB}
    out = classify(protocol.EXIT_OUT_OF_MEMORY, reported=report)
    assert (out.status, out.reason, out.oom) == (Status.OOM, "rank 1 passed its memory budget", report)


@pytest.mark.parametrize("code", [-signal.SIGKILL, -signal.SIGSEGV, -signal.SIGABRT, 128 + signal.SIGKILL])
def test_a_crash_near_the_budget_is_out_of_memory(code):
    out = classify(code, peak=3000 * MiB, budget=4000 * MiB)
    assert out.status is Status.OOM and "a crash with memory at 3000 MiB seen of a 4000 MiB budget" in out.reason
    assert out.oom == {"rank": 1, "code": code, "evidence": out.oom["evidence"]} and "crash" in out.oom["evidence"]


def test_a_crash_far_below_the_budget_is_a_plain_failure():
    out = classify(-signal.SIGKILL, peak=1 * MiB, budget=4000 * MiB)
    assert (out.status, out.reason) == (Status.FAILED, "rank 1 killed by signal 9")


def test_a_crash_without_any_budget_is_a_plain_failure():
    out = classify(-signal.SIGSEGV, peak=1 * MiB, c=cfg(memory_budget=None))
    assert out.status is Status.FAILED


def test_the_planner_s_prediction_counts_as_evidence():
    c = cfg(memory_budget=1 * MiB)  # the default model's predicted step needs far more than half of 1 MiB
    out = classify(-signal.SIGKILL, c=c)
    assert out.status is Status.OOM and "predicted" in out.reason


def test_an_allocation_failure_in_the_log_is_out_of_memory():
    out = classify(1, log="RuntimeError: [malloc] Unable to allocate 123 bytes", peak=30 * MiB, budget=40 * MiB)
    assert out.status is Status.OOM and "an allocation failure in its log" in out.reason
    assert classify(1, log="ValueError: shapes", peak=30 * MiB, budget=40 * MiB).status is Status.FAILED


def test_a_signal_that_is_not_a_memory_death_is_a_failure():
    out = classify(-signal.SIGTERM, peak=39 * MiB, budget=40 * MiB)
    assert (out.status, out.reason) == (Status.FAILED, "rank 1 killed by signal 15")


def test_recovery_ladder_keeps_the_global_batch():
    c = TrainConfig(dist=DistributedConfig(num_devices=2, batch_size_per_device=8))
    new = OomPolicy().next_config(c)
    assert new.dist.batch_size_per_device == 4 and new.dist.gradient_accumulation == 2 * c.dist.gradient_accumulation
    assert new.dist.global_batch_size == c.dist.global_batch_size


def test_the_ladder_ends():
    c = cfg(batch=1, grad_checkpoint=True, precision="bf16")
    assert OomPolicy().next_config(c) is None


def test_without_recovery_the_verdict_stays_but_no_config_is_offered():
    policy = OomPolicy(recover=False)
    assert policy.judge(cfg(), CrashFacts(rank=0, code=protocol.EXIT_OUT_OF_MEMORY)) is not None
    assert policy.next_config(cfg()) is None


def test_a_second_holder_of_the_run_lock_is_refused(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.lock():
        assert (run.path / ".lock").read_text().startswith("pid ")
        with pytest.raises(UserError, match="already supervised by pid"):
            with run.lock():
                pass
    with run.lock():  # released with its holder
        pass
