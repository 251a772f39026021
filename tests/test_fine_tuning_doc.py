"""docs/fine_tuning.md works as written: each `mlx-train` and `mlx_lm` command in its bash blocks,
and its Python, run in a folder where a tiny 4-bit llama (made offline) sits at the model path the
page names and chat JSONL at its data path. Commands for several machines (--distributed) need a
fleet and are left to the fleet tests."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "fine_tuning.md"
pytestmark = pytest.mark.multiproc


def blocks(lang: str):
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def commands():
    lines = [line.strip() for block in blocks("bash") for line in block.splitlines()]
    return [line for line in lines if line.startswith(("mlx-train ", "mlx_lm.")) and "--distributed" not in line]


def test_the_page_names_its_commands():
    cmds = commands()
    assert any(c.startswith("mlx-train train ") for c in cmds) and any("export" in c for c in cmds)


def test_every_command_runs_as_written(tmp_path, tiny_model_4bit, chat_data):
    model = re.search(r"--model (models/\S+)", commands()[0]).group(1)
    shutil.copytree(tiny_model_4bit, tmp_path / model)
    shutil.copytree(chat_data, tmp_path / "data")
    env = {**os.environ, "MLX_TRAIN_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    bindir = Path(sys.executable).parent
    for cmd in commands():
        argv = shlex.split(cmd)
        out = subprocess.run([str(bindir / argv[0]), *argv[1:]], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert (tmp_path / "runs" / "support-bot" / "adapters" / "adapters.safetensors").is_file()
    assert (tmp_path / "models" / "support-bot" / "config.json").is_file()
    for code in blocks("python"):
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0 and "MiB" in out.stdout, f"{code}\n{out.stdout}\n{out.stderr}"
