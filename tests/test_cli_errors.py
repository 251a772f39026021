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
