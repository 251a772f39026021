"""The cluster file (`cluster.yaml`): which hosts take part and how to reach them.

Written by `mlx-train configure --distributed` from an Ansible inventory; read by `train
--distributed`. Each host: `name` (ssh destination), `addr` (pinned interface address for the
ring backend), `iface`, `python` (absolute interpreter), `cores`, `slots` (ranks).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import yaml

from mlx_train.errors import UserError

LOCAL = "localhost"


@dataclass
class Host:
    name: str                    # ssh destination, or "localhost"
    addr: str = "127.0.0.1"      # address the ring backend binds and connects on
    python: str = sys.executable  # absolute interpreter on that host
    cores: Optional[int] = None
    slots: int = 1               # ranks this host takes
    memory: Optional[int] = None  # bytes of device memory, from the cluster file (remote hosts)

    @property
    def local(self) -> bool:
        return self.name == LOCAL



DEFAULT_PATHS = (Path("cluster.yaml"), Path.home() / ".mlx-train" / "cluster.yaml")


def find_cluster_file(path: Optional[str] = None) -> Path:
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"cluster file {p} does not exist: create it with "
                            "`mlx-train configure --distributed --inventory <inventory.yml>`")
        return p
    for p in DEFAULT_PATHS:
        if p.is_file():
            return p
    raise UserError("no cluster file (cluster.yaml here or in ~/.mlx-train/): run `mlx-train configure "
                    "--distributed --inventory <inventory.yml>` first, or train locally with --devices N")


def load_hosts(path: Optional[str] = None) -> List[Host]:
    p = find_cluster_file(path)
    try:
        data = yaml.safe_load(p.read_text())
        hosts = [Host(name=str(h["name"]), addr=str(h["addr"]), python=str(h["python"]),
                      cores=h.get("cores"), slots=int(h.get("slots", 1)), memory=h.get("memory"))
                 for h in data["hosts"]]
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{p} is not a valid cluster file ({exc.__class__.__name__}: {exc}): "
                        "regenerate it with `mlx-train configure --distributed`") from None
    if not hosts:
        raise UserError(f"{p} lists no hosts: regenerate it with `mlx-train configure --distributed`")
    return hosts


def with_devices(hosts: List[Host], devices: Optional[int]) -> List[Host]:
    """Spread `devices` ranks over the hosts in blocks (as evenly as they go); None keeps the file's slots."""
    if devices is None:
        return hosts
    if devices < len(hosts):
        hosts = hosts[:devices]
    base, extra = divmod(devices, len(hosts))
    return [Host(h.name, h.addr, h.python, h.cores, base + (1 if i < extra else 0), h.memory)
            for i, h in enumerate(hosts)]
