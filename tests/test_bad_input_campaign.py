"""Bad input never meets a traceback: a generated campaign over every input mlx-train reads (issue 11).

The property, for every input the campaign generates and the tool refuses: exit code 2, exactly one
`error:` line on stderr that says what is wrong and names what to change (a flag, a file or folder
the user gave, or a command to run: `names_a_fix`), no traceback, nothing launched, and the user's
files byte-identical afterwards. Every refusal goes through the CLI, whatever function at the edge
first found it. Inputs the tool accepts must be usable (nothing launched here: the checks before
launch are the edge under test), and accepted data sets train (test_accepted_data_trains).

The CLI runs in-process (`mlx_train.cli.main.main`, stderr captured, SystemExit's code read), which
costs no process start; a sample goes through a real `mlx-train` process. A launch is the one thing
the campaign must never reach: `Supervisor.supervise` is replaced by a tripwire that fails the
example, and `configure` never probes hosts (a tripwire as well).

Bounded: a fixed number of examples per category (derandomized, so every run tries the same
inputs) and no shrinking database. TRIED counts distinct inputs (the fresh paths the campaign
makes are left out of what makes two inputs differ). With MLX_TRAIN_CAMPAIGN_TABLE=1 the run
rewrites tests/bad_input_campaign.md (the README's test section shows it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import string
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, note, seed, settings
from hypothesis import strategies as st

from helpers import TINY, cli, metrics

pytestmark = pytest.mark.timeout(600) if hasattr(pytest.mark, "timeout") else []

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "tests" / "bad_input_campaign.md"


def campaign(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


TRIED: Dict[str, Set[str]] = {}  # category -> the distinct inputs tried (tried())
LAUNCHED: list = []
FAILURES: Dict[str, dict] = {}  # category -> {failure: the first input that showed it}
SURVEY = os.environ.get("MLX_TRAIN_CAMPAIGN_SURVEY") == "1"  # collect failures instead of stopping at one

# What the campaign found on the code before its fixes (MLX_TRAIN_CAMPAIGN_SURVEY=1 on commit 4a906b3, with
# only prepare_run split out of start and main's catch-all added): distinct failures per category, each
# an exception type and place, a launch, a wrong exit or a line that does not say how to fix it.
FOUND_BEFORE_FIXES = {
    "cluster files": ["0 slots in every host: ValueError from the config check", "memory: false/negative accepted",
                      "memory as a string: TypeError in rank_budget", "huge memory: OverflowError in rank_budget",
                      "(after the cluster file gained `backend`) an unknown backend: ValueError",
                      "the same host listed twice accepted",
                      "(issue 16, every refusal through the CLI) slots or memory .inf: OverflowError in load_cluster"],
    "config": ["unknown-key message without a fix"],
    "data": ["a folder named *.jsonl: IsADirectoryError", "\"holds no text files\" without a fix",
             ".npy refusals without a fix (and an empty .npy: EOFError, found earlier)"],
    "flags": ["monitor --plot in /proc: FileNotFoundError", "monitor --plot under a file: NotADirectoryError",
              "monitor --plot FILE.txt: ValueError from matplotlib", "monitor --plot to a folder: exit 0",
              "optimize --output in /proc: FileNotFoundError after the trials",
              "optimize --output under a file: NotADirectoryError after the trials",
              "--memory-budget 1e999: OverflowError", "--rank-wrapper with unbalanced quotes: ValueError from shlex",
              "launched (--lr inf, --memory-budget 1KB, ...)", "a refused run left its --run-dir behind",
              "train --config that does not exist: no fix said", "optimize --config likewise"],
    "inventories": ["top level a list: AttributeError", "a group not a mapping: AttributeError",
                    "hosts not a mapping: TypeError", "non-UTF-8: UnicodeDecodeError"],
    "processes": ["--run-dir in /proc: FileNotFoundError", "--run-dir under a file: NotADirectoryError",
                  "--memory-budget 1KB: launched, walked the OOM ladder, exit 1", "binary --data: no fix said"],
    "run dirs": ["monitor, metrics record of another shape: KeyError", "monitor, wrong types: TypeError",
                 "monitor, non-UTF-8 metrics/events: UnicodeDecodeError",
                 "(property added later) --resume with every checkpoint damaged: accepted, restarted from step 0",
                 "(likewise) a manifest of another shape: AttributeError in checkpoint.verify, the rank crashed",
                 "(issue 16, status on every example) a non-UTF-8 .lock: UnicodeDecodeError in RunDir.supervisor"],
    "sizes & durations": ["a model that cannot fit at batch 1 launched anyway", "sizes beyond 64 bits accepted"],
}

# --------------------------------------------------------------------------------------------------
# The world the campaign runs in: a scratch directory with a small corpus, a finished run, files of
# the kinds users point the tool at by mistake.


class World:
    def __init__(self, root: Path, finished: Path):
        self.root = root
        self.n = 0
        self.small = root / "small.txt"
        self.small.write_text(("the quick brown fox jumps over the lazy dog, " * 40 + "\n") * 60)
        self.regular = root / "regular.txt"
        self.regular.write_text("just a file\n")
        self.binary = root / "binary.bin"
        self.binary.write_bytes(bytes(range(256)) * 8)
        self.empty_file = root / "empty.txt"
        self.empty_file.write_bytes(b"")
        self.empty_dir = root / "empty-dir"
        self.empty_dir.mkdir()
        self.user_dir = root / "my-notes"  # a user's folder that is not a run
        self.user_dir.mkdir()
        (self.user_dir / "todo.md").write_text("- buy milk\n")
        self.finished = finished  # a run with checkpoints (not to be touched)
        self.small_cfg = root / "small.yaml"
        self.small_cfg.write_text(f"data: {{path: {self.small}}}\nmodel: {{n_layers: 1, d_model: 32, n_heads: 2, "
                                  "seq_len: 16}\n")
        self.cwd = root / "cwd"
        self.cwd.mkdir()

    def fresh(self, name: str = "x") -> Path:
        """A new path; run directories apart from the files the campaign writes for the user."""
        self.n += 1
        return self.root / ("fresh-runs" if name == "run" else "fresh") / f"{name}-{self.n}"

    def written(self, name: str, doc: bytes, suffix: str = "") -> Path:
        """A fresh file holding the generated document."""
        path = self.fresh(name)
        path = path.with_suffix(suffix) if suffix else path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(doc)
        return path

    def user_files(self) -> Dict[str, str]:
        return {**digest(self.user_dir), **digest(self.finished), **digest(self.root, top_only=True)}


def digest(root: Path, top_only: bool = False) -> Dict[str, str]:
    out = {}
    if not root.exists():
        return out
    for p in sorted(root.iterdir() if top_only else root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir() and not top_only:
            out[str(p)] = "dir"
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("campaign")
    w = World(root, root / "finished-run")
    cli("train", *TINY, "--data", str(w.small), "--steps", "4", "--checkpoint-every", "2", "--run-dir",
        str(w.finished), "--no-live", check=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_TRAIN_STATE", str(root / "state"))
        mp.setenv("COLUMNS", "200")

        def tripwire(self):
            LAUNCHED.append(self.cfg)  # bad input got past every check before launch
            return 0

        def probe_tripwire(fn, names):
            LAUNCHED.append(("probed", names))  # configure reached the hosts with a bad inventory
            return []

        from mlx_train.controller import status, supervisor
        from mlx_train.fleet import configure

        mp.setattr(supervisor.Supervisor, "supervise", tripwire)
        # status asks a child process which BLAS a rank gets (a second a call): a fact of this
        # machine, not of the run directories that status reads here for every example.
        mp.setattr(status, "rank_blas", lambda: "not asked in the campaign")
        mp.setattr(configure.ssh, "parallel", probe_tripwire)
        yield w
    _write_table()


# --------------------------------------------------------------------------------------------------
# The property.

_FRESH = re.compile(r"(fresh(?:-runs)?/[a-z]+)-\d+")
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]")
_COMMAND = re.compile(r"`[^`]+`")
# argparse's own lines name the argument: "argument --x: ...", "unrecognized arguments: X", ...
_ARGUMENT = re.compile(r"\bargument \S+: |\barguments are required: \S|\bunrecognized arguments: \S")
# The config's checks name the key: "n_layers must be ...", "config.optim.lr must be ...".
_KEY = re.compile(r"^\s*(?:config\.)?([a-z_][\w.]*) must\b")


def tried(category: str, what) -> None:
    """Count `what` as one input of `category`; the campaign's own fresh names do not make it new."""
    TRIED.setdefault(category, set()).add(_FRESH.sub(r"\1-N", repr(what)))


