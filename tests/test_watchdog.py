"""The progress watchdog on a hand-driven clock: allowances per phase, adaptation, the suspect."""

import pytest

from mlx_train.controller.watchdog import CHECKPOINT, EVAL, FIRST_STEP, STARTUP, STEP, Allowances, Watchdog

A = Allowances()


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock():
    return Clock()


def _steps(dog, clock, ranks, n, step_s, first=1):
    for i in range(n):
        clock.t += step_s
        for r in ranks:
            dog.stepped(r, first + i, step_s)


def _running(clock, override=None, step_s=0.05):
    dog = Watchdog([0, 1], override, clock=clock)
    for r in (0, 1):
        dog.started(r, 0)
    _steps(dog, clock, (0, 1), 20, step_s)
    return dog


def test_start_up_has_its_own_allowance(clock):
    dog = Watchdog([0, 1], override=8, clock=clock)
    assert dog.timeout() == (A.startup_s, STARTUP)
    clock.t += A.startup_s - 1
    assert dog.check() is None, "--stall-timeout must not count start-up"
    clock.t += 2
    stall = dog.check()
    assert stall.phase == STARTUP and stall.quiet == [0, 1]


def test_first_step_allowance_then_override(clock):
    dog = Watchdog([0, 1], override=8, clock=clock)
    dog.started(0, 0)
    dog.started(1, 0)
    assert dog.timeout() == (A.first_step_s, FIRST_STEP)
    dog.stepped(0, 1, 5.0)
    assert dog.timeout() == (A.first_step_s, FIRST_STEP), "rank 1 is still in its first step"
    dog.stepped(1, 1, 5.0)
    assert dog.timeout() == (8, STEP)


def test_a_longer_override_lengthens_start_up_and_the_first_step(clock):
    # Steps of 10 minutes (--stall-timeout 1800): the first one must not be cut at 120 s.
    dog = Watchdog([0, 1], override=1800, clock=clock)
    assert dog.timeout() == (1800, STARTUP)
    dog.started(0, 0)
    dog.started(1, 0)
    assert dog.timeout() == (1800, FIRST_STEP)
    clock.t += 600
    assert dog.check() is None, "a 10-minute first step under --stall-timeout 1800"
    clock.t += 1201
    assert dog.check().phase == FIRST_STEP


def test_warm_up_then_adaptive_with_a_floor(clock):
    dog = Watchdog([0], clock=clock)
    dog.started(0, 0)
    dog.stepped(0, 1, 30.0)  # the first step (compilation) is not a step time
    assert dog.durations[STEP] == deque_of()
    for i in range(A.warmup_steps - 1):
        dog.stepped(0, 2 + i, 0.05)
    assert dog.timeout() == (A.first_step_s, STEP), "still warming up"
    dog.stepped(0, 9, 0.05)
    assert dog.timeout() == (A.floor_s, STEP)
    for i in range(20):
        dog.stepped(0, 10 + i, 4.0)
    assert dog.timeout() == (A.multiple * 4.0, STEP)


def deque_of(*xs):
    from collections import deque
    return deque(xs, maxlen=64)


def test_a_frozen_rank_is_named(clock):
    dog = _running(clock)
    clock.t += 1.0
    dog.stepped(0, 21, 0.05)  # rank 0 got a little further before waiting on rank 1
    clock.t += A.floor_s - 2.0
    assert dog.check() is None
    clock.t += 2.0
    stall = dog.check()
    assert (stall.rank, stall.step, stall.phase, stall.timeout_s) == (1, 20, STEP, A.floor_s)
    assert stall.quiet == [1] and stall.quiet_s > A.floor_s


def test_any_message_is_a_sign_of_life(clock):
    dog = _running(clock)
    for _ in range(5):
        clock.t += A.floor_s - 1
        dog.heard(0)
        dog.heard(1)
    assert dog.check() is None


def test_a_checkpoint_on_one_rank_extends_everyone(clock):
    dog = _running(clock)
    dog.phase(0, CHECKPOINT, 20, done=False)
    assert dog.timeout() == (A.checkpoint_s, CHECKPOINT)
    clock.t += A.checkpoint_s - 1  # rank 1 waits in the next all_sum for rank 0's write
    assert dog.check() is None
    dog.phase(0, CHECKPOINT, 20, done=True)
    assert dog.durations[CHECKPOINT][-1] == A.checkpoint_s - 1
    assert dog.timeout()[1] == STEP
    # Once timed, the next write is allowed a multiple of the slowest seen.
    dog.phase(0, CHECKPOINT, 40, done=False)
    assert dog.timeout() == (A.multiple * (A.checkpoint_s - 1), CHECKPOINT)


def test_peers_waiting_on_a_phase_get_a_step_after_it_ends(clock):
    """Rank 1 blocked in its next all_sum while rank 0 waited for a checkpoint write: it can only
    report after the write, so its quiet time runs from the write's end, not from its last step."""
    dog = _running(clock)
    dog.phase(0, CHECKPOINT, 20, done=False)
    clock.t += 12
    dog.phase(0, CHECKPOINT, 20, done=True)
    assert dog.timeout() == (A.floor_s, STEP) and dog.check() is None  # rank 1 quiet 12 s > 10 s, but waiting
    clock.t += A.floor_s + 0.1  # ... and still quiet a whole allowance after the write: a stall
    stall = dog.check()
    assert stall is not None and stall.rank in (0, 1) and stall.quiet_s > A.floor_s


def test_eval_learns_its_duration(clock):
    dog = _running(clock)
    for r in (0, 1):
        dog.phase(r, EVAL, 20, done=False)
    clock.t += 3.0
    for r in (0, 1):
        dog.phase(r, EVAL, 20, done=True)
    for r in (0, 1):
        dog.phase(r, EVAL, 40, done=False)
    assert dog.timeout() == (max(A.floor_s, A.multiple * 3.0), EVAL)


def test_override_replaces_learnt_allowances(clock):
    dog = _running(clock, override=42)
    dog.phase(0, EVAL, 20, done=False)
    assert dog.timeout()[0] == 42


def test_a_finished_rank_can_be_forgotten(clock):
    dog = _running(clock)
    dog.ranks.pop(1)
    clock.t += A.floor_s - 1
    dog.stepped(0, 21, 0.05)
    clock.t += A.floor_s - 1
    assert dog.check() is None
