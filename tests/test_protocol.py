"""The rank<->supervisor protocol: every kind reads back as written, bad lines are named, not acted on,
and every kind a rank sends has exactly one handler in the supervisor."""

import ast
import json
from pathlib import Path

import pytest

from mlx_train import protocol
from mlx_train.config import TrainConfig
from mlx_train.controller.supervisor import Supervision, Supervisor
from mlx_train.rundir import RunDir

SRC = Path(__file__).resolve().parent.parent / "src" / "mlx_train"

EXAMPLES = [
    protocol.Hello(rank=1, size=2, host="h1", pid=4242, python="/usr/bin/python3"),
    protocol.Budget(rank=0, budget=2**30),
    protocol.Start(step=20, steps=100, params=1234, global_batch=8),
    protocol.Heartbeat(step=21, peak=7_000_000, step_s=0.03),
    protocol.Heartbeat(step=21, peak=7_000_000),
    protocol.Phase("eval", 50),
    protocol.Phase("checkpoint", 50, done=True),
    protocol.Metrics(step=10, loss=4.3, lr=1e-3, tokens_per_s=1e4, step_time_s=0.04, comm_time_s=0.01,
                     compute_time_s=0.03, grad_norm=2.0, devices=2, grad_bytes=545792, global_batch=8,
                     peak_memory=[1, 2], param_checksum=[3, 3], val_loss=3.0),
    protocol.Resumed(step=0),
    protocol.Resumed(step=40, checkpoint="/runs/x/checkpoints/step-000040"),
    protocol.Checkpoint(step=40, path="/runs/x/checkpoints/step-000040"),
    protocol.Checkpoint(step=40, path="/c", agreed=True, param_checksum=[5, 5], stall_s=0.01, write_s=0.2),
    protocol.Checksum(step=40, value=2**32 - 1),
    protocol.RankWarning("checkpoint_damaged", {"path": "/p", "reason": "checksum mismatch"}),
    protocol.BadStep(step=7, loss=float("nan"), grad_norm=float("inf"), in_a_row=1),
    protocol.BadStep(step=7, loss=9.5, grad_norm=float("nan"), in_a_row=2, data_step=9, loss_limit=8.0),
    protocol.OutOfMemory(rank=1, step=3, peak=50, budget=40),
    protocol.Done(step=100),
    protocol.Stopped(step=60),
]


def test_examples_cover_every_kind():
    assert {type(m) for m in EXAMPLES} == set(protocol.KINDS.values())


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m.kind)
def test_round_trip(msg):
    back = protocol.parse(msg.encode())
    if isinstance(msg, protocol.BadStep):  # nan != nan: compare the text
        assert back.encode() == msg.encode()
    else:
        assert back == msg


def test_unset_optional_fields_are_not_sent():
    body = json.loads(protocol.Resumed(step=0).encode()[len(protocol.PREFIX):])
    assert body == {"kind": "resumed", "step": 0}


def test_log_text_is_not_a_message():
    assert protocol.parse("step 10 loss 4.3") is None
    assert protocol.parse("") is None


def test_prefix_after_a_tag_is_found():
    line = "[1,0]<stdout>: " + protocol.Done(step=5).encode()
    assert protocol.parse(line) == protocol.Done(step=5)


@pytest.mark.parametrize("text, why", [
    ("{not json", "not JSON"),
    ('["kind", "hb"]', "no kind"),
    ('{"step": 1}', "no kind"),
    ('{"kind": "teleport"}', "unknown kind 'teleport'"),
    ('{"kind": "hb", "peak": 1}', "hb: missing step"),
    ('{"kind": "hb", "step": "1", "peak": 1}', "hb: step is str, not int"),
    ('{"kind": "hb", "step": true, "peak": 1}', "hb: step is bool, not int"),
    ('{"kind": "hb", "step": 1.5, "peak": 1}', "hb: step is float, not int"),
    ('{"kind": "phase", "name": "eval", "step": 1, "done": 1}', "phase: done is int, not bool"),
    ('{"kind": "warning", "event": "x", "details": []}', "warning: details is list, not dict"),
])
def test_malformed_lines_say_why(text, why):
    got = protocol.parse(protocol.PREFIX + text)
    assert isinstance(got, protocol.Malformed)
    assert got.why.startswith(why), got.why
    assert got.text == text


def test_fields_a_reader_does_not_know_are_ignored():
    assert protocol.parse(protocol.PREFIX + '{"kind": "done", "step": 3, "newer": 1}') == protocol.Done(step=3)


def test_an_int_is_a_valid_float():
    hb = protocol.parse(protocol.PREFIX + '{"kind": "hb", "step": 1, "peak": 1, "step_s": 0}')
    assert hb.step_s == 0


def test_the_supervisor_handles_every_kind(tmp_path):
    sup = Supervisor(TrainConfig(), RunDir(tmp_path), [], Supervision(max_restarts=3))
    assert set(sup.handlers) == set(protocol.KINDS.values())


def _emitted_kinds():
    """Every protocol class named in an emit(...) call on the rank side."""
    found = set()
    for path in (SRC / "rank").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "emit" and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute):
                    found.add(arg.func.attr)
    return found


def test_every_kind_is_sent_by_a_rank():
    """No kind defined (and handled) that nothing sends; no emit of a kind that is not defined."""
    names = {cls.__name__ for cls in protocol.KINDS.values()}
    emitted = _emitted_kinds()
    assert emitted == names, (emitted ^ names)


def test_the_pump_logs_bad_lines_and_forwards_messages(tmp_path):
    """A rank's output line by line, as the supervisor's pump sees it (no process needed)."""
    import io
    import queue

    from mlx_train.controller.launch import RankProc
    from mlx_train.controller.group import RankGroup, _Proc

    inbox = queue.Queue()
    group = RankGroup([], RunDir(tmp_path), inbox, number=3)
    group.logs[0] = io.StringIO()
    proc = _Proc(RankProc([], {}, "localhost", [0]), popen=None)
    for line in ("plain log text", protocol.PREFIX + '{"kind": "hb", "step": "x", "peak": 1}',
                 protocol.PREFIX + "{broken", protocol.Done(step=4).encode(),
                 protocol.Heartbeat(step=4, peak=1).encode()):
        group._line(proc, line)
    log = group.logs[0].getvalue().splitlines()
    assert log[0] == "plain log text"
    assert log[1].startswith("[supervisor] ignored a malformed protocol line (hb: step is str, not int)")
    assert log[2].startswith("[supervisor] ignored a malformed protocol line (not JSON")
    assert log[3] == protocol.Done(step=4).encode() and len(log) == 4  # heartbeats are not logged
    assert [inbox.get_nowait() for _ in range(2)] == [("msg", 3, 0, protocol.Done(step=4)),
                                                      ("msg", 3, 0, protocol.Heartbeat(step=4, peak=1))]
    assert inbox.empty()


def test_a_handler_that_fails_does_not_bring_the_supervisor_down(tmp_path):
    import io

    from mlx_train.controller.group import RankGroup
    from mlx_train.controller.supervisor import _State
    from mlx_train.controller.watchdog import Watchdog

    sup = Supervisor(TrainConfig(), RunDir(tmp_path), [], Supervision(max_restarts=3))
    group = RankGroup([], RunDir(tmp_path), sup.inbox, number=0)
    group.logs[0] = io.StringIO()
    state = _State(group, Watchdog([0]))
    sup.handlers[protocol.Done] = lambda *_: 1 / 0
    assert sup._dispatch(state, 0, protocol.Done(step=1)) is None
    assert "could not handle" in group.logs[0].getvalue()
