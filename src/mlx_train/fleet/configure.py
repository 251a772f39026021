"""`mlx-train configure --distributed`: ask every inventory host how to reach it, write the cluster file.

Per host, over ssh: its pinned interface and that interface's IPv4 address (the ring binds
there), the venv's interpreter and the core count. Output: `cluster.yaml` (read by `train
--distributed`) and an `mlx.launch`-compatible hostfile.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from mlx_train.fleet import ssh as remote
from mlx_train.errors import UserError

DEFAULT_VENV = "/opt/mlx-train/venv"
FLEET_INVENTORY = Path(".fleet/inventory.yml")
LOCAL_INVENTORY = Path("inventory/local.yml")

# One round trip per host. The login shell has sourced the node's env hook, so MLX_TRAIN_IFACE is
# the provisioned interface when the inventory does not name one.
_PROBE = r"""
iface=${1:-${MLX_TRAIN_IFACE:-}}
py=$2
echo "os=$(uname -s)"
echo "cores=$( (nproc || sysctl -n hw.ncpu) 2>/dev/null)"
# awk prints large products in %g, so Linux reports kB and Python multiplies.
if [ -r /proc/meminfo ]; then echo "memory_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
else echo "memory=$(sysctl -n hw.memsize 2>/dev/null)"; fi
echo "iface=$iface"
if [ -n "$iface" ]; then
  if command -v ip >/dev/null 2>&1; then
    addr=$(ip -4 -o addr show dev "$iface" 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | head -n 1)
  else
    addr=$(ipconfig getifaddr "$iface" 2>/dev/null)
  fi
  echo "addr=$addr"
fi
[ -x "$py" ] && echo "python=$py"
"""


@dataclass
class Probed:
    name: str
    addr: str
    iface: str
    python: str
    cores: int
    memory: Optional[int] = None  # bytes; the planner's device memory for this host


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
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"inventory {path} is not valid YAML ({exc}): fix it") from None
    hosts: Dict[str, dict] = {}

    def walk(group: dict, inherited: dict) -> None:
        group = group or {}
        gvars = {**inherited, **(group.get("vars") or {})}
        for name, hvars in (group.get("hosts") or {}).items():
            hosts[name] = {**hosts.get(name, {}), **gvars, **(hvars or {})}
        for child in (group.get("children") or {}).values():
            walk(child, gvars)

    for group in data.values():
        walk(group, {})
    return hosts


def ssh_destination(name: str, hostvars: dict) -> str:
    """What `ssh` is given: the inventory name when ssh's config knows it (the test fleet, a
    user's ~/.ssh/config), else `user@ansible_host`."""
    if hostvars.get("ansible_connection") == "local" or name in ("localhost", "127.0.0.1"):
        return remote.LOCAL
    try:
        g = subprocess.run(["ssh", "-G", name], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        g = ""
    resolved = next((line.split(None, 1)[1] for line in g.splitlines() if line.startswith("hostname ")), name)
    if resolved != name or "ansible_host" not in hostvars:
        return name
    user = hostvars.get("ansible_user")
    return f"{user}@{hostvars['ansible_host']}" if user else str(hostvars["ansible_host"])


def probe(name: str, hostvars: dict) -> Probed:
    dest = ssh_destination(name, hostvars)
    venv = hostvars.get("mlx_train_venv", DEFAULT_VENV)
    python = f"{venv}/bin/python"
    iface = str(hostvars.get("mlx_interface") or "")
    command = f"sh -c {shlex.quote(_PROBE)} probe {shlex.quote(iface)} {shlex.quote(python)}"
    res = remote.run(dest, command, timeout=remote.CONNECT_TIMEOUT_S + 15, fresh=True)
    if not res.ok:
        raise UserError(f"host {name} ({dest}) is not reachable over ssh ({res.why()}): check it is on and that "
                        f"`ssh {dest} true` works without a password (ssh-copy-id), then run configure again")
    facts = dict(line.split("=", 1) for line in res.out.splitlines() if "=" in line)
    iface = facts.get("iface", "")
    if not iface:
        raise UserError(f"host {name} has no pinned interface: set mlx_interface for it in the inventory and "
                        "run `make provision`")
    if not facts.get("addr"):
        raise UserError(f"host {name} has no IPv4 address on interface {iface}: fix mlx_interface in the inventory "
                        "or bring the interface up, then run configure again")
    if "python" not in facts:
        if dest != remote.LOCAL:
            raise UserError(f"host {name} has no interpreter at {python}: run `make provision` (or set "
                            "mlx_train_venv for it in the inventory)")
        facts["python"] = sys.executable  # this machine, not provisioned: the controller's own venv
    cores, kb, memory = (facts.get(k, "").strip() for k in ("cores", "memory_kb", "memory"))
    return Probed(dest, facts["addr"], iface, facts["python"], int(cores) if cores.isdigit() else 1,
                  int(kb) * 1024 if kb.isdigit() else int(memory) if memory.isdigit() else None)


def write_files(hosts: List[Probed], output: Path, hostfile: Optional[Path]) -> None:
    data = {"hosts": [{"name": h.name, "addr": h.addr, "iface": h.iface, "python": h.python, "cores": h.cores,
                       "memory": h.memory, "slots": 1} for h in hosts]}
    output.write_text("# Written by `mlx-train configure --distributed`; one rank per slot.\n"
                      + yaml.safe_dump(data, sort_keys=False))
    if hostfile:
        # mlx.launch treats only the literal 127.0.0.1 as local.
        launch = {"backend": "ring", "envs": [],
                  "hosts": [{"ssh": "127.0.0.1" if h.name == remote.LOCAL else h.name, "ips": [h.addr]}
                            for h in hosts]}
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
    probed = remote.parallel(lambda n: probe(n, hostvars[n]), names)
    write_files(probed, Path(output), Path(hostfile) if hostfile else None)
    for h in probed:
        print(f"{h.name}: {h.addr} on {h.iface}, {h.cores} cores, {h.python}")
    print(f"wrote {output}" + (f" and {hostfile}" if hostfile else "") + f" ({len(probed)} hosts from {path})")
    return 0
