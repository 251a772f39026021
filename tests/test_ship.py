"""Shipping the model and data to hosts (fleet/ship.py), without the fleet: content digests, the
completion marker, skipping what a host already holds, one-line refusals, and the per-host config
each rank is started with. The copies are real rsync runs; the "remote host" is this machine
through a stand-in `ssh` that runs the command here (tests/test_fleet_models.py does it over the
fleet's real ssh)."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import needs
from mlx_train.config import DataConfig, DistributedConfig, ModelConfig, TrainConfig
from mlx_train.controller import launch
from mlx_train.errors import UserError
from mlx_train.fleet import ship
from mlx_train.fleet.hosts import Host

STAND_IN_SSH = """#!/bin/sh
# ssh to a host that is this machine: the options and the destination go, the command runs here.
while [ $# -gt 0 ]; do case "$1" in -T) shift;; -o) shift 2;; *) break;; esac; done
shift
exec sh -c "$*"
"""
H = Host("h9", "10.0.0.9", python="/usr/bin/python3")

needs_rsync = needs("rsync", "rsync is not installed (make install)")


@pytest.fixture
def remote(tmp_path, monkeypatch) -> Path:
    """The stand-in ssh first on PATH; the "host's" home (where ~/ points) returned."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    home.mkdir()
    (bin_dir / "ssh").write_text(STAND_IN_SSH)
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MLX_TRAIN_CACHE", str(tmp_path / "local-cache"))  # the digest memo
    return home


def model_dir(where: Path) -> Path:
    d = where / "tiny-model"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(os.urandom(50_000))
    (d / "sub" / "tokenizer.json").write_text("{}")
    return d


def item_of(path: Path, what: str = "model") -> ship.Item:
    d, size = ship.digest(path)
    return ship.Item(what, str(path), path, d, size)


def test_the_digest_names_the_content_not_its_place(tmp_path):
    a = model_dir(tmp_path / "a")
    b = tmp_path / "b" / "elsewhere"
    shutil.copytree(a, b)
    assert ship.digest(a) == ship.digest(b)
    os.utime(b / "config.json", (1, 1))  # touched, same bytes: the same content
    assert ship.digest(b)[0] == ship.digest(a)[0]
    (b / "config.json").write_text('{"model_type": "llamb"}')
    assert ship.digest(b)[0] != ship.digest(a)[0]
    shutil.copytree(a, tmp_path / "c")
    (tmp_path / "c" / "sub" / "tokenizer.json").rename(tmp_path / "c" / "sub" / "tok.json")
    assert ship.digest(tmp_path / "c")[0] != ship.digest(a)[0]
    assert ship.digest(a)[1] == sum(p.stat().st_size for p in a.rglob("*") if p.is_file())


def test_a_remembered_file_digest_is_dropped_when_the_file_changes(tmp_path):
    f = tmp_path / "data.npy"
    f.write_bytes(b"one")
    memo: dict = {}
    first = ship.digest(f, memo)[0]
    assert len(memo) == 1
    f.write_bytes(b"two")
    assert ship.digest(f, memo)[0] != first


@needs_rsync
def test_copied_once_then_skipped(remote, tmp_path):
    src = model_dir(tmp_path / "src")
    item = item_of(src)
    first = ship.ship_one(H, item, "~/cache")
    dest = remote / "cache" / item.digest
    assert first.path == str(dest / src.name) and not first.skipped and first.bytes == item.size > 50_000
    assert ship.digest(dest / src.name)[0] == item.digest
    marker = json.loads((dest / ship.MARKER).read_text())
    assert marker["digest"] == item.digest and marker["bytes"] == item.size
    again = ship.ship_one(H, item, "~/cache")
    assert again.skipped and again.bytes == 0 and again.path == first.path


@needs_rsync
def test_a_copy_without_its_marker_is_never_taken_as_complete(remote, tmp_path):
    src = model_dir(tmp_path / "src")
    item = item_of(src)
    partial = remote / "cache" / item.digest / src.name
    partial.mkdir(parents=True)
    (partial / "config.json").write_text('{"model_type": "llama"}')  # an interrupted copy
    out = ship.ship_one(H, item, "~/cache")
    assert not out.skipped
    assert ship.digest(partial)[0] == item.digest and (partial.parent / ship.MARKER).is_file()


@needs_rsync
def test_a_cache_path_with_spaces(remote, tmp_path):
    src = model_dir(tmp_path / "my models")
    item = item_of(src)
    out = ship.ship_one(H, item, "~/a cache/shipped")
    assert out.path == str(remote / "a cache" / "shipped" / item.digest / src.name)
    assert ship.digest(Path(out.path))[0] == item.digest
    assert ship.ship_one(H, item, "~/a cache/shipped").skipped


@needs_rsync
def test_a_single_file_keeps_its_name(remote, tmp_path):
    f = tmp_path / "tokens.npy"
    f.write_bytes(os.urandom(1000))
    out = ship.ship_one(H, item_of(f, "data"), "~/cache")
    assert Path(out.path).name == "tokens.npy" and Path(out.path).read_bytes() == f.read_bytes()


@needs_rsync
def test_a_hub_id_ships_its_local_snapshot(remote, tmp_path):
    """A hub id is resolved here, offline, to its snapshot in the hub cache (files there are links
    into a blob store) and shipped as the files themselves."""
    src = model_dir(tmp_path / "made")
    repo = tmp_path / "hub" / "models--acme--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    for f in (p for p in src.rglob("*") if p.is_file()):
        blob = repo / "blobs" / ship.digest(f)[0]
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, blob)
        link = snapshot / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    code = ("import json, sys; from mlx_train.config import ModelConfig, TrainConfig; from mlx_train.fleet import ship;"
            "from mlx_train.fleet.hosts import Host; (i,) = ship.items(TrainConfig(model=ModelConfig(name='acme/tiny')));"
            "s = ship.ship_one(Host('h9', '10.0.0.9'), i, '~/cache');"
            "print(json.dumps([str(i.source), i.digest, s.path]))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    source, digest, placed = json.loads(out.stdout.splitlines()[-1])
    assert Path(source) == snapshot and digest == ship.digest(src)[0]
    copied = Path(placed)
    assert not any(p.is_symlink() for p in copied.rglob("*"))
    assert (copied / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_an_unwritable_cache_stops_with_the_host_named(remote, tmp_path):
    (remote / "blocked").write_text("a file where the cache directory would go")
    with pytest.raises(UserError) as e:
        ship.ship_one(H, item_of(model_dir(tmp_path)), "~/blocked/cache")
    msg = str(e.value)
    assert "\n" not in msg and "to h9" in msg and "cannot write the cache directory" in msg


@needs_rsync
def test_too_little_space_stops_before_copying(remote, tmp_path):
    src = model_dir(tmp_path)
    huge = ship.Item("model", str(src), src, "0" * 64, 1 << 60)  # more than any disk here
    with pytest.raises(UserError) as e:
        ship.ship_one(H, huge, "~/cache")
    assert "to h9" in str(e.value) and "MiB more" in str(e.value)
    assert not list((remote / "cache" / huge.digest).iterdir())


def test_an_unreachable_host_is_named(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text("#!/bin/sh\necho 'ssh: connect to host h9 port 22: No route to host' >&2\nexit 255\n")
    (bin_dir / "ssh").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(UserError) as e:
        ship.ship_one(H, item_of(model_dir(tmp_path)), "~/cache")
    assert "to h9: ssh h9 failed (ssh: connect to host h9 port 22: No route to host)" in str(e.value)


def test_the_cache_is_a_path_on_every_host(monkeypatch):
    monkeypatch.delenv(ship.CACHE_ENV, raising=False)
    assert ship.cache_dir() == ship.DEFAULT_CACHE == "~/.cache/mlx-train/shipped"
    monkeypatch.setenv(ship.CACHE_ENV, "/srv/cache")
    assert ship.cache_dir() == "/srv/cache" and ship.cache_dir("~/x") == "~/x"
    with pytest.raises(UserError, match="absolute path or start with ~/"):
        ship.cache_dir("relative/cache")


def test_nothing_to_ship_for_local_hosts_or_the_builtin_model(tmp_path):
    local = launch.local_hosts(2)
    assert ship.ship(TrainConfig(data=DataConfig(path=str(tmp_path))), local, None, 30) == (local, [])
    assert ship.items(TrainConfig()) == []  # the built-in GPT on the standard library


def test_each_rank_reads_its_hosts_copy():
    cfg = TrainConfig(model=ModelConfig(name="/models/m"), data=DataConfig(path="/data/chat"),
                      dist=DistributedConfig(num_devices=3))
    hosts = [Host("h1", "10.77.0.11", placed={"/models/m": "/c1/m", "/data/chat": "/c1/chat"}),
             Host("h2", "10.77.0.12", placed={"/models/m": "/c2/m", "/data/chat": "/c2/chat"}),
             launch.local_hosts(1)[0]]
    procs = launch.plan(cfg, hosts, "/runs/r1", "r1", False)
    # Every rank gets the user's config (the run's identity, the adapters' "model") and where its
    # own host holds the model and data.
    assert all(sent_config(p.argv) == cfg.to_dict() for p in procs)
    sent = [TrainConfig.trusted(sent_config(p.argv)).placed_at(sent_placed(p.argv)) for p in procs]
    assert [(c.model.name, c.data.path) for c in sent] == \
        [("/c1/m", "/c1/chat"), ("/c2/m", "/c2/chat"), ("/models/m", "/data/chat")]
    assert sent[0].identity() != cfg.identity() and sent[0].placed_at({}) == sent[0]
    mpi = TrainConfig(model=cfg.model, data=cfg.data, dist=DistributedConfig(num_devices=2, backend="mpi"))
    with pytest.raises(UserError, match="different paths on the hosts"):
        launch.plan(mpi, hosts[:2], "/runs/r1", "r1", False)
    same = [Host(h.name, h.addr, placed={"/models/m": "/c/m"}) for h in hosts[:2]]
    (p,) = launch.plan(mpi, same, "/runs/r1", "r1", False)
    assert sent_placed(p.argv) == {"/models/m": "/c/m"}


def _worker_argv(argv) -> list:
    return shlex.split(argv[-1]) if argv[0] == "ssh" else list(argv)  # inside the remote command over ssh


def sent_config(argv) -> dict:
    """The --config-json a rank is started with."""
    argv = _worker_argv(argv)
    return json.loads(argv[argv.index("--config-json") + 1])


def sent_placed(argv) -> dict:
    """The --placed a rank is started with (nothing placed: {})."""
    argv = _worker_argv(argv)
    return json.loads(argv[argv.index("--placed") + 1]) if "--placed" in argv else {}


def _age(path: Path, days: float) -> None:
    old = __import__("time").time() - days * 86400
    os.utime(path, (old, old))


@needs_rsync
def test_copies_unused_for_the_kept_days_are_dropped_the_rest_stay(remote, tmp_path):
    cache = remote / "cache"
    fresh, stale, in_use = (item_of(model_dir(tmp_path / name)) for name in ("fresh", "stale", "in-use"))
    for item in (fresh, stale, in_use):
        assert not ship.ship_one(H, item, "~/cache").skipped
    (cache / "partial" / "x").mkdir(parents=True)  # a copy cut short long ago: no marker
    _age(cache / "partial", 40)
    (cache / "recent-partial").mkdir()  # one being filled now by another run
    _age(cache / fresh.digest / ship.MARKER, 29)
    _age(cache / stale.digest / ship.MARKER, 31)
    _age(cache / in_use.digest / ship.MARKER, 31)  # old, but the run pruning it reads it
    pruned = ship.prune(H, "~/cache", [in_use.digest], 30)
    assert sorted(pruned.removed) == sorted([stale.digest, "partial"]) and pruned.bytes >= stale.size
    assert sorted(p.name for p in cache.iterdir()) == sorted([fresh.digest, in_use.digest, "recent-partial"])
    assert pruned.event()["removed"] == [d[:16] for d in pruned.removed]


@needs_rsync
def test_a_use_counts_as_a_use_so_a_copy_in_use_is_kept(remote, tmp_path):
    item = item_of(model_dir(tmp_path / "m"))
    ship.ship_one(H, item, "~/cache")
    marker = remote / "cache" / item.digest / ship.MARKER
    _age(marker, 100)
    assert ship.ship_one(H, item, "~/cache").skipped  # found there: its marker is touched
    assert ship.prune(H, "~/cache", [], 30).removed == ()
    assert (remote / "cache" / item.digest / ship.MARKER).is_file()


def test_pruning_never_stops_a_run(tmp_path, monkeypatch):
    # The host stopped answering between the copy and the pruning: nothing is removed, nothing raised.
    (tmp_path / "ssh").write_text("#!/bin/sh\necho 'ssh: connect to host h9 port 22: Connection refused' >&2\nexit 255\n")
    (tmp_path / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert ship.prune(H, "~/cache", [], 30) is None