def fingerprint(path: Path) -> Tuple:
    """What a file or folder holds (names, kinds, contents), apart from where the campaign put it."""
    def one(p: Path, name: str):
        if p.is_symlink():
            return name, "link", _FRESH.sub(r"\1-N", os.readlink(p))
        if p.is_file():
            return name, "file", hashlib.sha256(p.read_bytes()).hexdigest()
        return name, "dir" if p.is_dir() else "other"
    if not path.is_dir() or path.is_symlink():
        return (path.suffix, one(path, ""))
    return (path.suffix, *(one(c, str(c.relative_to(path))) for c in sorted(path.rglob("*"))))


def config_keys(cls=None) -> Set[str]:
    """Every key of the config, nested ones included."""
    import dataclasses
    import typing

    from mlx_train.config import TrainConfig

    cls = cls or TrainConfig
    hints = typing.get_type_hints(cls)
    keys = set()
    for f in dataclasses.fields(cls):
        keys.add(f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= config_keys(hints[f.name])
    return keys


def names_a_fix(message: str, argv: List[str]) -> bool:
    """The refusal names what to change: a flag (one the user gave or one to pass), an argument in
    argparse's words, a config key, a file or folder the user gave (or one inside it), or a command
    to run (in backquotes). "see --help" alone names nothing, and a config key the user set with a
    flag must come with that flag ("(from flags)" leaves them to guess which one)."""
    if "(from flags)" in message:
        return False
    if any(f != "--help" for f in _FLAG.findall(message)) or _COMMAND.search(message) or _ARGUMENT.search(message):
        return True
    key = _KEY.match(message)
    if key and key.group(1).split(".")[-1] in config_keys():
        return True
    paths = {a.split("=", 1)[-1] for a in argv if "/" in a}
    return any(p.rstrip("/") and p.rstrip("/") in message for p in paths)


def run_main(argv: List[str], cwd: Path) -> Tuple[int, str, str]:
    from mlx_train.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    LAUNCHED.clear()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 1
            except Exception as exc:  # what a user would see as a traceback
                code, _ = 1, err.write(f"Traceback (escaped main): {type(exc).__name__}: {exc}\n")
    finally:
        os.chdir(old)
    return code, out.getvalue(), err.getvalue()


def _crash_site(err: str) -> str:
    """The innermost mlx_train frame and exception of an internal error's log (its signature)."""
    m = re.search(r"please report it with (\S+)", err)
    if not m or not Path(m.group(1)).is_file():
        return "internal error"
    tb = Path(m.group(1)).read_text()
    frames = re.findall(r'File "[^"]*?(mlx_train/[^"]+)", line (\d+), in (\w+)', tb)
    last = tb.strip().splitlines()[-1].split(":")[0]
    return f"{last} at {frames[-1][0]}:{frames[-1][2]}" if frames else last


def failure_of(code: int, out: str, err: str, argv: List[str]) -> Optional[str]:
    """Why this refusal of `argv` breaks the property (a short signature), or None."""
    text = out + err
    if "internal error" in err:
        return f"crash: {_crash_site(err)}"
    if "Traceback" in text:
        m = re.search(r"Traceback \(escaped main\): (\w+)", text)
        return f"traceback on screen{': ' + m.group(1) if m else ''}"
    if LAUNCHED:
        return "launched"
    if code != 2:
        return f"exit {code}"
    lines = [line for line in err.splitlines() if line.strip()]
    if len(lines) != 1 or "error:" not in lines[0]:
        return f"{len(lines)} stderr lines"
    if not names_a_fix(lines[0].split("error:", 1)[1], argv):
        return f"no fix named in: {re.sub(r'[0-9]+', 'N', lines[0])[:80]}"
    return None


def expect_refused(category: str, argv: List[str], w: World, *, cwd: Optional[Path] = None,
                   also_unchanged: Tuple[Path, ...] = ()) -> Tuple[int, str, str]:
    before = {**w.user_files(), **{k: v for p in also_unchanged for k, v in digest(p).items()}}
    code, out, err = run_main(argv, cwd or w.cwd)
    _note(f"argv={argv!r}\nexit={code}\nstdout={out[-2000:]}\nstderr={err[-2000:]}")
    why = failure_of(code, out, err, argv)
    after = {**w.user_files(), **{k: v for p in also_unchanged for k, v in digest(p).items()}}
    if why is None and after != before:
        changed = sorted(set(after.items()) ^ set(before.items()))
        why = f"changed the user's files: {changed[0][0]}"
    record(category, why, argv, err)
    return code, out, err


def _note(text: str) -> None:
    try:
        note(text)
    except Exception:  # outside a hypothesis test (the parametrized ones): pytest shows the assertion
        pass


def record(category: str, why: Optional[str], what, err: str = "") -> None:
    if why is None:
        return
    why = re.sub(r"\d+", "N", why)  # one failure, whatever the numbers
    FAILURES.setdefault(category, {}).setdefault(why, f"{what!r}"[:300] + f" -> {err.strip()[-200:]}")
    if not SURVEY:
        raise AssertionError(f"{category}: {why}\ninput: {what!r}\nstderr: {err}")


def edge(category: str, fn, *args, **kw):
    """Call a function at the input's edge: it returns, or refuses with a one-line UserError; anything
    else is a failure. Returns (value or None, the UserError or None)."""
    from mlx_train.errors import UserError

    try:
        return fn(*args, **kw), None
    except UserError as exc:  # its one line on screen is checked through the CLI (expect_refused)
        return None, exc
    except Exception as exc:  # noqa: BLE001 - any other exception is what the campaign looks for
        import traceback

        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "mlx_train" in f.filename]
        site = f"{frames[-1].filename.split('mlx_train/')[-1]}:{frames[-1].name}" if frames else "?"
        record(category, f"crash: {type(exc).__name__} at {site}", (args, kw), repr(exc))
        return None, None


