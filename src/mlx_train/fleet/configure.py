"""`mlx-train configure --distributed`: ask every inventory host how to reach it, write the cluster file.

Per host, over ssh: the facts provisioning left in the node facts file (`node.yml`, written by
the Ansible node role: pinned interface and address, backend), that interface's IPv4 address
now (the ring binds there), the venv's interpreter, memory and core count -- within the host's
cgroup limits, where it has any (a container, or the test fleet's unequal hosts: the memory is
min(physical, the group's limit), the cores min(cores, its CPU quota)). Output: `cluster.yaml`
(read by `train --distributed`, which defaults to the provisioned backend) and an
`mlx.launch`-compatible hostfile.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

from mlx_train.config import BACKENDS
from mlx_train.errors import UserError
from mlx_train.fleet import ssh
from mlx_train.fleet.hosts import LOCAL, Host, write_cluster

DEFAULT_ROOT = "/opt/mlx-train"  # Ansible's mlx_train_root: the venv and node.yml live under it
FLEET_INVENTORY = Path(".fleet/inventory.yml")
LOCAL_INVENTORY = Path("inventory/local.yml")

# One round trip per host: key=value facts, then the node facts file after a marker line. The
# interface is the inventory's, else the one provisioning pinned (node.yml's `interface`).
_NODE_MARK = "---- node.yml ----"
_PROBE = r"""
node=$3
iface=$1
[ -z "$iface" ] && [ -r "$node" ] && iface=$(sed -n 's/^interface: *//p' "$node" | tr -d '"' | head -n 1)
py=$2
echo "os=$(uname -s)"
echo "cores=$( (nproc || sysctl -n hw.ncpu) 2>/dev/null)"
echo "chip=$( (sysctl -n machdep.cpu.brand_string || sed -n 's/^model name[[:space:]]*: *//p' /proc/cpuinfo | head -n 1) 2>/dev/null)"
# awk prints large products in %g, so Linux reports kB and Python multiplies.
if [ -r /proc/meminfo ]; then echo "memory_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
else echo "memory=$(sysctl -n hw.memsize 2>/dev/null)"; fi
echo "iface=$iface"
if [ -n "$iface" ]; then
  if command -v ip >/dev/null 2>&1; then
    addr=$(ip -4 -o addr show dev "$iface" 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | tr '\n' ' ')
  else
    addr=$(ipconfig getifaddr "$iface" 2>/dev/null)
  fi
  echo "addr=$addr"
