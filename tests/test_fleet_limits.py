"""Unequal hosts on the test fleet: a CPU quota and a memory limit per host through cgroups
(tools/fleet_limits.py), and `configure` recording what a limited host really has.

The unit tests (parsing, the cgroup file protocol on a fake tree, the probe's arithmetic, the
cluster file's `cpus`) need nothing. The fleet tests limit h3 of the one shared session fleet
for this module and lift the limits after: no second provisioning.
"""
from __future__ import annotations

import concurrent.futures
import math
import os
import shlex
import subprocess

import pytest
import yaml

import fleet as fleet_tools  # tools/fleet.py, on sys.path from helpers
import fleet_limits
from fleet_limits import Limits, parse_limits
from helpers import MLX_TRAIN, REPO, fleet_env, unavailable
from mlx_train.errors import UserError
from mlx_train.fleet.configure import cgroup_limits
from mlx_train.fleet.hosts import Host, load_cluster, write_cluster

G, M = 2**30, 2**20


# ---------------------------------------------------------------- --cpu / --memory

def test_cpu_and_memory_per_host_or_one_for_all():
    assert parse_limits("0.5,0.5,0.125", "6G,6G,2G", 3) == [Limits(0.5, 6 * G), Limits(0.5, 6 * G),
                                                            Limits(0.125, 2 * G)]
    assert parse_limits("1", None, 2) == [Limits(1.0, None)] * 2
    assert parse_limits(None, "512M", 2) == [Limits(None, 512 * M)] * 2
    assert parse_limits("none,0.25", "2GiB,none", 2) == [Limits(None, 2 * G), Limits(0.25, None)]
    assert parse_limits(None, None, 3) == [Limits()] * 3
    assert parse_limits(None, "1.5g", 1) == [Limits(None, 3 * G // 2)]


@pytest.mark.parametrize("cpu, memory, fragment", [
    ("0.5,0.5", None, "--cpu: 2 values for 3 hosts"),
    ("fast", None, "--cpu: 'fast' is not a number of cores"),
    ("0", None, "--cpu: '0' is not from 0.001"),
    ("nan", None, "--cpu: 'nan' is not from 0.001"),
    ("inf", None, "--cpu: 'inf' is not from 0.001"),
    (None, "6G,6G,2G,1G", "--memory: 4 values for 3 hosts"),
    (None, "6 gigs", "--memory: '6 gigs' is not a size"),
    (None, "-1G", "--memory: '-1G' is not a size"),
    (None, "1M", "--memory: '1M' is below 32M"),
])
def test_a_bad_limit_is_refused_in_one_line_naming_the_flag(cpu, memory, fragment):
    with pytest.raises(ValueError) as exc:
        parse_limits(cpu, memory, 3)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_fleet_up_with_a_bad_limit_says_so_and_starts_nothing(capsys, monkeypatch):
    monkeypatch.setattr(fleet_tools, "up", lambda *a, **k: pytest.fail("up ran despite a bad --memory"))
    assert fleet_tools.main(["up", "--hosts", "3", "--cpu", "0.5", "--memory", "6G,2G"]) == 1
    err = capsys.readouterr().err
    assert err == "fleet up: --memory: 2 values for 3 hosts: give one per host or one for all\n"


def test_fleet_limit_needs_a_limit_or_clear(capsys):
    assert fleet_tools.main(["limit", "h3"]) == 1
    assert capsys.readouterr().err == "fleet limit: give --cpu and/or --memory, or --clear\n"


# ---------------------------------------------------------------- the cgroup files, on a fake tree

def _fake(root, files: dict) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_v1_quota_and_limit_files(tmp_path):
    _fake(tmp_path, {"cpu/cpu.cfs_quota_us": "-1", "memory/memory.limit_in_bytes": "9223372036854771712",
                     "memory/mlxfleet/h3/memory.memsw.limit_in_bytes": "-1",
                     # The kernel makes a group's files with its directory; a fake tree, beforehand.
                     "cpu/mlxfleet/h3/cgroup.procs": "", "memory/mlxfleet/h3/cgroup.procs": ""})
    cg = fleet_limits.detect(tmp_path)
    assert cg.version == "v1"
    cg.apply("h3", Limits(0.125, 2 * G), lambda: [4242])
    cpu, mem = tmp_path / "cpu/mlxfleet/h3", tmp_path / "memory/mlxfleet/h3"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "1250" and (cpu / "cpu.cfs_period_us").read_text() == "10000"
    assert (mem / "memory.limit_in_bytes").read_text() == str(2 * G)
    assert (mem / "memory.memsw.limit_in_bytes").read_text() == str(2 * G)  # no escape into swap
    assert (cpu / "cgroup.procs").read_text() == (mem / "cgroup.procs").read_text() == "4242"
    assert cg.read("h3") == Limits(0.125, 2 * G)
    cg.set("h3", Limits())
    assert cg.read("h3") == Limits() and (cpu / "cpu.cfs_quota_us").read_text() == "-1"


def test_v2_max_files_under_a_child_with_the_controllers_enabled(tmp_path):
    _fake(tmp_path, {"cgroup.controllers": "cpuset cpu io memory pids", "cgroup.subtree_control": "",
                     "mlxfleet/h3/memory.swap.max": "max", "mlxfleet/h3/cgroup.procs": ""})
    cg = fleet_limits.detect(tmp_path)
    assert cg.version == "v2"
    cg.apply("h3", Limits(0.5, 6 * G), lambda: [4242])
    d = tmp_path / "mlxfleet/h3"
    assert (d / "cpu.max").read_text() == "5000 10000" and (d / "memory.max").read_text() == str(6 * G)
    assert (d / "memory.swap.max").read_text() == "0" and (d / "cgroup.procs").read_text() == "4242"
    # A fake file keeps only the last write; the kernel's accumulates "+cpu" then "+memory".
    assert (tmp_path / "mlxfleet/cgroup.subtree_control").read_text() == "+memory"
    assert cg.read("h3") == Limits(0.5, 6 * G)


def test_a_machine_without_cpu_and_memory_controllers_cannot_limit(tmp_path):
    _fake(tmp_path, {"cgroup.controllers": "io pids"})  # e.g. v1's empty `unified` hierarchy
    with pytest.raises(fleet_limits.LimitsUnavailable, match="cannot be limited"):
        fleet_limits.detect(tmp_path)


def test_a_host_mounts_the_machines_cgroup_hierarchies_again():
    # `ip netns exec` hides them under a fresh sysfs; the host's sshd script mounts them back.
    mountinfo = """23 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""
    assert fleet_limits.mount_commands(mountinfo, {"cpu": "cpu,cpuacct"}) == [
        "mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup",
        "mkdir -p /sys/fs/cgroup/cpu,cpuacct && mount -t cgroup -o cpu,cpuacct cgroup /sys/fs/cgroup/cpu,cpuacct",
        "mkdir -p /sys/fs/cgroup/memory && mount -t cgroup -o memory cgroup /sys/fs/cgroup/memory",
        "mkdir -p /sys/fs/cgroup/systemd && mount -t cgroup -o xattr,name=systemd cgroup /sys/fs/cgroup/systemd",
        "mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified",
        "ln -sfn cpu,cpuacct /sys/fs/cgroup/cpu"]
    v2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"
    assert fleet_limits.mount_commands(v2) == ["mkdir -p /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup"]


# ---------------------------------------------------------------- what configure makes of a host's groups

def test_the_tightest_limit_of_the_group_and_its_ancestors():
    v1 = ["cg_memory=9223372036854771712", "cg_memory=2147483648", "cg_memory=9223372036854771712",
          "cg_cpu=12500 100000", "cg_cpu=-1 100000", "cores=2"]
    assert cgroup_limits(v1) == (2 * G, 0.125)
    assert cgroup_limits(["cg_memory=max", "cg_cpu=max 100000"]) == (None, None)
    assert cgroup_limits(["cg_memory=6442450944", "cg_memory=max", "cg_cpu=150000 100000", "cg_cpu=50000 100000"]) \
        == (6 * G, 0.5)
    assert cgroup_limits([]) == (None, None)


def test_cluster_file_keeps_cpus_and_refuses_a_bad_one(tmp_path):
    path = tmp_path / "cluster.yaml"
    hosts = [Host("h1", "10.0.0.1", python="/p", memory=24 * G, cpus=2.0),
             Host("h3", "10.0.0.3", python="/p", memory=2 * G, cpus=0.125)]
    write_cluster(path, hosts, "ring")
    assert load_cluster(str(path)).hosts == hosts
    for bad in ("-1", "0", ".nan", ".inf", "yes", "many"):
        data = yaml.safe_load(path.read_text())
        data["hosts"][1]["cpus"] = yaml.safe_load(bad)
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(UserError, match="cpus|not a valid cluster file") as exc:
            load_cluster(str(path))
        assert "configure --distributed" in str(exc.value), bad


# ---------------------------------------------------------------- on the fleet

H3_CPU, H3_MEMORY = 0.125, 256 * M
BUSY = ("import time; t0 = time.monotonic(); c0 = time.process_time()\n"
        "while time.monotonic() - t0 < 1.0: pass\n"
        "print((time.process_time() - c0) / (time.monotonic() - t0))")


@pytest.fixture(scope="module")
def limited(fleet):
    """The session fleet with h3 at 1/8 of a core and 256 MiB; limits lifted after the module.
    The provisioned fleet, so that provisioning (when this module starts the session's) never
    runs on the limited host."""
    try:
        fleet_tools.limit("h3", H3_CPU, H3_MEMORY)
    except fleet_limits.LimitsUnavailable as e:
        unavailable(str(e))
    try:
        yield fleet
    finally:
        fleet_tools.limit("h3")


def _group_file(host: str, name: str) -> str:
    """A file of the host's group (v1: in the controller's hierarchy named by the file; v2: one)."""
    cg = fleet_limits.detect()
    dirs = cg.dirs(host)
    d = dirs[0] if cg.version == "v2" or name.startswith("cpu.") else dirs[1]
    return (d / name).read_text()


@pytest.mark.fleet
def test_a_session_on_a_limited_host_is_in_its_group(limited):
    seen = {}
    for h in ("h1", "h3"):
        res = limited.ssh(h, "cat /proc/self/cgroup")
        assert res.returncode == 0, res.stderr
        seen[h] = fleet_limits.groups_in(res.stdout)
    for controller in ("cpu", "memory") if fleet_limits.detect().version == "v1" else ("",):
        assert seen["h3"][controller] == "/mlxfleet/h3", seen["h3"]
        assert "mlxfleet" not in seen["h1"][controller], seen["h1"]
    assert fleet_tools.limits_in_force("h3") == Limits(H3_CPU, H3_MEMORY)
    assert fleet_tools.load().host("h3").limits == Limits(H3_CPU, H3_MEMORY)  # state.json
    inventory = yaml.safe_load(limited.inventory_path.read_text())["fleet"]["hosts"]
    assert (inventory["h3"]["fleet_cpu_quota"], inventory["h3"]["fleet_memory_limit"]) == (H3_CPU, H3_MEMORY)
    assert (inventory["h1"]["fleet_cpu_quota"], inventory["h1"]["fleet_memory_limit"]) == (None, None)


def _throttled(host: str) -> int:
    stat = dict(line.split() for line in _group_file(host, "cpu.stat").splitlines())
    return int(stat["nr_throttled"])


@pytest.mark.fleet
def test_a_busy_loop_on_the_limited_host_gets_about_its_quota(limited):
    # CPU time over wall time of the same 1 s loop on h1 and h3 at once: a share, not a speed.
    before = _throttled("h3")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = {h: pool.submit(limited.ssh, h, f"{limited.python} -c {shlex.quote(BUSY)}", timeout=30)
                for h in ("h1", "h3")}
        share = {}
        for h, fut in runs.items():
            res = fut.result()
            assert res.returncode == 0, res.stderr
            share[h] = float(res.stdout)
    assert share["h3"] <= H3_CPU * 1.6, share  # CFS gives it no more than its quota per period
    assert share["h3"] < 0.75 * share["h1"], share
    assert _throttled("h3") > before  # and the kernel says it held it back


@pytest.mark.fleet
def test_a_process_past_the_memory_limit_is_killed_inside_the_group(limited):
    def allocate(host: str, mib: int) -> str:
        # bytes * n writes every page: memory really used, not a lazy zero mapping.
        script = f"b = b'x' * ({mib} << 20); print(len(b) >> 20)"
        res = limited.ssh(host, f"{limited.python} -c {shlex.quote(script)}; echo rc=$?", timeout=60)
        return res.stdout.split()[-1]

    kills = _oom_kills("h3")
    assert allocate("h3", 64) == "rc=0"   # under the limit: fine
    assert allocate("h3", 384) == "rc=137"  # SIGKILL from the OOM killer
    assert _oom_kills("h3") == kills + 1  # ... acting in h3's group
    assert allocate("h1", 384) == "rc=0"  # the same on an unlimited host: fine


def _oom_kills(host: str) -> int:
    name = "memory.oom_control" if fleet_limits.detect().version == "v1" else "memory.events"
    counters = dict(line.split() for line in _group_file(host, name).splitlines())
    return int(counters["oom_kill"])


@pytest.mark.fleet
def test_configure_records_what_the_limited_host_has(limited, tmp_path):
    out = tmp_path / "cluster.yaml"
    res = subprocess.run([MLX_TRAIN, "configure", "--distributed", "--inventory", str(limited.inventory_path),
                          "--output", str(out), "--hostfile", str(tmp_path / "hostfile.json")],
                         env=fleet_env(limited), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    hosts = {h.name: h for h in load_cluster(str(out)).hosts}
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert hosts["h3"].memory == H3_MEMORY and hosts["h3"].cpus == H3_CPU
    assert math.isclose(hosts["h1"].memory, physical, rel_tol=0.01) and hosts["h1"].cpus == os.cpu_count()
    assert "h3: 10.77.0.13 on eth0, %d cores (a quota of 0.125), 0.25 GiB" % os.cpu_count() in res.stdout


@pytest.mark.fleet
def test_the_testinfra_check_sees_h3s_limits(limited):
    # tests/infra's check, here on the limited h3 (the infra run itself sees the unlimited fleet).
    import importlib.util

    import testinfra

    spec = importlib.util.spec_from_file_location("infra_nodes", REPO / "tests" / "infra" / "test_nodes.py")
    nodes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nodes)
    inventory = yaml.safe_load(limited.inventory_path.read_text())["fleet"]["hosts"]
    for name in ("h1", "h3"):
        node = testinfra.get_host(f"ssh://{name}", ssh_config=str(limited.ssh_config))
        nodes.test_a_nodes_cgroup_limits_are_the_inventorys(node, inventory)


@pytest.mark.fleet
def test_lifting_the_limits_puts_the_host_back(limited):
    def groups(host: str) -> dict:
        res = limited.ssh(host, "cat /proc/self/cgroup")
        assert res.returncode == 0, res.stderr
        return fleet_limits.groups_in(res.stdout)

    before = groups("h2")
    fleet_tools.limit("h2", cpu=0.5)
    try:
        assert "/mlxfleet/h2" in groups("h2").values()
    finally:
        fleet_tools.limit("h2")
    assert groups("h2") == before
    assert not any(d.exists() for d in fleet_limits.detect().dirs("h2"))
    inventory = yaml.safe_load(limited.inventory_path.read_text())["fleet"]["hosts"]
    assert (inventory["h2"]["fleet_cpu_quota"], inventory["h2"]["fleet_memory_limit"]) == (None, None)