# --------------------------------------------------------------------------------------------------
# Generators.

junk = st.one_of(st.sampled_from(["abc", "", " ", "1.5", "0x10", "1e3", "--", "nan", "inf", "-inf", "9" * 400,
                                  "1,000", "١٢", "∞", "None", "null", "true", "[1]"]),
                 st.text(string.printable, max_size=6))


def _is(kind, s: str) -> bool:
    try:
        kind(s)
        return True
    except (ValueError, OverflowError):
        return False


not_int = junk.filter(lambda s: not _is(int, s))
not_float = junk.filter(lambda s: not _is(float, s))
bad_pos_int = st.one_of(st.integers(max_value=0).map(str), st.integers(min_value=2**31, max_value=10**40).map(str),
                        not_int)
bad_count = st.one_of(st.integers(max_value=-1).map(str), not_int)  # >= 0 expected

GOOD = {  # flag -> valid values (small: never a big model or a long run)
    "--layers": st.sampled_from(["1", "2"]), "--width": st.sampled_from(["32", "64"]),
    "--heads": st.sampled_from(["1", "2"]), "--seq-len": st.sampled_from(["16", "32"]),
    "--batch-size": st.sampled_from(["1", "2", "4"]), "--accumulation": st.sampled_from(["1", "2"]),
    "--steps": st.sampled_from(["1", "5", "50"]), "--lr": st.sampled_from(["1e-3", "0.01"]),
    "--warmup": st.sampled_from(["0", "3"]), "--backend": st.sampled_from(["ring", "mpi"]),
    "--precision": st.sampled_from(["fp32", "bf16"]), "--grad-checkpoint": st.just(None),
    "--seed": st.sampled_from(["0", "7"]), "--log-every": st.sampled_from(["1", "10"]),
    "--eval-every": st.sampled_from(["5"]), "--checkpoint-every": st.sampled_from(["5"]),
    "--keep-checkpoints": st.sampled_from(["1", "3"]), "--memory-budget": st.sampled_from(["2GiB", "4000000000"]),
    "--max-restarts": st.sampled_from(["0", "2"]), "--stall-timeout": st.sampled_from(["30", "600.5"]),
    "--stop-after": st.sampled_from(["1", "3"]), "--no-live": st.just(None), "--devices": st.sampled_from(["1", "2"]),
}


