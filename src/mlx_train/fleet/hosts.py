"""The cluster file (`cluster.yaml`): which hosts take part, how to reach them, which backend.

The one host type and the one parser of the file. Written by `mlx-train configure --distributed`
from an Ansible inventory (and the nodes' provisioned facts); read by `train --distributed`,
`optimize`, `status`, `check-network` and `reset-distributed`. Each host: `name` (ssh
destination), `addr` (pinned interface address for the ring backend), `iface`, `python`
(absolute interpreter), `memory` (bytes), `cpus` (cores' worth of CPU it may use: its core count,
or less under a cgroup CPU quota), `slots` (ranks), `chip` (its processor, as configure found it), and
optionally `speed` (rows per second per rank, as measured: `mlx-train status` shows it). At the top, `backend`: the one the
nodes were provisioned for (Ansible's `mlx_backend`), which `train --distributed` defaults to.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from mlx_train.errors import UserError

LOCAL = "localhost"
MAX_CPUS = 4096  # cores on one host; more is a typo
DEFAULT_PATHS = (Path("cluster.yaml"), Path.home() / ".mlx-train" / "cluster.yaml")


@dataclass
class Host:
    name: str                    # ssh destination, or "localhost"
    addr: str = "127.0.0.1"      # address the ring backend binds and connects on
    iface: str = ""              # the pinned interface `addr` is on ("" for local ranks)
    python: str = sys.executable  # absolute interpreter on that host
    slots: int = 1               # ranks this host takes
    memory: Optional[int] = None  # bytes of device memory, from the cluster file (remote hosts)
    cpus: Optional[float] = None  # cores' worth of CPU time (a cgroup quota may make it fractional)
    chip: Optional[str] = None   # the processor configure found ("Apple M2 Max"): unequal hardware (planner)
    speed: Optional[float] = None  # rows per second per rank, when measured (planner: a host too slow to help)
    # Set before launch, never from the file: where the run's model and data lie on this host
    # (the path the config names -> its copy in this host's cache, ship.py).
    placed: Dict[str, str] = field(default_factory=dict)

    @property
    def local(self) -> bool:
        return self.name == LOCAL


@dataclass
class Cluster:
    path: Path
    hosts: List[Host] = field(default_factory=list)
    backend: Optional[str] = None  # what the nodes were provisioned for; None in files from before


def configured() -> Optional[Path]:
    """The cluster file a command uses when given none (./cluster.yaml, then ~/.mlx-train/), or None."""
    return next((p for p in DEFAULT_PATHS if p.is_file()), None)


def find_cluster_file(path: Optional[str] = None) -> Path:
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"cluster file {p} does not exist: create it with "
                            "`mlx-train configure --distributed --inventory <inventory.yml>`")
        return p
    p = configured()
    if p is None:
        raise UserError("no cluster file (cluster.yaml here or in ~/.mlx-train/): run `mlx-train configure "
                        "--distributed --inventory <inventory.yml>` first, or train locally with --devices N")
    return p


def load_cluster(path: Optional[str] = None) -> Cluster:
    p = find_cluster_file(path)
    try:
        data = yaml.safe_load(p.read_text())
        hosts = [Host(name=str(h["name"]), addr=str(h["addr"]), iface=str(h.get("iface") or ""),
                      python=str(h["python"]), slots=int(h.get("slots", 1)),
                      memory=int(h["memory"]) if h.get("memory") is not None else None,
                      cpus=_cpus(h.get("cpus")), chip=str(h["chip"]) if h.get("chip") else None,
                      speed=float(h["speed"]) if h.get("speed") is not None else None)
                 for h in data["hosts"]]
        backend = data.get("backend")
    except (yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise UserError(f"{p} is not a valid cluster file ({exc.__class__.__name__}: {exc}): "
                        "regenerate it with `mlx-train configure --distributed`") from None
    bad = next((h for h in hosts if h.cpus is not None and not 0 < h.cpus <= MAX_CPUS), None)
    if bad is not None:
        raise UserError(f"{p}: host {bad.name} has cpus {bad.cpus!r}, not a number of cores from 0 to {MAX_CPUS}: "
                        "fix it, or regenerate the file with `mlx-train configure --distributed`")
    slow = next((h for h in hosts if h.speed is not None and not 0 < h.speed < float("inf")), None)
    if slow is not None:
        raise UserError(f"{p}: host {slow.name} has speed {slow.speed!r}, not a positive number of rows per second: "
                        "fix it or remove it")
    if not hosts:
        raise UserError(f"{p} lists no hosts: regenerate it with `mlx-train configure --distributed`")
    return Cluster(p, hosts, str(backend) if backend else None)


def _cpus(value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool):  # YAML's `yes`: float() would take it as 1.0
        raise ValueError(f"cpus {value!r} is not a number")
    return float(value)


def load_hosts(path: Optional[str] = None) -> List[Host]:
    return load_cluster(path).hosts


def write_cluster(path: Path, hosts: List[Host], backend: Optional[str]) -> None:
    data = {**({"backend": backend} if backend else {}),
            "hosts": [{"name": h.name, "addr": h.addr, "iface": h.iface, "python": h.python, "memory": h.memory,
                       "cpus": h.cpus, "slots": h.slots, **({"chip": h.chip} if h.chip else {}),
                       **({"speed": h.speed} if h.speed is not None else {})} for h in hosts]}
    path.write_text("# Written by `mlx-train configure --distributed`; one rank per slot.\n"
                    + yaml.safe_dump(data, sort_keys=False))


def with_devices(hosts: List[Host], devices: Optional[int]) -> List[Host]:
    """Spread `devices` ranks over the hosts in blocks (as evenly as they go); None keeps the file's slots."""
    if devices is None:
        return hosts
    if devices < len(hosts):
        hosts = hosts[:devices]
    base, extra = divmod(devices, len(hosts))
    return [replace(h, slots=base + (1 if i < extra else 0)) for i, h in enumerate(hosts)]
