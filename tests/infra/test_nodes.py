"""What provisioning promises on every node, checked over ssh the way training uses it."""
import importlib.metadata
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.fleet

VENV_PYTHON = "/opt/mlx-train/venv/bin/python"
REPO = Path(__file__).resolve().parents[2]
# Run on the node and here alike: sha256 over the package's Python files, paths and contents.
PACKAGE_HASH = """
def package_hash(root):
    import hashlib
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts):
        h.update(f.relative_to(root).as_posix().encode() + b"\\0" + f.read_bytes() + b"\\0")
    return h.hexdigest()
"""


def mca_param(node, framework: str, name: str, *, from_env: bool = False, component: str = "tcp") -> tuple[str, str]:
    """(current value, data source) of an MCA parameter as ompi_info reports it.

    Without from_env the OMPI_MCA_ variable is unset first: the login environment exports the
    same value, and it would otherwise hide whether the params file is right.
    """
    unset = "" if from_env else f"env -u OMPI_MCA_{name} "
    out = node.check_output(f"{unset}ompi_info --param {framework} {component} --level 9")
    m = re.search(rf'parameter "{name}" \(current value: "([^"]*)", data source: ([^,]+(?:\([^)]*\))?)', out)
    assert m, f"{name} not in ompi_info output:\n{out}"
    return m.group(1), m.group(2)


def test_rsync_is_there_for_shipping_models(node):
    # fleet/ship.py copies a model and its data to each node with rsync over the fleet's ssh.
    assert node.run("rsync --version").rc == 0


def test_openmpi_is_installed_with_the_libmpi_mlx_loads(node):
    assert node.exists("mpirun")
    assert node.run("ompi_info --version").rc == 0
    # MLX dlopens the unversioned name (MLX_MPI_LIBNAME defaults to libmpi.so).
    node.check_output(f"{VENV_PYTHON} -c \"import ctypes; ctypes.CDLL('libmpi.so')\"")


def test_btl_tcp_links_comes_from_the_params_file(node):
    value, source = mca_param(node, "btl", "btl_tcp_links")
    assert value == "4"
    assert source.startswith("file (") and "openmpi-mca-params.conf" in source, source


def test_allreduce_uses_the_ring_algorithm_from_the_params_file(node):
    for name, want in (("coll_tuned_use_dynamic_rules", "true"), ("coll_tuned_allreduce_algorithm", "ring")):
        value, source = mca_param(node, "coll", name, component="tuned")
        assert value in (want, {"true": "1", "ring": "4"}[want]), (name, value)
        assert source.startswith("file (") and "openmpi-mca-params.conf" in source, (name, source)


def test_mpi_traffic_is_pinned_to_the_hosts_own_interface(node, inventory):
    iface = inventory[node.backend.hostname]["mlx_interface"]
    links = node.check_output("ip -o link show")
    assert re.search(rf"^\d+: {re.escape(iface)}[:@]", links, re.M), f"{iface} not on the host:\n{links}"
    for framework, name in (("btl", "btl_tcp_if_include"), ("oob", "oob_tcp_if_include")):
        value, source = mca_param(node, framework, name)
        assert (value, source.split(" ")[0]) == (iface, "file"), (name, value, source)


def test_login_environment_carries_the_mpi_and_ring_settings(node, inventory, fleet):
    # What `ssh host cmd` sees: the same path mpirun's remote launch and ranks take.
    env = dict(line.split("=", 1) for line in node.check_output("env").splitlines() if "=" in line)
    iface = inventory[node.backend.hostname]["mlx_interface"]
    assert env.get("OMPI_MCA_btl_tcp_links") == "4"
    assert env.get("OMPI_MCA_btl_tcp_if_include") == iface
    assert env.get("OMPI_MCA_oob_tcp_if_include") == iface
    assert env.get("MLX_TRAIN_PYTHON") == VENV_PYTHON
    # node.yml is the one record of the node's interface, address and backend.
    assert not {"MLX_TRAIN_NODE", "MLX_TRAIN_IFACE", "MLX_TRAIN_ADDR", "MLX_TRAIN_BACKEND"} & set(env)
    _, source = mca_param(node, "btl", "btl_tcp_links", from_env=True)
    assert source == "environment"


