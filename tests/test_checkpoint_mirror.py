"""The checkpoint mirror (rank/trainer.py find_stores): two local ranks started with run directories
of their own, as two Macs without a shared disk are. Rank 1 writes the same checkpoint files as
rank 0, byte for byte; with rank 0's copies gone (its host lost with its disk) a relaunch resumes
from rank 1's, and ends on the weights of the run that was never interrupted."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY, cli
from mlx_train import protocol
from mlx_train.config import TrainConfig
from mlx_train.controller import launch

pytestmark = pytest.mark.multiproc

ARGS = [*TINY, "--devices", "2", "--shard", "full", "--steps", "4", "--checkpoint-every", "2", "--log-every", "2",
        "--eval-every", "1000", "--no-live"]
FILES = ("model.safetensors", "optimizer.safetensors")


def _ranks(cfg: TrainConfig, dirs, *extra: str) -> list:
    """Two ranks on a loopback ring, rank r's run directory dirs[r]; the messages each wrote."""
    k = cfg.dist.ring_connections
    ports = launch._free_ports(2 * k)
    peers = json.dumps([[f"127.0.0.1:{p}" for p in ports[r * k:(r + 1) * k]] for r in range(2)])
    config = json.dumps(cfg.to_dict(), separators=(",", ":"))
    procs = [subprocess.Popen([sys.executable, "-m", "mlx_train.rank.worker", "--config-json", config,
                               "--run-dir", str(d), "--run-id", "mirror", "--rank", str(r), "--ring-hosts", peers,
                               *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r, d in enumerate(dirs)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return [[m for m in map(protocol.parse, out.splitlines()) if isinstance(m, protocol.Message)] for out in outs]


def test_mirror_writes_rank0s_bytes_and_a_relaunch_resumes_from_it(tmp_path):
    straight = tmp_path / "straight"  # one storage for both ranks: no mirror, the reference
    cli("train", *ARGS, "--run-dir", str(straight), check=True)
    assert not any("mirror" in line for line in (straight / "events.jsonl").read_text().splitlines())
    cfg = TrainConfig.from_yaml(straight / "config.yaml")

    own, mirror = tmp_path / "h1", tmp_path / "h2"
    said = _ranks(cfg, [own, mirror], "--stop-after", "2")
    step = "step-000002"
    for name in (*FILES, "manifest.json"):
        assert (own / "checkpoints" / step / name).is_file(), name
    for name in FILES:
        assert (mirror / "checkpoints" / step / name).read_bytes() == (own / "checkpoints" / step / name).read_bytes()
    a, b = (json.loads((d / "checkpoints" / step / "manifest.json").read_text()) for d in (own, mirror))
    a.pop("time"), b.pop("time")
    assert a == b and a["meta"]["identity"] == json.loads(json.dumps(cfg.identity()))
    assert [m.step for m in said[1] if isinstance(m, protocol.Checkpoint)] == [2]  # the mirror reports its copy
    assert not list((own / "checkpoints").glob(".here-*")) and not list((mirror / "checkpoints").glob(".here-*"))

    shutil.rmtree(own / "checkpoints")  # rank 0's host lost with its disk: only the mirror's copy is left
    said = _ranks(cfg, [own, mirror], "--resume")
    resumed = [m for r in said for m in r if isinstance(m, protocol.Resumed)]
    assert [(m.step, m.checkpoint and Path(m.checkpoint).parents[1]) for m in resumed] == [(2, mirror)], resumed
    for name in FILES:  # exact resumption, and both copies written again
        want = (straight / "checkpoints" / "step-000004" / name).read_bytes()
        assert (own / "checkpoints" / "step-000004" / name).read_bytes() == want, name
        assert (mirror / "checkpoints" / "step-000004" / name).read_bytes() == want, name
