"""Bad input: one line saying what is wrong and how to fix it, exit 2, no traceback, nothing lost."""

import hashlib
from pathlib import Path

import pytest

from helpers import TINY, cli


def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "done"
    cli("train", *TINY, "--steps", "4", "--checkpoint-every", "2", "--run-dir", str(run), check=True)
    return run


def _assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(err.splitlines()) == 1, err
    for f in fragments:
        assert f in err, err


@pytest.mark.parametrize("args, fragments", [
    (["--model", "transformerzz"], ["unknown model 'transformerzz'", "package.module:factory"]),
    (["--model", "no_such_pkg.models:build"], ["cannot import model module 'no_such_pkg.models'"]),
    (["--data", "/no/such/corpus"], ["data path /no/such/corpus does not exist"]),
    (["--batch-size", "0"], ["batch_size_per_device must be a positive integer"]),
    (["--accumulation", "-2"], ["gradient_accumulation must be a positive integer"]),
    (["--batch-size", "abc"], ["invalid int value: 'abc'"]),
    (["--batch-size", "40000", "--seq-len", "512"], ["fewer than one global batch", "lower --batch-size"]),
    (["--resume", "/no/such/run"], ["nothing to resume in /no/such/run"]),
])
def test_bad_flags(args, fragments, tmp_path):
    _assert_user_error(cli("train", "--run-dir", str(tmp_path / "r"), *args), *fragments)
    assert not (tmp_path / "r").exists(), "a rejected run must not leave a run directory behind"


def test_corrupt_config_file(tmp_path):
    bad = tmp_path / "train.yaml"
    bad.write_text("dist: {num_devices: 2\nsteps: [\n")
    _assert_user_error(cli("train", "--config", str(bad)), "not valid YAML", str(bad))
    unknown = tmp_path / "typo.yaml"
    unknown.write_text("dist:\n  batch_size: 8\n")
    _assert_user_error(cli("train", "--config", str(unknown)), "unknown key 'batch_size' in config.dist")


def test_run_dir_of_another_configuration_is_left_alone(finished_run):
    before = _tree_digest(finished_run)
    _assert_user_error(cli("train", *TINY, "--steps", "9", "--run-dir", str(finished_run)),
                       "holds a different run", "steps")
    _assert_user_error(cli("train", *TINY, "--steps", "4", "--run-dir", str(finished_run)),
                       "already holds a run", "--resume")
    _assert_user_error(cli("train", "--resume", str(finished_run), "--width", "128"), "holds a different run", "model")
    assert _tree_digest(finished_run) == before


def test_corrupt_config_in_run_dir(finished_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    (run / "config.yaml").write_text("model: {n_layers: [\n")
    before = _tree_digest(run)
    _assert_user_error(cli("train", "--resume", str(run)), "config.yaml", "not valid YAML")
    assert _tree_digest(run) == before


def test_monitor_without_runs(tmp_path):
    _assert_user_error(cli("monitor", cwd=tmp_path), "no runs under runs/")


@pytest.mark.parametrize("where", ["under-a-file", "/proc/mlx-train-x"])
def test_run_dir_that_cannot_be_made(tmp_path, where):
    regular = tmp_path / "notes.txt"
    regular.write_text("mine\n")
    run_dir = str(regular / "run") if where == "under-a-file" else where
    _assert_user_error(cli("train", *TINY, "--run-dir", run_dir), "cannot create the run directory", "--run-dir")
    assert regular.read_text() == "mine\n"


def test_run_dir_that_is_someone_elses_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8")
    before = _tree_digest(folder)
    _assert_user_error(cli("train", *TINY, "--run-dir", str(folder)), "is not a run directory", "--run-dir")
    assert _tree_digest(folder) == before


def test_budget_that_cannot_hold_batch_1_is_refused_before_launch(tmp_path):
    """--memory-budget 1KB: one line naming the smallest budget, and that budget then passes the check."""
    import re

    proc = cli("train", *TINY, "--memory-budget", "1KB", "--run-dir", str(tmp_path / "r"), "--no-live")
    _assert_user_error(proc, "--memory-budget", "at least")
    assert not (tmp_path / "r").exists()
    least = re.search(r"at least (\S+?)[,:]", proc.stderr).group(1)
    from mlx_train.cli.main import build_parser
    from mlx_train.cli import options
    from mlx_train.config import RunOptions, TrainConfig
    from mlx_train.controller.run import check_fits, hosts_for, resolve_config

    for budget, fits in ((least, True), ("1KB", False)):
        a = build_parser().parse_args(["train", *TINY, "--memory-budget", budget])
        opts = options.build(a, RunOptions)
        flags = options.given(a, TrainConfig)
        hosts, cfg = hosts_for(opts, resolve_config(flags, opts), flags)
        if fits:
            check_fits(cfg, hosts)
        else:
            with pytest.raises(Exception, match="at least"):
                check_fits(cfg, hosts)


def test_a_bug_is_reported_with_its_log_not_a_traceback(tmp_path):
    """The catch-all for real bugs: exit 1, one line naming the log, the traceback in the log only.
    It exists for bugs nobody knows yet, so the test plants one: `status` replaced by code that
    divides by zero, run in a real process."""
    import subprocess
    import sys

    code = ("import mlx_train.controller.status as s\n"
            "def broken(*a, **k):\n    return 1 / 0\n"
            "s.status = broken\n"
            "from mlx_train.cli.main import main\n"
            "raise SystemExit(main(['status', '--local']))\n")
    state = tmp_path / "state"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ, "MLX_TRAIN_STATE": str(state)})
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "internal error, please report it" in lines[0], proc.stderr
    log = Path(lines[0].split("report it with ")[1].split(" ")[0])
    assert log.parent == state / "crashes"
    text = log.read_text()
    assert "Traceback" in text and "ZeroDivisionError" in text and "mlx-train status --local" in text
