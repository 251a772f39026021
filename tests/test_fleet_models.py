"""A pretrained model fine-tuned across the 3-host fleet: the launcher ships the model and data to
every host (fleet/ship.py), skips what a host already holds, and refuses before launch, in one
line naming the host, when one cannot take them.

The model and data lie under this machine's own /root, which no fleet host can see (each host has
its own /root, tools/fleet.py): a rank reads them only if they were copied to its host."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import pytest

from helpers import FLEET_HOSTS, MLX_TRAIN, assert_ranks_gone, events, fleet_env, metrics, rank_pids
import fleet as fleet_tools  # tools/fleet.py (conftest.py puts it on the path)

pytestmark = pytest.mark.fleet

FT = ["--fine-tune", "lora", "--lora-layers", "-1", "--lora-rank", "4", "--seq-len", "64", "--batch-size", "4",
      "--lr", "2e-3", "--warmup", "2", "--no-live", "--mask-prompt", "--eval-every", "1000"]
TAG = secrets.token_hex(3)
CACHE = f"~/.cache/mlx-train-test-{TAG}/shipped"  # each host's own ~ (its private /root)


@pytest.fixture(scope="module")
def private(tiny_model, chat_data):
    """The tiny llama and its chat data where only this machine can read them."""
    assert "/root" in fleet_tools.PRIVATE_DIRS
    d = Path("/root") / f".mlx-train-test-{TAG}"
    shutil.copytree(tiny_model, d / "tiny-llama")
    shutil.copytree(chat_data, d / "chat")
    yield d / "tiny-llama", d / "chat"
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def hosts_clean(fleet):
    """Whatever these tests leave in the hosts' caches goes when they end."""
    yield
    for h in FLEET_HOSTS:
        fleet.ssh(h, f"rm -rf ~/.cache/mlx-train-test-{TAG}", timeout=30)


def _train(fleet, cluster, model, data, run, cache, *extra, tmp):
    env = fleet_env(fleet, MLX_TRAIN_SHIP_CACHE=cache, MLX_TRAIN_CACHE=str(tmp / "token-cache"))
    return subprocess.run([MLX_TRAIN, "train", "--cluster", str(cluster), "--model", str(model), "--data", str(data),
                           *FT, "--run-dir", str(run), *extra], env=env, capture_output=True, text=True, timeout=400)


def _sha(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()


@pytest.fixture(scope="module")
def lora_run(fleet, cluster, private, hosts_clean, tmp_path_factory):
    model, data = private
    for h in FLEET_HOSTS:  # the premise: no host can read them where they lie
        assert fleet.ssh(h, f"test -e {model}").returncode == 1
    tmp = tmp_path_factory.mktemp("fleet-lora")
    run = tmp / "run"
    res = _train(fleet, cluster, model, data, run, CACHE, "--steps", "40", "--log-every", "10",
                 "--checkpoint-every", "40", tmp=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run, tmp


def test_lora_across_three_hosts_reads_shipped_copies(fleet, lora_run, private):
    run, _ = lora_run
    model, data = private
    assert events(run)[-1]["event"] == "finish"
    ms = metrics(run)
    assert [m["step"] for m in ms] == [10, 20, 30, 40]
    assert ms[-1]["loss"] < ms[0]["loss"] - 0.5, [m["loss"] for m in ms]
    for m in ms:
        assert m["devices"] == 3 and len(set(m["param_checksum"])) == 1, "ranks drifted apart"
    assert sorted(r["host"] for r in events(run, "launch")[0]["ranks"]) == FLEET_HOSTS
    # Adapters in mlx-lm's layout, only the LoRA weights in them.
    adapters = mx.load(str(run / "adapters" / "adapters.safetensors"))
    assert adapters and all(k.endswith((".lora_a", ".lora_b")) for k in adapters)
    adapter_config = json.loads((run / "adapters" / "adapter_config.json").read_text())
    assert adapter_config["fine_tune_type"] == "lora"
    # The user's names, not rank 0's host copy: the adapters and the run's identity (checked on
    # resume) are the same whichever host rank 0 lands on.
    assert adapter_config["model"] == str(model)
    meta = json.loads((run / "checkpoints" / "step-000040" / "manifest.json").read_text())["meta"]
    assert (meta["identity"]["model"]["name"], meta["identity"]["data"]["path"]) == (str(model), str(data))
    # Copied to every host, model and data, each into that host's own cache, marker last.
    shipped = events(run, "ship")
    assert sorted((s["host"], s["what"]) for s in shipped) == sorted((h, w) for h in FLEET_HOSTS for w in ("model", "data"))
    assert all(not s["skipped"] and s["bytes"] > 0 for s in shipped), shipped
    weights = _sha((model / "model.safetensors").read_bytes())
    for s in (s for s in shipped if s["what"] == "model"):
        where = Path(s["path"])
        assert where.name == "tiny-llama" and str(where).startswith("/root/.cache/mlx-train-test-")
        marker = fleet.ssh(s["host"], f"cat {where.parent}/.complete")
        assert marker.returncode == 0 and json.loads(marker.stdout)["digest"].startswith(s["digest"])
        there = fleet.ssh(s["host"], f"sha256sum {where}/model.safetensors")
        assert there.returncode == 0 and there.stdout.split()[0] == weights
        # Not this machine's cache: the host's own.
        assert not where.exists()
    assert_ranks_gone(rank_pids(run))


def test_a_second_run_skips_what_the_hosts_hold(fleet, cluster, lora_run, private):
    _, tmp = lora_run
    model, data = private
    run = tmp / "again"
    res = _train(fleet, cluster, model, data, run, CACHE, "--steps", "3", "--log-every", "3", tmp=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    shipped = events(run, "ship")
    assert len(shipped) == 2 * len(FLEET_HOSTS) and all(s["skipped"] and s["bytes"] == 0 for s in shipped), shipped
    assert events(run)[-1]["event"] == "finish"


def _refused(fleet, cluster, private, tmp: Path, cache: str):
    model, data = private
    run = tmp / "refused"
    res = _train(fleet, cluster, model, data, run, cache, "--steps", "3", tmp=tmp)
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert not run.exists(), "a refused run must leave nothing behind, no launch"
    return lines[0]


def test_a_host_without_rsync_is_named_before_launch(fleet, cluster, private, hosts_clean, tmp_path):
    rsync = shutil.which("rsync")
    fleet_tools.run_in("h2", ["mount", "--bind", "/dev/null", rsync])  # h2's own view of the disk only
    try:
        line = _refused(fleet, cluster, private, tmp_path, f"~/.cache/mlx-train-test-{TAG}/no-rsync")
    finally:
        fleet_tools.run_in("h2", ["umount", rsync])
    assert "to h2: rsync is not installed there" in line, line
    assert os.access(rsync, os.X_OK)


def test_a_host_with_an_unwritable_cache_is_named_before_launch(fleet, cluster, private, hosts_clean, tmp_path):
    blocked = f"~/.cache/mlx-train-test-{TAG}/blocked"
    assert fleet.ssh("h3", f"mkdir -p ~/.cache/mlx-train-test-{TAG} && echo file > {blocked}").returncode == 0
    line = _refused(fleet, cluster, private, tmp_path, f"{blocked}/shipped")
    assert "to h3: cannot write the cache directory" in line, line