def test_node_facts_file_names_the_pinned_address(node, inventory, fleet):
    facts = yaml.safe_load(node.file("/opt/mlx-train/node.yml").content_string)
    name = node.backend.hostname
    assert facts["interface"] == inventory[name]["mlx_interface"]
    assert facts["address"] == fleet.host(name).ip
    assert facts["backend"] == "ring"


def test_every_node_reaches_every_other_with_host_key_checking(node, fleet):
    me = node.backend.hostname
    for peer in fleet.hosts:
        if peer.name == me:
            continue
        for target in (peer.ip, peer.name):
            cmd = f"ssh -o StrictHostKeyChecking=yes -o BatchMode=yes {shlex.quote(target)} hostname"
            res = node.run(cmd)
            assert (res.rc, res.stdout.strip()) == (0, peer.name), f"{me} -> {target}: {res.stderr}"


def test_every_node_has_the_same_venv_as_the_controller(fleet):
    # The installed package's content, not its version string (0.1.0 for every build): a node left
    # with an older install of the same version must fail here.
    probe = ("import json, importlib.metadata as m, sys, mlx.core as mx, mlx_train, pathlib; "
             f"exec({PACKAGE_HASH!r}); "
             "print(json.dumps([sys.prefix, m.version('mlx'), package_hash(pathlib.Path(mlx_train.__file__).parent), "
             "mx.ones(2).sum().item()]))")
    seen = {}
    for h in fleet.hosts:
        res = fleet.ssh(h, f"{VENV_PYTHON} -c {shlex.quote(probe)}")
        assert res.returncode == 0, f"{h.name}: {res.stderr}"
        seen[h.name] = json.loads(res.stdout)
    namespace: dict = {}
    exec(PACKAGE_HASH, namespace)
    source = namespace["package_hash"](REPO / "src" / "mlx_train")
    controller = ["/opt/mlx-train/venv", importlib.metadata.version("mlx"), source, 2.0]
    assert all(v == controller for v in seen.values()), (controller, seen)


def test_sshd_ends_sessions_whose_client_went_silent(node):
    """ClientAliveInterval from the ssh_mesh role: over a link down for good, sshd ends the session
    and the rank it carries sees its stdin end (rank/lifeline.py)."""
    settings = dict(line.split(" ", 1) for line in node.check_output("/usr/sbin/sshd -T").splitlines() if " " in line)
    assert settings["clientaliveinterval"] == "5" and settings["clientalivecountmax"] == "3", settings


def test_a_nodes_cgroup_limits_are_the_inventorys(node, inventory):
    """What tools/fleet.py records for a host (fleet_cpu_quota, fleet_memory_limit; null: none) is
    what a session on it lives under: its own group `mlxfleet/<host>` with that CPU quota and
    memory limit, or (unlimited) no fleet group at all."""
    name = node.backend.hostname
    want = (inventory[name]["fleet_cpu_quota"], inventory[name]["fleet_memory_limit"])
    groups = {}
    for line in node.check_output("cat /proc/self/cgroup").splitlines():
        _, controllers, path = line.split(":", 2)
        groups.update({c: path for c in controllers.split(",")})
    v1 = node.file("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists  # v1: a hierarchy per controller
    mine = {c: groups[c] for c in (("cpu", "memory") if v1 else ("",))}
    if want == (None, None):
        assert not any("mlxfleet" in path for path in mine.values()), (name, groups)
        return
    assert set(mine.values()) == {f"/mlxfleet/{name}"}, (name, groups)

    def read(path: str) -> str:
        return node.file(f"/sys/fs/cgroup{path}").content_string.strip()

    if v1:
        quota, period = int(read(f"/cpu/mlxfleet/{name}/cpu.cfs_quota_us")), int(read(f"/cpu/mlxfleet/{name}/cpu.cfs_period_us"))
        limit = int(read(f"/memory/mlxfleet/{name}/memory.limit_in_bytes"))
        seen = (None if quota < 0 else quota / period, None if limit >= 2**62 else limit)
    else:
        quota, period = read(f"/mlxfleet/{name}/cpu.max").split()
        limit = read(f"/mlxfleet/{name}/memory.max")
        seen = (None if quota == "max" else int(quota) / int(period), None if limit == "max" else int(limit))
    assert seen == want, name
