"""Shared by the tests: run the real CLI in a subprocess and read a run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

# A model small enough that a 2-rank step takes a few milliseconds on 2 CPU cores.
TINY = ["--layers", "2", "--width", "64", "--heads", "2", "--seq-len", "64", "--batch-size", "4"]


def cli(*args: str, timeout: float = 300, check: bool = False, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kw.pop("env", {})}
    proc = subprocess.run([sys.executable, "-m", "mlx_train.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"mlx-train {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def popen(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mlx_train.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def jsonl(path: Path) -> List[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def events(run_dir: Path, name: str = None) -> List[dict]:
    evs = jsonl(Path(run_dir) / "events.jsonl")
    return [e for e in evs if name is None or e["event"] == name]


def metrics(run_dir: Path) -> List[dict]:
    return jsonl(Path(run_dir) / "metrics.jsonl")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return True