fi
[ -x "$py" ] && echo "python=$py"
# The limits of this shell's cgroup and every ancestor's (the kernel applies the tightest):
# v1 per controller, v2 one hierarchy. One cg_memory / cg_cpu line per level; Python takes the min.
up_from() {
  p=$3
  while :; do
    [ -d "$2$p" ] && $1 "$2$p"
    case "$p" in ""|/) break ;; esac
    p=${p%/*}
  done
}
v1_memory() { [ -r "$1/memory.limit_in_bytes" ] && echo "cg_memory=$(cat "$1/memory.limit_in_bytes")"; }
v1_cpu() { [ -r "$1/cpu.cfs_quota_us" ] && echo "cg_cpu=$(cat "$1/cpu.cfs_quota_us") $(cat "$1/cpu.cfs_period_us")"; }
v2() {
  [ -r "$1/memory.max" ] && echo "cg_memory=$(cat "$1/memory.max")"
  [ -r "$1/cpu.max" ] && echo "cg_cpu=$(cat "$1/cpu.max")"
}
if [ -r /proc/self/cgroup ]; then
  while IFS=: read -r _ ctrl path; do
    case ",$ctrl," in *,memory,*) up_from v1_memory /sys/fs/cgroup/memory "$path" ;; esac
    case ",$ctrl," in *,cpu,*) up_from v1_cpu /sys/fs/cgroup/cpu "$path" ;; esac
    [ -z "$ctrl" ] && [ -r /sys/fs/cgroup/cgroup.controllers ] && up_from v2 /sys/fs/cgroup "$path"
  done < /proc/self/cgroup
fi
echo "@NODE_MARK@"
[ -r "$node" ] && cat "$node"
exit 0
""".replace("@NODE_MARK@", _NODE_MARK)


def cgroup_limits(lines: List[str]) -> Tuple[Optional[int], Optional[float]]:
    """(memory limit in bytes, CPU quota in cores) from the probe's cg_memory / cg_cpu lines, the
    tightest of the group's and its ancestors'; None where nothing limits it. v1 writes -1 or a
    huge number for no limit, v2 `max`."""
    memory: Optional[int] = None
    cpus: Optional[float] = None
    for line in lines:
        key, _, value = line.partition("=")
        if key == "cg_memory" and value.strip().isdigit():
            limit = int(value)
            if limit < 2**62:  # v1's "unlimited" is 2**63 rounded down to a page
                memory = limit if memory is None else min(memory, limit)
        elif key == "cg_cpu":
            parts = value.split()
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit() and int(parts[1]) > 0:
                quota = int(parts[0]) / int(parts[1])
                cpus = quota if cpus is None else min(cpus, quota)
    return memory, cpus


def default_inventory() -> Path:
    return FLEET_INVENTORY if FLEET_INVENTORY.is_file() else LOCAL_INVENTORY


def read_inventory(path: Path) -> Dict[str, dict]:
    """Host name -> its variables (group vars merged), as Ansible resolves them."""
    if not path.is_file():
        raise UserError(f"inventory {path} does not exist: pass --inventory FILE (see inventory/example-mac-fleet.yml)")
    tool = shutil.which("ansible-inventory") or shutil.which("ansible-inventory", path=str(Path(sys.executable).parent))
    if tool:
        p = subprocess.run([tool, "-i", str(path), "--list"], capture_output=True, text=True, timeout=60)
        if p.returncode == 0:
            hostvars = json.loads(p.stdout).get("_meta", {}).get("hostvars", {})
            if hostvars:
                return hostvars
    return _parse_yaml_inventory(path)


def _parse_yaml_inventory(path: Path) -> Dict[str, dict]:
    # Without Ansible: groups with hosts/vars/children; group vars apply to their hosts. Jinja in
    # values is not rendered, which the variables read here do not need.
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"inventory {path} is not valid UTF-8 YAML ({_first_line(exc)}): fix it") from None
    hosts: Dict[str, dict] = {}

    def mapping(value, where: str) -> dict:
        # Ansible's YAML inventory is mappings all the way down; anything else is a user's typo.
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise UserError(f"inventory {path}: {where} must be a mapping, not {type(value).__name__}: "
                            "see inventory/example-mac-fleet.yml")
        return value

    def walk(name: str, group, inherited: dict) -> None:
        group = mapping(group, f"group {name!r}")
        gvars = {**inherited, **mapping(group.get("vars"), f"{name}.vars")}
        for host, hvars in mapping(group.get("hosts"), f"{name}.hosts").items():
            hosts[str(host)] = {**hosts.get(str(host), {}), **gvars, **mapping(hvars, f"host {host!r}")}
        for child, sub in mapping(group.get("children"), f"{name}.children").items():
            walk(str(child), sub, gvars)

    for name, group in mapping(data, "the top level").items():
        walk(str(name), group, {})
    return hosts


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def ssh_destination(name: str, hostvars: dict) -> str:
    """What `ssh` is given: the inventory name when ssh's config knows it (the test fleet, a
    user's ~/.ssh/config), else `user@ansible_host`."""
    if hostvars.get("ansible_connection") == "local" or name in ("localhost", "127.0.0.1"):
        return LOCAL
    try:
        g = subprocess.run(["ssh", "-G", name], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        g = ""
    resolved = next((line.split(None, 1)[1] for line in g.splitlines() if line.startswith("hostname ")), name)
    if resolved != name or "ansible_host" not in hostvars:
        return name
    user = hostvars.get("ansible_user")
    return f"{user}@{hostvars['ansible_host']}" if user else str(hostvars["ansible_host"])


def probe(name: str, hostvars: dict) -> Tuple[Host, int, dict]:
    """The host as the cluster file records it, its core count, and its node facts (node.yml)."""
    dest = ssh_destination(name, hostvars)
    root = hostvars.get("mlx_train_root", DEFAULT_ROOT)
    python = f"{hostvars.get('mlx_train_venv', f'{root}/venv')}/bin/python"
    iface = str(hostvars.get("mlx_interface") or "")
    args = " ".join(shlex.quote(a) for a in (iface, python, f"{root}/node.yml"))
    res = ssh.run(dest, f"sh -c {shlex.quote(_PROBE)} probe {args}", timeout=ssh.CONNECT_TIMEOUT_S + 15, fresh=True)
    if not res.ok:
        raise UserError(f"host {name} ({dest}) is not reachable over ssh ({res.why()}): check it is on and that "
                        f"`ssh {dest} true` works without a password (ssh-copy-id), then run configure again")
    out, _, node_yml = res.out.partition(_NODE_MARK)
    facts = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    try:
        node = yaml.safe_load(node_yml) or {}
    except yaml.YAMLError:
        node = {}
    node = node if isinstance(node, dict) else {}
    iface = facts.get("iface", "")
    if not iface:
        raise UserError(f"host {name} has no pinned interface: set mlx_interface for it in the inventory and "
                        "run `make provision`")
    addrs = facts.get("addr", "").split()
    if not addrs:
        raise UserError(f"host {name} has no IPv4 address on interface {iface}: fix mlx_interface in the inventory "
                        "or bring the interface up, then run configure again")
    if "python" not in facts:
        if dest != LOCAL:
            raise UserError(f"host {name} has no interpreter at {python}: run `make provision` (or set "
                            "mlx_train_venv for it in the inventory)")
        facts["python"] = sys.executable  # this machine, not provisioned: the controller's own venv
    # The address provisioning pinned (an inventory may choose among several), if still on the interface.
    addr = str(node["address"]) if str(node.get("address")) in addrs else addrs[0]
    cores, kb, memory = (facts.get(k, "").strip() for k in ("cores", "memory_kb", "memory"))
    physical = int(kb) * 1024 if kb.isdigit() else int(memory) if memory.isdigit() else None
    cores_n = int(cores) if cores.isdigit() else 1
    group_memory, group_cpus = cgroup_limits(out.splitlines())
    if group_memory is not None:
        physical = group_memory if physical is None else min(physical, group_memory)
    cpus = float(cores_n) if group_cpus is None else min(float(cores_n), round(group_cpus, 3))
    host = Host(dest, addr, iface=iface, python=facts["python"], memory=physical, cpus=cpus,
                chip=facts.get("chip", "").strip() or None)
    return host, cores_n, node


def fleet_backend(nodes: Dict[str, dict]) -> Optional[str]:
    """The backend the hosts were provisioned for (Ansible's mlx_backend), None if none recorded one."""
    seen = {name: node.get("backend") for name, node in nodes.items() if node.get("backend")}
    if not seen:
        return None
    if len(set(seen.values())) > 1:
        raise UserError("the hosts were provisioned for different backends ("
                        + ", ".join(f"{n}: {b}" for n, b in seen.items())
                        + "): set one mlx_backend for the fleet and run `make provision`")
    backend = next(iter(seen.values()))
    if backend not in BACKENDS:
        raise UserError(f"the hosts were provisioned for backend {backend!r}, which mlx-train does not run "
                        f"({', '.join(BACKENDS)}): fix mlx_backend in the inventory and run `make provision`")
    return backend


def write_files(hosts: List[Host], backend: Optional[str], output: Path, hostfile: Optional[Path]) -> None:
    write_cluster(output, hosts, backend)
    if hostfile:
        # mlx.launch treats only the literal 127.0.0.1 as local.
        launch = {"backend": backend if backend in ("ring", "mpi") else "ring", "envs": [],
                  "hosts": [{"ssh": "127.0.0.1" if h.local else h.name, "ips": [h.addr]} for h in hosts]}
        hostfile.write_text(json.dumps(launch, indent=2) + "\n")


def configure(distributed: bool, inventory: Optional[str] = None, output: str = "cluster.yaml",
              hostfile: Optional[str] = "hostfile.json") -> int:
    if not distributed:
        raise UserError("configure only writes multi-host settings: pass --distributed (local runs need no "
                        "configuration: mlx-train train --devices N)")
    path = Path(inventory) if inventory else default_inventory()
    hostvars = read_inventory(path)
    if not hostvars:
        raise UserError(f"inventory {path} lists no hosts: add them (see inventory/example-mac-fleet.yml)")
    names = list(hostvars)
    probed = ssh.parallel(lambda n: probe(n, hostvars[n]), names)
    backend = fleet_backend({n: node for n, (_, _, node) in zip(names, probed)})
    hosts = [h for h, _, _ in probed]
    write_files(hosts, backend, Path(output), Path(hostfile) if hostfile else None)
    for h, cores, _ in probed:
        within = f" (a quota of {h.cpus:g})" if h.cpus is not None and h.cpus < cores else ""
        memory = f", {h.memory / 2**30:.2f} GiB" if h.memory else ""
        print(f"{h.name}: {h.addr} on {h.iface}, {cores} cores{within}{memory}, {h.python}")
    print(f"wrote {output}" + (f" and {hostfile}" if hostfile else "")
          + f" ({len(hosts)} hosts from {path}" + (f", provisioned for the {backend} backend)" if backend else ")"))
    return 0