def bad_values(w: World) -> Dict[str, st.SearchStrategy]:
    under_file = str(w.regular / "sub")
    return {
        **{f: bad_pos_int for f in ("--layers", "--width", "--heads", "--seq-len", "--batch-size", "--accumulation",
                                    "--steps", "--log-every", "--eval-every", "--checkpoint-every",
                                    "--keep-checkpoints", "--devices")},
        "--seed": st.one_of(st.integers(max_value=-1).map(str), st.integers(min_value=2**32, max_value=10**30)
                            .map(str), not_int),
        "--lr": st.one_of(st.sampled_from(["0", "-1", "nan", "inf", "-inf", "1e999"]), not_float),
        "--warmup": st.one_of(bad_count, st.integers(min_value=2**31, max_value=10**30).map(str)),
        "--backend": st.sampled_from(["tcp", "RING", "", "jaccl", "nccl"]),
        "--precision": st.sampled_from(["fp16", "FP32", "", "int8"]),
        "--model": st.sampled_from(["transformerzz", "no_such_pkg.models:build", ":", "gpt:", ":build", "a:b:c",
                                    "mlx_train:nothing_here", "os:sep", ".:x", "..rel:x"]),
        "--data": st.sampled_from([str(w.root / "nope"), str(w.empty_file), str(w.binary), str(w.empty_dir),
                                   "/dev/null", str(w.regular) + "/x.txt", "/proc/self/nonexistent"]),
        "--memory-budget": st.one_of(st.sampled_from(["0", "-1", "abc", "1e999", "nan", "inf", "1KB", "12", "1.5QB",
                                                      "", "1e-9", "0.4", "GiB", "-2GiB", "1 2"]), not_float),
        "--stall-timeout": st.one_of(st.sampled_from(["0", "-5", "nan", "inf", "1e999", "-inf", "1e-320"]),
                                     not_float),
        "--max-restarts": bad_count,
        "--stop-after": st.one_of(st.integers(max_value=0).map(str), not_int),
        "--rank-wrapper": st.sampled_from(["'unclosed", "no-such-program-xyz --flag", '"a', "./nope"]),
        "--config": st.sampled_from([str(w.root / "nope.yaml"), str(w.empty_dir), str(w.binary)]),
        "--resume": st.sampled_from([str(w.root / "nope"), str(w.regular), str(w.user_dir), str(w.empty_dir),
                                     "/proc/self"]),
        "--run-dir": st.sampled_from([under_file, "/proc/mlx-train-x", str(w.regular), "/dev/null",
                                      str(w.user_dir), str(w.finished), "/proc/self/x/y"]),
        "--cluster": st.sampled_from([str(w.root / "nope.yaml"), str(w.regular), str(w.binary), str(w.empty_file),
                                      str(w.empty_dir)]),
        "--report-to": st.sampled_from(["tensorbord", "", ",", "wandb,,", "csv", "TENSORBOARD ", "none,mlflow"]),
        "--fine-tune": st.sampled_from(["qlora", "", "LoRA", "full,lora"]),
        "--lora-rank": st.one_of(bad_pos_int, not_int),
        "--lrr": st.just("1"), "--batch_size": st.just("2"), "--distributed": st.just(None),
    }


# --------------------------------------------------------------------------------------------------
# 1. Command-line flags and their combinations (train).


@st.composite
def train_argv(draw, w: World):
    bad = bad_values(w)
    n_bad = draw(st.integers(1, 3))
    bad_flags = draw(st.lists(st.sampled_from(sorted(bad)), min_size=n_bad, max_size=n_bad, unique=True))
    good_flags = draw(st.lists(st.sampled_from(sorted(set(GOOD) - set(bad_flags))), max_size=4, unique=True))
    pairs = [(f, draw(bad[f])) for f in bad_flags] + [(f, draw(GOOD[f])) for f in good_flags]
    pairs = draw(st.permutations(pairs))
    argv = ["train", "--data", str(w.small), "--run-dir", str(w.fresh("run"))]
    for flag, value in pairs:
        argv += [flag] if value is None else [f"{flag}={value}"]  # "=": a value may start with "-"
    return argv


@pytest.mark.parametrize("chunk", range(2))
def test_train_flags(world, chunk):
    # A seed of its own per chunk: derandomized, every chunk would draw from the same seed (the
    # digest of this function's source) and try the same command lines.
    @seed(chunk)
    @campaign(100)
    @given(argv=train_argv(world))
    def prop(argv):
        tried("flags", argv)
        run_dir = Path(argv[argv.index("--run-dir") + 1])
        expect_refused("flags", argv, world)
        if run_dir.parent == world.root / "fresh-runs":
            record("flags", "left a run directory behind" if run_dir.exists() else None, argv)

    prop()


OTHER_COMMANDS = [
    ["monitor", "/no/such/run", "--once"], ["monitor", "{regular}", "--once"], ["monitor", "{user_dir}", "--once"],
    ["monitor", "{empty_dir}", "--once"], ["monitor", "{finished}", "--plot", "/proc/x.png"],
    ["monitor", "{finished}", "--plot", "{regular}/x.png"], ["monitor", "{finished}", "--plot", "{root}/out.txt"],
    ["monitor", "{finished}", "--plot", "{empty_dir}"], ["monitor", "--once"],
    ["status", "--cluster", "/no/such.yaml"], ["status", "--cluster", "{binary}"],
    ["status", "--cluster", "{regular}"],
    ["check-network", "--cluster", "/no/such.yaml"], ["check-network", "--cluster", "{regular}"],
    ["check-network", "--size-mb", "nan"], ["check-network", "--size-mb", "-1"], ["check-network", "--size-mb", "0"],
    ["check-network", "--size-mb", "inf"], ["check-network", "--backend", "tcp"],
    ["configure"], ["configure", "--distributed", "--inventory", "/no/such.yml"],
    ["configure", "--distributed", "--inventory", "{empty_dir}"],
    ["optimize", "--trial-steps", "0"], ["optimize", "--trial-steps", "x"], ["optimize", "--memory-budget", "1e999"],
    ["optimize", "--memory-budget", "lots"], ["optimize", "--devices", "0"], ["optimize", "--config", "/no/such.yaml"],
    ["optimize", "--output", "{regular}/x.yaml"], ["optimize", "--output", "/proc/x/y.yaml"],
    ["optimize", "--memory-budget", "1KB", "--config", "{small_cfg}"],
    ["train", "--resume"], ["frobnicate"], [], ["train", "extra-positional"],
]


@pytest.mark.parametrize("argv", OTHER_COMMANDS, ids=lambda a: " ".join(a)[:40])
def test_other_commands(world, argv):
    argv = [a.format(**{k: str(v) for k, v in vars(world).items() if isinstance(v, Path)}) for a in argv]
    tried("flags", argv)
    expect_refused("flags", argv, world)


# --------------------------------------------------------------------------------------------------
# 2. Config YAML: types, unknown keys, nesting, huge numbers, empty files, non-UTF-8.

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.integers(min_value=2**31, max_value=10**400),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                    st.sampled_from(["8GiB", "1KB", "gpt", "ring", "bf16", "/no/such"]))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                      max_leaves=5)


def _config_keys():
    import dataclasses
    import typing

    from mlx_train.config import TrainConfig

    out = {}
    for f in dataclasses.fields(TrainConfig):
        hint = typing.get_type_hints(TrainConfig)[f.name]
        out[f.name] = [g.name for g in dataclasses.fields(hint)] if dataclasses.is_dataclass(hint) else None
    return out


