"""The run's events: every kind a line of events.jsonl can carry, defined once.

What protocol.py is to the rank's messages, this is to the run directory's events. Writers pass a
member to `RunDir.event` (which refuses any other name); readers (monitor, status, tune, the fault
matrix, the tests) compare against members. A new event is a member here and a name in the
README's run-directory table; tests/test_events.py holds the code and the table to this list.

Each line of events.jsonl is `{"event": <name>, "time": <unix seconds>, **fields}`; the comment
beside each member says when it is written and with which fields.
"""

from __future__ import annotations

import enum
from typing import Dict, FrozenSet


class Event(str, enum.Enum):
    """An event's name; a `str`, so `Event.LAUNCH == "launch"` and JSON writes the plain name."""

    # Before the ranks start (controller/run.py, from fleet/ship.py)
    SHIP = "ship"  # an item reached a host: host, what, digest, path, bytes, seconds, skipped
    SHIP_PRUNED = "ship_pruned"  # unused copies left a host's cache: host, removed (digests), bytes
    # One attempt of the group (controller/supervisor.py)
    LAUNCH = "launch"  # every rank said hello: attempt, backend, ranks [{rank, host, pid}], devices, the split
    RESUME = "resume"  # restored: step and checkpoint, or step 0 and a note when there was none
    CHECKPOINT = "checkpoint"  # rank 0 wrote one: step, agreed, stall_s, write_s
    CHECKPOINT_FAILED = "checkpoint_failed"  # a rank's warning, a write failed (training goes on): rank, step, reason
    CHECKPOINT_DAMAGED = "checkpoint_damaged"  # a rank's warning, restore skipped a damaged one: rank, path, reason
    BAD_STEP = "bad_step"  # a non-finite or spiked step every rank skipped: protocol.BadStep's fields
    ROLLBACK = "rollback"  # bad steps in a row: step, bad_steps, data_steps, skip (the data window)
    DIVERGED = "diverged"  # parameters differ: rank, ranks, hosts, step, param_checksum, rollback_to
    STALL = "stall"  # a rank was quiet too long: rank, host, step, phase, quiet_s, timeout_s, quiet
    RANK_EXIT = "rank_exit"  # a rank process ended: rank, host, and code or signal
    UNACCOUNTED = "unaccounted"  # ranks whose exit was never seen after they were killed: ranks
    # Between attempts
    RESTART = "restart"  # the group starts again from its last checkpoint: attempt, reason
    OOM = "oom"  # a rank ran out of memory: step, reason, rank, and its peak and budget (or code and evidence)
    RECONFIGURE = "reconfigure"  # the OOM policy's next split: old, new (settings), global_batch
    EXCLUDE = "exclude"  # elastic: a host left the group: host, reason
    READMIT = "readmit"  # elastic: an excluded host answers again: host
    RESIZE = "resize"  # elastic: the group's new hosts and split: hosts, devices, the split
    RESHARE = "reshare"  # elastic, after resize: the shares and caps carried to the new hosts: hosts, shares, micro_caps, note
    # Beside the run (controller/reporting.py)
    REPORT_FAILED = "report_failed"  # a --report-to tracker stopped (training goes on): backend, during, reason
    # The end of a run (ENDINGS): the last event of a run that ended
    FINISH = "finish"  # every step done: step
    STOPPED = "stopped"  # --stop-after reached, checkpointed: step
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM stopped every rank: step
    FAILED = "failed"  # gave up (restarts used up, a user error, no launch): reason

    def __str__(self) -> str:  # f"{Event.LAUNCH}" is "launch" on every Python (3.11 changed the mixin's)
        return self.value


# The events that end a run, and the state each leaves it in (monitor, status).
ENDINGS: Dict[Event, str] = {Event.FINISH: "finished", Event.STOPPED: "stopped",
                             Event.INTERRUPTED: "interrupted", Event.FAILED: "failed"}

# The events a rank may name in a protocol.RankWarning (the supervisor records them as they come).
RANK_WARNINGS: FrozenSet[Event] = frozenset({Event.CHECKPOINT_FAILED, Event.CHECKPOINT_DAMAGED})


def event(name: "Event | str") -> Event:
    """`name` as a member; a ValueError that says where to add it when it is none."""
    try:
        return Event(name)
    except ValueError:
        raise ValueError(f"unknown event {name!r}: add it to mlx_train/events.py and the README's run-directory "
                         "table") from None
