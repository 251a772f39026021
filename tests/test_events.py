"""The run's events have one vocabulary (mlx_train/events.py): the README names it, every writer in the
sources uses it, RunDir refuses any other name, and a real run writes nothing else. The metrics record
has one description (protocol.Metrics) that the README and a real run's metrics.jsonl follow."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from helpers import TINY, cli
from mlx_train import protocol
from mlx_train.events import ENDINGS, RANK_WARNINGS, Event
from mlx_train.rundir import RunDir, read_jsonl

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(REPO / "src" / "mlx_train").rglob("*.py"), *(REPO / "tools").glob("*.py")])
NAMES = {e.value for e in Event}
# Calls whose first argument names the event they write (RunDir.event, the supervisor's ending, a rank's warning).
WRITERS = {"event", "_finish", "RankWarning"}
# What a metrics.jsonl line holds besides protocol.Metrics's fields: the supervisor adds them.
ADDED_TO_METRICS = {"time", "attempt"}


def readme_row(path: str) -> str:
    """The `what` cell of the README's run-directory table row for `path`."""
    rows = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith(f"| `{path}` |")]
    assert len(rows) == 1, f"the README's run-directory table has {len(rows)} rows for {path}"
    return rows[0].split("|")[2]


def test_the_readme_names_exactly_the_vocabulary():
    cell = re.sub(r"\([^)]*\)", "", readme_row("events.jsonl"))  # the fields in parentheses are no names
    named = re.findall(r"`([^`]+)`", cell)
    assert len(named) == len(set(named)), f"named twice: {sorted(n for n in named if named.count(n) > 1)}"
    assert set(named) == NAMES, \
        f"README only: {sorted(set(named) - NAMES)}; events.py only: {sorted(NAMES - set(named))}"


def test_the_readme_describes_the_metrics_record_as_protocol_does():
    named = {w.removesuffix("[rank]") for span in re.findall(r"`([^`]+)`", readme_row("metrics.jsonl"))
             for w in span.split()}
    fields = {f.name for f in dataclasses.fields(protocol.Metrics)} | ADDED_TO_METRICS
    assert named == fields, f"README only: {sorted(named - fields)}; protocol.Metrics only: {sorted(fields - named)}"


def _names_in(arg: ast.expr):
    """The event names an argument spells out: a literal, Event.X, or either branch of `a if c else b`."""
    if isinstance(arg, ast.IfExp):
        yield from _names_in(arg.body)
        yield from _names_in(arg.orelse)
    elif isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        yield arg.value
    elif isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name) and arg.value.id == "Event":
        yield Event[arg.attr].value if arg.attr in Event.__members__ else f"Event.{arg.attr}"


def _is_event_field(node: ast.expr) -> bool:
    """`x["event"]` or `x.get("event")`: a record's name, as readers get it."""
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "event"
    return (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "get" and node.args
            and isinstance(node.args[0], ast.Constant) and node.args[0].value == "event")


def _literals(node: ast.expr):
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)]


def scan():
    """(written, unknown, literal reads) over src/ and tools/: every event name a writer spells out,
    those outside the vocabulary, and the reads that compare a record's name to a string literal."""
    written, unknown, literal_reads = set(), [], []
    for path in SOURCES:
        where = path.relative_to(REPO)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Call) and node.args:
                func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                if func in WRITERS:
                    names = list(_names_in(node.args[0]))
                elif func == "events":  # RunDir.events(kind) and the fault matrix's Ctx.events(kind)
                    names = list(_names_in(node.args[0]))
                    literal_reads += [f"{where}:{node.lineno}: events({v!r})" for v in _literals(node.args[0])]
            elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "event_name" for t in node.targets):
                names = list(_names_in(node.value))
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Event":
                names = list(_names_in(node))
            elif isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(_is_event_field(s) for s in sides):
                    literal_reads += [f"{where}:{node.lineno}: compares an event to {v!r}"
                                      for s in sides for v in _literals(s)]
            for n in names:
                written.add(n)
                if n not in NAMES:
                    unknown.append(f"{where}:{node.lineno}: {n}")
    return written, unknown, literal_reads


def test_every_event_the_sources_name_is_in_the_vocabulary():
    written, unknown, _ = scan()
    assert not unknown, "not in mlx_train/events.py: " + ", ".join(sorted(set(unknown)))
    assert written == NAMES, f"in the vocabulary but named nowhere in the sources: {sorted(NAMES - written)}"


def test_readers_compare_against_members_not_literals():
    _, _, literal_reads = scan()
    assert not literal_reads, "use Event members: " + ", ".join(literal_reads)


def test_rundir_refuses_an_unknown_event(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(ValueError, match="unknown event 'finished'"):
        run.event("finished", step=1)
    assert not run.events_path.exists(), "nothing is written for a refused name"
    # A member and its plain name (the supervisor's calls) are both accepted, and read back as the name.
    run.event(Event.LAUNCH, attempt=0)
    run.event("finish", step=1)
    assert [(e["event"], type(e["event"])) for e in run.events()] == [("launch", str), ("finish", str)]
    assert run.events(Event.FINISH) == run.events()[1:] and run.ended()


def test_a_rank_warns_only_of_a_warning_event():
    assert RANK_WARNINGS and not RANK_WARNINGS & set(ENDINGS)
    with pytest.raises(ValueError, match="warning: event 'finish'"):
        protocol.RankWarning("finish", {})
    got = protocol.parse(protocol.PREFIX + '{"kind": "warning", "event": "finish", "details": {}}')
    assert isinstance(got, protocol.Malformed) and got.why.startswith("warning: event 'finish'"), got
    for name in RANK_WARNINGS:
        assert protocol.parse(protocol.RankWarning(name.value, {"step": 1}).encode()).event == name


@pytest.mark.multiproc
def test_a_real_run_writes_only_the_vocabulary(tmp_path):
    run = tmp_path / "run"
    job = [*TINY, "--devices", "1", "--steps", "4", "--log-every", "2", "--checkpoint-every", "2",
           "--eval-every", "2", "--no-live", "--run-dir", str(run)]
    cli("train", *job, "--stop-after", "2", check=True)
    cli("train", "--resume", str(run), "--no-live", check=True)
    records = list(read_jsonl(run / "events.jsonl"))
    kinds = [r.get("event") for r in records]
    assert set(kinds) <= NAMES, f"not in the vocabulary: {sorted(set(kinds) - NAMES)}"
    assert {"launch", "checkpoint", "rank_exit", "stopped", "resume", "finish"} <= set(kinds), kinds
    assert len(RunDir(run).events()) == len(records) and kinds[-1] in ENDINGS
    # The metrics record: protocol.Metrics's fields (optional ones when set) and what the supervisor adds.
    lines = list(read_jsonl(run / "metrics.jsonl"))
    required = {f.name for f in dataclasses.fields(protocol.Metrics) if f.default is dataclasses.MISSING}
    everything = {f.name for f in dataclasses.fields(protocol.Metrics)} | ADDED_TO_METRICS
    assert lines
    for m in lines:
        assert required | ADDED_TO_METRICS <= set(m) <= everything, \
            f"step {m.get('step')}: missing {sorted(required | ADDED_TO_METRICS - set(m))}, not in protocol.Metrics " \
            f"{sorted(set(m) - everything)}"
    assert len(RunDir(run).metrics()) == len(lines) and any("val_loss" in m and "sample" in m for m in lines)