@st.composite
def config_docs(draw) -> bytes:
    keys = _config_keys()
    kind = draw(st.sampled_from(["structured"] * 5 + ["text", "bytes", "special"]))
    if kind == "text":
        return draw(st.text(max_size=60)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=60))
    if kind == "special":
        return draw(st.sampled_from([
            b"", b"---\n", b"a: 1\n---\nb: 2\n", b"[" * 3000 + b"]" * 3000, b"steps: 1e400\n",
            b"steps: " + b"9" * 500 + b"\n", b"!!python/object/apply:os.system ['true']\n", b"a: &a [*a]\n",
            b"model: &m {n_layers: 2}\ndata: *m\n", b"\xff\xfe\x00s\x00t\x00", "steps: 5\u00e9\n".encode("latin-1"),
            b"steps: 5\n\x00", b"{", b"- 1\n- 2\n", b"42\n", b"steps: !!binary aGVsbG8=\n", b"? [a]\n: 1\n",
            b"model:\n  n_layers: 2\n  n_layers: 3\n", b"dist:\n  num_devices: 1\n" * 2000,
        ]))
    doc = {}
    for key in draw(st.lists(st.sampled_from(sorted(keys) + ["unknown", "Steps", "model.n_layers"]), max_size=4,
                             unique=True)):
        sub = keys.get(key)
        if sub and draw(st.booleans()):
            doc[key] = {k: draw(values) for k in draw(st.lists(st.sampled_from(sub + ["typo"]), max_size=3,
                                                               unique=True))}
        else:
            doc[key] = draw(values)
    try:
        return yaml.safe_dump(doc, allow_unicode=draw(st.booleans())).encode()
    except (yaml.YAMLError, ValueError):
        return b"{"


def _prepare(world: World, flags: dict, **opts):
    from mlx_train.config import RunOptions
    from mlx_train.controller.run import prepare_run

    if "resume" not in opts:
        flags = {"data": {"path": str(world.small)}, **flags}
    return prepare_run(flags, RunOptions(run_dir=str(world.fresh("run")), **opts))


@campaign(200)
@given(doc=config_docs())
def test_config_files(world, doc):
    tried("config", doc)
    path = world.written("config", doc)
    before = digest(path.parent)
    result, refusal = edge("config", _prepare, world, {}, config=str(path))
    record("config", None if digest(path.parent).get(str(path)) == before.get(str(path)) else "config file changed",
           doc)
    if refusal is not None:
        expect_refused("config", ["train", "--config", str(path), "--data", str(world.small), "--run-dir",
                                  str(world.fresh("run"))], world)
    if result is not None:
        cfg = result[0]
        record("config", None if _usable(cfg) else "accepted an unusable config", doc)


def _usable(cfg) -> bool:
    import math

    floats = [cfg.optim.lr, cfg.optim.min_lr_ratio, cfg.optim.weight_decay, cfg.optim.beta1, cfg.optim.beta2,
              cfg.optim.grad_clip, cfg.data.val_fraction]
    ints = [cfg.steps, cfg.seed, cfg.model.n_layers, cfg.model.d_model, cfg.model.seq_len, cfg.optim.warmup_steps,
            cfg.dist.batch_size_per_device, cfg.dist.gradient_accumulation, cfg.keep_checkpoints]
    return all(math.isfinite(x) for x in floats) and all(0 <= x < 2**32 for x in ints)


# --------------------------------------------------------------------------------------------------
# 3. Data files and directories: empty, binary, huge lines, JSONL with wrong or missing keys, .npy.

json_lines = st.one_of(
    st.builds(lambda v: json.dumps({"text": v}), st.text(max_size=20)),
    st.builds(json.dumps, values), st.just("{"), st.just(""), st.just("\"text\""),
    st.builds(lambda v: json.dumps({"txt": v}), st.text(max_size=5)),
    st.builds(lambda v: json.dumps({"text": v}), st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=3)))),
)


