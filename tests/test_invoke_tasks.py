"""`invoke train` is `mlx-train train`: no flag of its own, --distributed only when asked for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INVOKE = Path(sys.executable).parent / "invoke"


def _invoke(*args, cwd):
    return subprocess.run([str(INVOKE), "--search-root", str(ROOT), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_invoke_train_ignores_a_cluster_file_unless_distributed(tmp_path):
    # A cluster file in the working directory that nobody asked for, and a batch the data cannot fill:
    # without --distributed the run is refused for its data (the cluster file is not read).
    (tmp_path / "cluster.yaml").write_text("hosts: 3\n")
    big = "--batch-size 40000 --seq-len 512"
    local = _invoke("train", "--extra", big, cwd=tmp_path)
    assert local.returncode == 2 and "fewer than one global batch" in local.stderr, local.stderr
    dist = _invoke("train", "--distributed", "--extra", big, cwd=tmp_path)
    assert dist.returncode == 2 and "cluster.yaml" in dist.stderr, dist.stderr
    assert "Traceback" not in local.stderr + dist.stderr


def test_each_task_option_says_what_its_command_says():
    """The tasks restate no help: each option's is the command's own (from the knob when it is one)."""
    import importlib.util

    from mlx_train.cli.main import build_parser
    from mlx_train.cli.options import helps

    spec = importlib.util.spec_from_file_location("tasks", ROOT / "tasks.py")
    tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tasks)
    parser, checked = build_parser(), 0
    for t in (getattr(tasks, name) for name in dir(tasks)):
        if type(t).__name__ == "Task":
            said = helps(parser, t.name)
            for option, text in t.help.items():
                if option != "extra":  # train's pass-through of more flags
                    assert text == said[option], f"invoke {t.name} --{option}"
                    checked += 1
    assert checked >= 10
