"""The user-facing contract: every command and Python call in the distributed training guide works
as shown. Commands are taken from the guide itself, so the test follows the guide when it changes.

Training commands are started exactly as written and stopped with Ctrl-C once they have logged
progress (the defaults train for minutes); every other command runs to completion.
"""

from __future__ import annotations

import os
import platform
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from helpers import MLX_TRAIN, fleet_env, metrics, unavailable

GUIDE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "distributed_training_guide.md"


@pytest.fixture(autouse=True)
def _the_guide():
    # Without the guide these tests prove nothing: a skip here, an error under CI.
    if not GUIDE.is_file():
        unavailable(f"{GUIDE} is not here (shared/ sits beside the repo)")


def guide_blocks(lang: str):
    return re.findall(rf"```{lang}\n(.*?)```", GUIDE.read_text(), flags=re.S)


def guide_commands():
    cmds = []
    for block in guide_blocks("bash"):
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("mlx-train "):
                cmds.append(line)
    return cmds


FLEET_COMMANDS = {"mlx-train configure --distributed", "mlx-train train --distributed", "mlx-train check-network",
                  "mlx-train reset-distributed"}
LONG_RUNNING = re.compile(r"^mlx-train train\b")


def mlx_train(cmd: str, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    argv = [MLX_TRAIN, *cmd.split()[1:]]
    if not LONG_RUNNING.match(cmd):
        return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    # Start it as written; once it has logged a step, Ctrl-C it (and it must stop cleanly).
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, lines = time.monotonic() + timeout, []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step ") or time.monotonic() > deadline:
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    code = 0 if proc.returncode == 130 and any(l.startswith("step ") for l in lines) else proc.returncode
    return subprocess.CompletedProcess(argv, code, out, "")


def test_the_guide_lists_the_commands_we_test():
    cmds = guide_commands()
    assert "mlx-train train --distributed" in cmds and "mlx-train optimize" in cmds and len(cmds) >= 10


def test_python_calls_work_as_shown():
    namespace: dict = {}
    exec("from mlx_train import MemoryOptimizer, DistributedConfig", namespace)
    for block in guide_blocks("python"):
        exec(block, namespace)
    mem = namespace["memory_config"]
    assert mem["suggested_batch_size"] >= 1 and "fits" in mem and mem["hardware"]["memory_per_device"] > 0
    assert namespace["config"].global_batch_size == 4 * 32 * 4


def test_local_commands_work_as_shown(tmp_path):
    env = {**os.environ, "MLX_TRAIN_STATE": str(tmp_path / "state")}
    # Without the fleet, the local training commands stand in for `train --distributed`: run them first
    # so that `monitor` has a run to show, as it would after the guide's Quick Start.
    local = [c for c in guide_commands() if c not in FLEET_COMMANDS]
    checked = set()
    for cmd in sorted(local, key=lambda c: not LONG_RUNNING.match(c)):
        proc = mlx_train(cmd, tmp_path, env)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stdout + proc.stderr, cmd
        if cmd in SAYS:
            SAYS[cmd](proc.stdout, tmp_path)
            checked.add(cmd)
    assert checked == set(SAYS), f"the guide no longer shows {set(SAYS) - checked}"


def _newest_run(cwd: Path) -> Path:
    return max((cwd / "runs").iterdir(), key=lambda p: p.name)  # run ids begin with their start time


def _says_the_runs_progress(out: str, cwd: Path) -> None:
    """monitor (piped: one line a logged step) shows the newest run's steps and losses."""
    last = metrics(_newest_run(cwd))[-1]
    assert f"step {last['step']}/" in out and f"loss {last['loss']:.4f}" in out, out


def _says_the_device(out: str, cwd: Path) -> None:
    import mlx.core as mx

    rows = {cells[0]: cells[1] for cells in ([c.strip() for c in line.strip().strip("│").split("│")]
                                             for line in out.splitlines()) if len(cells) == 2}
    assert rows.get("device") == str(mx.device_info().get("device_name", "?")), out
    assert rows.get("host") == platform.node(), out


def _says_the_breakdown(out: str, cwd: Path) -> None:
    _says_the_runs_progress(out, cwd)
    header = next((line for line in out.splitlines() if "compute s" in line), "")
    for col in ("step", "compute s", "comm s", "algbw GB/s", "busbw GB/s", "tok/s/device", "scaling eff."):
        assert col in header, f"no {col!r} column in the --performance breakdown:\n{out}"
    last = metrics(_newest_run(cwd))[-1]
    assert any(line.strip("│ ").startswith(f"{last['step']} ") for line in out.splitlines()), out


def _writes_the_best_config(out: str, cwd: Path) -> None:
    best = re.search(r"best: (\d+) per device x (\d+) accumulation, checkpointing (on|off), (\w+),.*"
                     r"wrote (\S+) ", out)
    assert best, out
    cfg = yaml.safe_load((cwd / best.group(5)).read_text())
    assert (cfg["dist"]["batch_size_per_device"], cfg["dist"]["gradient_accumulation"], cfg["grad_checkpoint"],
            cfg["precision"]) == (int(best.group(1)), int(best.group(2)), best.group(3) == "on", best.group(4))


# What each local command of the guide must print (beyond exit 0 and no traceback).
SAYS = {"mlx-train monitor": _says_the_runs_progress, "mlx-train status": _says_the_device,
        "mlx-train monitor --performance": _says_the_breakdown, "mlx-train optimize": _writes_the_best_config}


@pytest.mark.fleet
def test_fleet_commands_work_as_shown(fleet, tmp_path):
    """The Quick Start and Network Issues commands, on the 3-host test fleet, in the guide's order."""
    (tmp_path / ".fleet").symlink_to(Path(fleet.inventory_path).parent)  # configure's default inventory
    env = fleet_env(fleet, MLX_TRAIN_STATE=str(tmp_path / "state"))
    ran = []
    for cmd in guide_commands():
        if cmd not in FLEET_COMMANDS:
            continue
        proc = mlx_train(cmd, tmp_path, env)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stdout + proc.stderr, cmd
        ran.append(cmd)
        if cmd == "mlx-train configure --distributed":
            assert (tmp_path / "cluster.yaml").is_file()
        if cmd == "mlx-train train --distributed":
            assert "3 ranks" in proc.stdout, proc.stdout
    assert ran == [c for c in guide_commands() if c in FLEET_COMMANDS]