@st.composite
def datasets(draw, w: World) -> Path:
    root = w.fresh("data")
    root.parent.mkdir(parents=True, exist_ok=True)
    kind = draw(st.sampled_from(["text", "jsonl", "npy", "dir", "odd"]))
    if kind == "text":
        path = root.with_suffix(draw(st.sampled_from([".txt", "", ".md", ".TXT"])))
        content = draw(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                                 st.sampled_from([b"", b"\0" * 100, b"x" * 3_000_000, b"\n" * 5000,
                                                  b"\xff\xfe" + "hi".encode("utf-16-le") * 1000])))
        path.write_bytes(content)
    elif kind == "jsonl":
        path = root.with_suffix(".jsonl")
        lines = draw(st.lists(json_lines, max_size=6))
        path.write_bytes("\n".join(lines).encode() + draw(st.sampled_from([b"", b"\n", b"\xff\n", b"\0"])))
    elif kind == "npy":
        path = root.with_suffix(".npy")
        choice = draw(st.sampled_from(["floats", "2d", "negative", "empty", "huge", "garbage", "bool", "ok-small",
                                       "object", "uint64max", "truncated"]))
        arrays = {"floats": np.linspace(0, 1, 500), "2d": np.zeros((40, 40), dtype=np.int32),
                  "negative": np.arange(-5, 500), "empty": np.zeros(0, dtype=np.int64),
                  "huge": np.array([0, 2**40] * 500, dtype=np.int64), "bool": np.ones(900, dtype=bool),
                  "ok-small": np.arange(10, dtype=np.int32), "uint64max": np.full(900, 2**64 - 1, dtype=np.uint64),
                  "object": None, "garbage": None, "truncated": None}
        if choice == "garbage":
            path.write_bytes(draw(st.binary(max_size=100)))
        elif choice == "object":
            np.save(path, np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
        elif choice == "truncated":
            np.save(path, np.arange(5000, dtype=np.int32))
            path.write_bytes(path.read_bytes()[:300])
        else:
            np.save(path, arrays[choice])
    elif kind == "dir":
        path = root.with_suffix(draw(st.sampled_from(["", ".jsonl", ".npy"])))
        path.mkdir()
        for i, content in enumerate(draw(st.lists(st.binary(max_size=50), max_size=3))):
            (path / f"f{i}.txt").write_bytes(content)
        if draw(st.booleans()):
            (path / "loop").symlink_to(path)
        if draw(st.booleans()):
            os.mkfifo(path / "pipe")
    else:
        path = root.with_suffix(".txt")
        which = draw(st.sampled_from(["fifo", "dangling", "self-link"]))
        if which == "fifo":
            os.mkfifo(path)
        elif which == "dangling":
            path.symlink_to(root / "gone")
        else:
            path.symlink_to(path)
    return path


ACCEPTED_DATA: Dict[int, List[Path]] = {}  # id(world) -> the data sets the data campaign accepted


def accepted_data(world: World) -> List[Path]:
    """Runs the data campaign once per world; the data sets it accepted, one of each fingerprint."""
    if id(world) not in ACCEPTED_DATA:
        ACCEPTED_DATA[id(world)] = []
        _data_files(world)
    return ACCEPTED_DATA[id(world)]


def test_data_files(world):
    accepted_data(world)


@campaign(150)
@given(data=st.data())
def _data_files(world, data):
    path = data.draw(datasets(world))
    tried("data", fingerprint(path))
    before = digest(path.parent)
    result, refusal = edge("data", _prepare, world, {"data": {"path": str(path)}, "model": {"seq_len": 16},
                                                     "dist": {"batch_size_per_device": 1}})
    record("data", None if digest(path.parent) == before else "changed the data", path)
    if refusal is not None:
        expect_refused("data", ["train", "--data", str(path), "--seq-len", "16", "--batch-size", "1", "--run-dir",
                                str(world.fresh("run"))], world)
    elif result is not None and all(fingerprint(path) != fingerprint(p) for p in ACCEPTED_DATA[id(world)]):
        ACCEPTED_DATA[id(world)].append(path)


# --------------------------------------------------------------------------------------------------
# 4. Run directories given to --resume and monitor: damaged config.yaml, metrics, events, manifests,
#    safetensors, logs.


@st.composite
def damaged_runs(draw, w: World) -> Path:
    run = w.fresh("damaged")
    shutil.copytree(w.finished, run, symlinks=True)
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(files + ["config.yaml", "metrics.jsonl", "events.jsonl"]))
        target = run / name
        how = draw(st.sampled_from(["delete", "truncate", "garbage", "append", "json-other", "dir", "empty",
                                    "yaml-other", "nonutf8"]))
        if how in ("delete", "dir") and target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
            if how == "dir":
                target.mkdir()
        elif how == "truncate" and target.is_file():
            data = target.read_bytes()
            target.write_bytes(data[:draw(st.integers(0, max(0, len(data) - 1)))])
        elif how == "garbage" and target.is_file():
            target.write_bytes(draw(st.binary(max_size=80)))
        elif how == "append" and target.is_file():
            with target.open("ab") as fh:
                fh.write(draw(st.sampled_from([b"{\"step\": \"x\"}\n", b"[1,2]\n", b"null\n", b"{}\n", b"\xff\xfe\n",
                                                b"{\"event\": 3, \"time\": \"t\"}\n", b"{\"step\": 1e999}\n",
                                                b"{\"step\": 2, \"loss\": null}\n"])))
        elif how == "json-other" and target.is_file():
            target.write_text(json.dumps(draw(values)) + "\n")
        elif how == "yaml-other" and target.is_file():
            target.write_text(yaml.safe_dump(draw(values)))
        elif how == "nonutf8" and target.is_file():
            target.write_bytes(b"\xff\xfe\xfa" + target.read_bytes()[:50])
        elif how == "empty" and target.is_file():
            target.write_bytes(b"")
    return run


@campaign(120)
@given(data=st.data())
def test_run_directories(world, data):
    run = data.draw(damaged_runs(world))
    before = digest(run)
    # monitor reads what it can: a snapshot (exit 0) or a one-line refusal, never a crash.
    extra = ["--performance"] if data.draw(st.booleans()) else []
    tried("run dirs", (fingerprint(run), extra))
    argv = ["monitor", str(run), "--once", *extra]
    code, out, err = run_main(argv, world.cwd)
    note(f"monitor: exit {code}\n{out[-1500:]}\n{err[-1500:]}")
    why = None if code == 0 and "Traceback" not in out + err else failure_of(code, out, err, argv)
    record("run dirs", why and f"monitor: {why}", run, err)
    # status lists the runs under ./runs, this one among them.
    status_cwd = world.fresh("status")
    (status_cwd / "runs").mkdir(parents=True)
    (status_cwd / "runs" / run.name).symlink_to(run)
    code, out, err = run_main(["status", "--local"], status_cwd)
    why = None if code == 0 and "Traceback" not in out + err else failure_of(code, out, err, [str(run)])
    record("run dirs", why and f"status: {why}", run, err)
    # --resume: refused in one line before launch, or accepted (the rank then resumes what is intact).
    result, refusal = edge("run dirs", _prepare, world, {}, resume=str(run))
    if refusal is not None:
        record("run dirs", None if digest(run) == before else "resume refusal changed the run", run)
        expect_refused("run dirs", ["train", "--resume", str(run)], world, also_unchanged=(run,))
    elif result is not None:
        record("run dirs", None if digest(run).keys() >= before.keys() else "resume deleted files", run)
        from mlx_train.rank.checkpoint import list_steps, verify

        steps = list_steps(run / "checkpoints")
        intact = any(verify(p) is None for p in steps)
        record("run dirs", None if intact or not steps else "resume accepted with every checkpoint damaged", run)


# --------------------------------------------------------------------------------------------------
# 5. Inventories and cluster files: missing fields, wrong types, unknown hosts, duplicate addresses.

host_entries = st.one_of(
    st.fixed_dictionaries({"name": st.sampled_from(["h1", "h2", "localhost"]),
                           "addr": st.sampled_from(["10.0.0.1", "10.0.0.2", "not-an-ip", ""]),
                           "python": st.sampled_from(["/usr/bin/python3", "python3", ""])},
                          optional={"slots": st.one_of(st.integers(-2, 3), scalars),
                                    "memory": st.one_of(st.integers(-1, 2**36), scalars), "iface": scalars,
                                    "extra": scalars}),
    st.fixed_dictionaries({}, optional={"name": scalars, "addr": scalars, "python": scalars, "slots": scalars}))


@st.composite
def cluster_docs(draw) -> bytes:
    kind = draw(st.sampled_from(["structured"] * 4 + ["raw"]))
    if kind == "raw":
        return draw(st.one_of(st.binary(max_size=40), st.sampled_from([b"", b"hosts:\n", b"hosts: 3\n", b"- a\n",
                                                                       b"hosts: [1, 2]\n", b"{"])))
    hosts = draw(st.lists(st.one_of(host_entries, values), max_size=3))
    doc = {"hosts": hosts, **draw(st.fixed_dictionaries({}, optional={"backend": scalars}))}
    return yaml.safe_dump(doc).encode()


def _hosts_ok(hosts) -> Optional[str]:
    addrs = [(h.name, h.addr) for h in hosts]
    if any(not isinstance(h.slots, int) or h.slots < 1 for h in hosts):
        return "accepted slots < 1"
    if any(h.memory is not None and (not isinstance(h.memory, int) or h.memory <= 0) for h in hosts):
        return "accepted a memory that is not positive bytes"
    if len({a for _, a in addrs}) != len(addrs):
        return "accepted duplicate addresses"
    return None


def test_cluster_files(world):
    _cluster_files(world)


def test_inventories(world):
    _inventories(world)


@campaign(150)
@given(doc=cluster_docs())
def _cluster_files(world, doc):
    from mlx_train.config import RunOptions, TrainConfig
    from mlx_train.controller.run import hosts_for
    from mlx_train.rank.device import rank_budget_for

    tried("cluster files", doc)
    path = world.written("cluster", doc, ".yaml")
    result, refusal = edge("cluster files", hosts_for, RunOptions(cluster=str(path)), TrainConfig(), {})
    if result is not None:
        hosts, _ = result
        record("cluster files", _hosts_ok(hosts), doc)
        edge("cluster files", rank_budget_for, TrainConfig(), hosts)
    elif refusal is not None:
        expect_refused("cluster files", ["train", "--cluster", str(path), "--data", str(world.small), "--run-dir",
                                         str(world.fresh("run"))], world)


@st.composite
def inventory_docs(draw) -> bytes:
    kind = draw(st.sampled_from(["structured"] * 3 + ["raw"]))
    if kind == "raw":
        return draw(st.one_of(st.binary(max_size=40), st.sampled_from([b"", b"all:\n", b"- a\n", b"all: 3\n",
                                                                       b"all:\n  hosts: [h1]\n", b"{"])))
    group = st.recursive(st.fixed_dictionaries({}, optional={
        "hosts": st.one_of(st.dictionaries(st.sampled_from(["h1", "h2", "10.0.0.1"]),
                                           st.one_of(st.none(), st.dictionaries(
                                               st.sampled_from(["ansible_host", "mlx_interface", "ansible_user"]),
                                               scalars, max_size=2)), max_size=2), scalars),
        "vars": st.one_of(st.dictionaries(st.sampled_from(["mlx_train_venv", "ansible_user"]), scalars, max_size=2),
                          scalars)}),
        lambda c: st.fixed_dictionaries({"children": st.dictionaries(st.sampled_from(["g1", "g2"]), c, max_size=2)}),
        max_leaves=3)
    return yaml.safe_dump(draw(st.dictionaries(st.sampled_from(["all", "macs"]), st.one_of(group, scalars),
                                               max_size=2))).encode()


@campaign(80)
@given(doc=inventory_docs())
def _inventories(world, doc):
    from mlx_train.fleet import configure

    tried("inventories", doc)
    path = world.written("inventory", doc, ".yml")
    hosts, refusal = edge("inventories", configure._parse_yaml_inventory, path)
    if hosts:
        record("inventories", None if all(isinstance(v, dict) for v in hosts.values()) else "host vars not a mapping",
               doc)
    elif refusal is not None or hosts == {}:
        # Through `configure` on a machine without Ansible, where this parser is what reads the
        # inventory (with ansible-inventory on PATH it would read it instead, at a process a call).
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(configure, "shutil", _NoAnsible())
            expect_refused("inventories", ["configure", "--distributed", "--inventory", str(path), "--output",
                                           str(world.fresh("cluster")), "--hostfile", str(world.fresh("hostfile"))],
                           world)


class _NoAnsible:
    """`shutil` as configure sees it on a machine without Ansible."""

    @staticmethod
    def which(*_args, **_kw):
        return None


# --------------------------------------------------------------------------------------------------
# 6. Sizes and durations.

sizes = st.one_of(st.text(max_size=10), st.builds(lambda n, u: f"{n}{u}", st.one_of(
    st.integers(-10, 10**30), st.floats(allow_nan=True, allow_infinity=True)), st.sampled_from(
    ["", "B", "KB", "kib", "MiB", "GB", "gib", "TB", "PB", "XB", " GiB", "GiB "])))


@campaign(300)
@given(text=sizes)
def test_sizes(world, text):
    from mlx_train.units import parse_bytes

    tried("sizes & durations", text)
    value, refusal = edge("sizes & durations", parse_bytes, text)
    if value is not None:
        record("sizes & durations", None if isinstance(value, int) and 0 < value < 2**63 else
               f"parsed to {value!r}", text)
    elif refusal is not None:
        expect_refused("sizes & durations", ["train", "--data", str(world.small), "--run-dir", str(world.fresh("run")),
                                             f"--memory-budget={text}"], world)


@campaign(80)
@given(budget=st.one_of(sizes, st.sampled_from(["1KB", "1MB", "100MB", "8GiB"])),
       stall=st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), not_float, st.just("30")),
       layers=st.sampled_from(["2", "64", "100000"]), width=st.sampled_from(["64", "4096", "65536"]))
def test_budgets_and_durations_before_launch(world, budget, stall, layers, width):
    """Sizes and durations through the CLI; a budget the planner can judge is judged before launch."""
    argv = ["train", "--data", str(world.small), "--run-dir", str(world.fresh("run")), f"--memory-budget={budget}",
            f"--stall-timeout={stall}", "--layers", layers, "--width", width, "--heads", "2", "--seq-len", "16",
            "--batch-size", "1", "--steps", "2"]
    tried("sizes & durations", argv)
    code, out, err = run_main(argv, world.cwd)
    note(f"argv={argv}\nexit={code}\n{err}")
    if not LAUNCHED:
        expect_refused("sizes & durations", argv, world)
        return
    # Launched: then the budget holds the model at batch 1 with checkpointing in fp32 or bf16 (the
    # planner's smallest step), and the stall timeout is a real duration.
    import math

    from mlx_train.planning.memory import ModelShape, step_memory

    cfg = LAUNCHED[0]
    least = min(step_memory(ModelShape.from_config(cfg.model), 1, 1, True, p).peak for p in ("fp32", "bf16"))
    why = None
    if cfg.memory_budget is None or cfg.memory_budget < least:
        why = f"launched with a budget below the smallest step ({cfg.memory_budget} < {least})"
    elif not math.isfinite(float(stall)) or float(stall) <= 0:
        why = f"launched with --stall-timeout {stall}"
    record("sizes & durations", why, argv, err)


# --------------------------------------------------------------------------------------------------
# The same property through real processes, for a sample.

PROCESS_SAMPLE = [
    ["train", "--run-dir", "{regular}/sub"], ["train", "--run-dir", "/proc/mlx-train-x"],
    ["train", "--memory-budget", "1KB", "--data", "{small}"], ["train", "--config", "{binary}"],
    ["train", "--data", "{binary}"], ["train", "--lr", "nan"], ["monitor", "{empty_dir}"],
    ["train", "--resume", "{user_dir}"], ["train", "--stall-timeout", "inf", "--batch-size", "0"],
    ["train", "--memory-budget", "1.5QB", "--data", "{small}"], ["train", "--cluster", "{binary}", "--data", "{small}"],
    ["configure", "--distributed", "--inventory", "{binary}", "--output", "{root}/fresh/c.yaml"],
]


@pytest.mark.parametrize("argv", PROCESS_SAMPLE, ids=lambda a: " ".join(a)[:40])
def test_in_a_real_process(world, argv):
    argv = [a.format(**{k: str(v) for k, v in vars(world).items() if isinstance(v, Path)}) for a in argv]
    tried("processes", argv)
    before = world.user_files()
    proc = cli(*argv, cwd=world.cwd, timeout=120, env={"MLX_TRAIN_STATE": str(world.root / "state")})
    why = failure_of(proc.returncode, proc.stdout, proc.stderr, argv)
    if why is None and world.user_files() != before:
        why = "changed the user's files"
    record("processes", why, argv, proc.stderr)


# --------------------------------------------------------------------------------------------------


def _write_table() -> None:
    if os.environ.get("MLX_TRAIN_CAMPAIGN_TABLE") != "1" or not TRIED:
        return
    rows = ["| category | distinct inputs tried (last run) | distinct failures found before the fixes | failing now |",
            "|---|---:|---:|---:|"]
    for cat in sorted(set(TRIED) | set(FOUND_BEFORE_FIXES)):
        found = FOUND_BEFORE_FIXES.get(cat, [])
        rows.append(f"| {cat} | {len(TRIED.get(cat, ()))} | {len(found)} | {len(FAILURES.get(cat, ()))} |")
    lines = ["# Bad-input campaign (tests/test_bad_input_campaign.py)", "",
             "Written by `MLX_TRAIN_CAMPAIGN_TABLE=1 pytest tests/test_bad_input_campaign.py`.", "", *rows, "",
             "What it found before the fixes:", ""]
    for cat in sorted(FOUND_BEFORE_FIXES):
        lines += [f"- {cat}: " + "; ".join(FOUND_BEFORE_FIXES[cat])]
    if SURVEY:
        lines += ["", "Survey (failures found in this run):", ""]
        for cat in sorted(FAILURES):
            lines += [f"- {cat}:"] + [f"  - {why}: {ex}" for why, ex in sorted(FAILURES[cat].items())]
    TABLE.write_text("\n".join(lines) + "\n")


@pytest.mark.multiproc
def test_the_largest_accepted_values_really_run(world):
    """The edge's bounds are the rank's: what the config accepts at its limits trains (2 steps)."""
    top = str(2**31 - 1)
    run = world.fresh("run")
    proc = cli("train", "--layers", "1", "--width", "32", "--heads", "2", "--seq-len", "16", "--batch-size", "1",
               "--data", str(world.small), "--seed", top, "--steps", top, "--warmup", top, "--eval-every", top,
               "--checkpoint-every", top, "--keep-checkpoints", top, "--log-every", "1", "--stop-after", "2",
               "--max-restarts", "0", "--memory-budget", "1TiB", "--run-dir", str(run), "--no-live", timeout=300)
    assert proc.returncode == 0 and "stopped at step 2" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.multiproc
def test_accepted_data_trains(world):
    """Data the checks before launch accept is data a rank can train on: a step on each."""
    import math

    accepted = accepted_data(world)
    assert accepted, "the data campaign accepted no data set: nothing shows that accepted means usable"
    for path in accepted:
        run = world.fresh("run")
        proc = cli("train", "--data", str(path), "--seq-len", "16", "--batch-size", "1", "--layers", "1", "--width",
                   "32", "--heads", "2", "--devices", "1", "--steps", "2", "--log-every", "1", "--max-restarts", "0",
                   "--run-dir", str(run), "--no-live", timeout=300, env={"MLX_TRAIN_STATE": str(world.root / "state")})
        assert proc.returncode == 0, f"{path} was accepted but did not train:\n{proc.stdout}\n{proc.stderr}"
        losses = [m["loss"] for m in metrics(run)]
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses), (path, losses)
