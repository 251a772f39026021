#!/usr/bin/env python3
"""A test fleet of N hosts on this machine: network namespaces on a bridge, one sshd each.

    python tools/fleet.py up --hosts 3     # h1..h3 at 10.77.0.11.. on bridge 10.77.0.1
    python tools/fleet.py up --hosts 3 --cpu 0.5,0.5,0.125 --memory 6G,6G,2G   # unequal hosts
    python tools/fleet.py limit h3 --cpu 0.125 --memory 2G   # or --clear; on the running fleet
    python tools/fleet.py status
    python tools/fleet.py down             # safe to rerun

Each host hI is a network namespace with its own `eth0`, hostname (UTS namespace) and sshd.
The sshd runs in a private mount namespace where a few directories are bind-mounted from
`.fleet/hosts/hI/` -- /root, /etc/ssh, /etc/openmpi, /etc/hosts and /opt/mlx-train -- so what
provisioning writes there stays per host; everything else is the shared disk.

All state lives in `.fleet/` (keys, ssh_config, known_hosts, the `bin/ssh` wrapper, sshd pid
records, the Ansible inventory). Needs root, iproute2 and openssh-server. Per-host CPU quotas
and memory limits go through the machine's cgroups (fleet_limits.py).

Tests import this file: `up(n) -> Fleet`, `down()`, `load()`, `run_in()`, `limit()`, fault helpers.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load_procs():
    # `down` must work from a bare python3 (no venv, no package dependencies), so the one
    # standard-library module it shares with the package is loaded by path, not via mlx_train.
    import importlib.util

    spec = importlib.util.spec_from_file_location("_mlx_train_procs", REPO / "src/mlx_train/procs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


procs = _load_procs()
sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus as corpus_text  # noqa: E402  (tools/corpus.py)
import fleet_limits  # noqa: E402  (tools/fleet_limits.py: standard library only, like this file)
from fleet_limits import Limits, LimitsUnavailable  # noqa: E402,F401
FLEET_DIR = REPO / ".fleet"
STATE = FLEET_DIR / "state.json"
BRIDGE = "mlxfleet0"
SUBNET = "10.77.0"
BRIDGE_IP = f"{SUBNET}.1"
NETNS_PREFIX = "mlxfleet-"
VETH_PREFIX = "mlxv-"
IFACE = "eth0"
MAX_HOSTS = 50
# Provisioning writes these; each host gets its own copy (host path -> seed directory name).
PRIVATE_DIRS = {
    "/root": "root",
    "/etc/ssh": "etc-ssh",
    "/etc/openmpi": "etc-openmpi",
    "/opt/mlx-train": "opt-mlx-train",
}
FAULT_TABLE = "mlxfault"


@dataclass(frozen=True)
class Host:
    name: str
    ip: str
    netns: str
    veth: str  # the root-namespace end; `ip link set <veth> down` cuts the host off
    interface: str = IFACE
    sshd_pid: int = 0
    cpu: float | None = None     # CPU quota in cores (cgroup CFS quota); None: unlimited
    memory: int | None = None    # memory limit in bytes (cgroup); None: unlimited

    @property
    def limits(self) -> Limits:
        return Limits(self.cpu, self.memory)


@dataclass
class ProvisionResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    recap: dict[str, dict[str, int]]  # host -> {"ok": .., "changed": .., "failed": .., ...}

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def changed(self) -> int:
        return sum(r.get("changed", 0) for r in self.recap.values())


@dataclass
class Fleet:
    hosts: list[Host]
    dir: Path
    ssh_wrapper_dir: Path  # put first on PATH so mlx.launch / mpirun / ansible use the fleet's ssh
    inventory_path: Path
    ssh_config: Path
    known_hosts: Path
    key_path: Path  # the controller's key, authorized on every host
    python: str  # the real python3 the inventory pins for Ansible
    provisioning: ProvisionResult | None = field(default=None, compare=False)

    def host(self, name: str | Host) -> Host:
        if isinstance(name, Host):
            return name
        for h in self.hosts:
            if name in (h.name, h.ip):
                return h
        raise KeyError(f"no fleet host {name!r}")

    def ssh(self, host: str | Host, command: str, *, timeout: float = 60,
            check: bool = False) -> subprocess.CompletedProcess:
        """Run `command` on `host` through the fleet's ssh wrapper (its login shell runs it)."""
        argv = [str(self.ssh_wrapper_dir / "ssh"), self.host(host).name, command]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check)

    def run_in(self, host: str | Host, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return run_in(self.host(host), argv, **kw)

    def client_env(self, **extra: str) -> dict[str, str]:
        """The environment for mlx-train against this fleet: its ssh wrapper first on PATH (so `ssh h1`
        resolves), wide tables so rows are not folded."""
        return {**os.environ, "PATH": f"{self.ssh_wrapper_dir}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "200",
                **extra}

    def ansible_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for ansible-playbook against this fleet: its state stays in .fleet/."""
        env = dict(os.environ if base is None else base)
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([str(self.ssh_wrapper_dir), bin_dir, env.get("PATH", "")])
        env["ANSIBLE_CONFIG"] = str(REPO / "ansible" / "ansible.cfg")
        env["ANSIBLE_HOME"] = str(self.dir / "ansible")
        env["ANSIBLE_NOCOLOR"] = "1"
        return env


# ---------------------------------------------------------------- small helpers

def _run(argv: list[str], *, input: str | None = None, check: bool = True,
         timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=input, capture_output=True, text=True,
                          check=check, timeout=timeout)


def _ip_batch(lines: list[str], *, netns: str | None = None, force: bool = False) -> None:
    """One `ip -batch` process instead of one per command: fleet start-up is mostly process spawns."""
    argv = ["ip"] + (["-n", netns] if netns else []) + (["-force"] if force else []) + ["-batch", "-"]
    res = _run(argv, input="\n".join(lines) + "\n", check=False)
    if res.returncode and not force:
        raise RuntimeError(f"ip -batch failed: {res.stderr.strip()}")


def wait_for(check, timeout: float, what: str, every: float = 0.2):
    """The first truthy value of check(), polled until `timeout` seconds; TimeoutError naming `what`.
    Every wait in the fleet's tools and tests is bounded by one."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


def _is_ours(pid: int, start: str, marker: str) -> bool:
    """True while `pid` is still the sshd we started (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return procs.start_time(pid) == start and marker in cmdline


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _signal(targets: dict[int, str | None], sig: int) -> None:
    for pid, start in targets.items():
        if start is not None and procs.start_time(pid) == start:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _netns_members(ns: str) -> list[int]:
    """Pids in network namespace `ns` (what `ip netns pids` does, minus a process spawn)."""
    try:
        ref = os.stat(f"/run/netns/{ns}")
    except OSError:
        return []
    pids = []
    for d in os.listdir("/proc"):
        try:
            st = os.stat(f"/proc/{d}/ns/net") if d.isdigit() else None
        except OSError:
            continue
        if st and (st.st_dev, st.st_ino) == (ref.st_dev, ref.st_ino):
            pids.append(int(d))
    return pids


def real_python() -> str:
    """A real python3 for Ansible on the hosts; a pyenv shim on PATH breaks discovery here."""
    # Same minor version as the controller first: the nodes install the controller's wheels.
    # Not the controller's own interpreter: it may live under /root, which is private per host.
    same = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for cand in (f"/usr/bin/{same}", f"/usr/local/bin/{same}", "/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(cand, os.X_OK):
            return cand
    return str(Path(sys.executable).resolve())


def _netns_list() -> list[str]:
    res = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def _host_dir(name: str) -> Path:
    return FLEET_DIR / "hosts" / name


def _sshd_config_path(name: str) -> Path:
    return _host_dir(name) / PRIVATE_DIRS["/etc/ssh"] / "sshd_config"


# ---------------------------------------------------------------- state

def load() -> Fleet | None:
    """The fleet described by .fleet/state.json, or None when none is recorded."""
    try:
        state = json.loads(STATE.read_text())
    except (OSError, ValueError):
        return None
    return Fleet(
        hosts=[Host(**h) for h in state["hosts"]],
        dir=FLEET_DIR,
        ssh_wrapper_dir=FLEET_DIR / "bin",
        inventory_path=FLEET_DIR / "inventory.yml",
        ssh_config=FLEET_DIR / "ssh_config",
        known_hosts=FLEET_DIR / "known_hosts",
        key_path=FLEET_DIR / "id_ed25519",
        python=state["python"],
    )


def _healthy(fleet: Fleet, state: dict) -> bool:
    starts = state.get("sshd_start", {})
    netns = set(_netns_list())
    return all(
        h.netns in netns and _is_ours(h.sshd_pid, starts.get(h.name, -1), str(_sshd_config_path(h.name)))
        for h in fleet.hosts
    )


# ---------------------------------------------------------------- up

def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _sshd_config(ip: str, name: str) -> str:
    return f"""# sshd for fleet host {name}; /etc/ssh here is .fleet/hosts/{name}/etc-ssh.
# Provisioning's drop-ins (ansible ssh_mesh), and a pid file of this host's own for its reload.
Include /etc/ssh/sshd_config.d/*.conf
PidFile /etc/ssh/sshd.pid
ListenAddress {ip}
HostKey /etc/ssh/ssh_host_ed25519_key
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
AuthorizedKeysFile .ssh/authorized_keys
UsePAM no
# The seeded home directories belong to the fleet folder, not to the host's user.
StrictModes no
PrintMotd no
# Ansible forks, testinfra and ControlMaster multiplexing open many sessions at once.
MaxSessions 64
MaxStartups 64:30:128
Subsystem sftp internal-sftp
LogLevel ERROR
"""


def _ssh_config(hosts: list[Host]) -> str:
    d = FLEET_DIR
    blocks = [f"Host {h.name}\n    HostName {h.ip}\n" for h in hosts]
    names = " ".join([h.name for h in hosts] + [h.ip for h in hosts])
    blocks.append(f"""Host {names}
    User root
    IdentityFile {d}/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile {d}/known_hosts
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 5
    ControlMaster auto
    ControlPath {d}/cm/%C
    ControlPersist 60
    LogLevel ERROR
""")
    return "\n".join(blocks)


def _inventory(hosts: list[Host], python: str) -> dict:
    d = FLEET_DIR
    return {"fleet": {
        # The limits the fleet set (null: none), for what reads the inventory (tests/infra).
        "hosts": {h.name: {"ansible_host": h.ip, "mlx_interface": h.interface,
                           "fleet_cpu_quota": h.cpu, "fleet_memory_limit": h.memory} for h in hosts},
        "vars": {
            "ansible_user": "root",
            "ansible_python_interpreter": python,
            "ansible_ssh_common_args": f"-F {d}/ssh_config",
            "ansible_control_path_dir": f"{d}/ansible/cp",
            "ssh_mesh_key_path": f"{d}/fleet_key",
            "ssh_mesh_sshd_pid_file": "/etc/ssh/sshd.pid",
            "mlx_backend": "ring",
        },
    }}


def _seed_host(h: Host, hosts: list[Host], pubkey: str) -> None:
    hd = _host_dir(h.name)
    etc_ssh = hd / PRIVATE_DIRS["/etc/ssh"]
    _write(hd / "root" / ".ssh" / "authorized_keys", pubkey, 0o600)
    (hd / "root" / ".ssh").chmod(0o700)
    (hd / PRIVATE_DIRS["/opt/mlx-train"]).mkdir(parents=True, exist_ok=True)
    etc_ssh.mkdir(parents=True, exist_ok=True)
    (etc_ssh / "ssh_config.d").mkdir(exist_ok=True)
    for f in ("ssh_config", "moduli"):
        if Path("/etc/ssh", f).exists():
            shutil.copy2(Path("/etc/ssh", f), etc_ssh / f)
    _write(etc_ssh / "sshd_config", _sshd_config(h.ip, h.name))
    if Path("/etc/openmpi").is_dir():
        shutil.copytree("/etc/openmpi", hd / PRIVATE_DIRS["/etc/openmpi"], dirs_exist_ok=True)
    # Peers by name work inside the fleet as they would with DNS on a real network.
    _write(hd / "hosts", "127.0.0.1 localhost\n" + "".join(f"{x.ip} {x.name}\n" for x in hosts))


def _sshd_script(h: Host) -> str:
    hd = _host_dir(h.name)
    mounts = [(hd / src, dst) for dst, src in PRIVATE_DIRS.items() if Path(dst).is_dir()]
    mounts.append((hd / "hosts", "/etc/hosts"))
    lines = [f"hostname {h.name}"]
    lines += [f"mount --bind {shlex.quote(str(src))} {dst}" for src, dst in mounts]
    cgroups = fleet_limits.machine_mount_commands()
    if cgroups:
        # Each on its own and never fatal: a host that cannot see its cgroups still comes up;
        # the limit tests (and configure's numbers) show it.
        lines.append("{ " + "".join(f"( {c} ) ; " for c in cgroups) + "true ; } 2>/dev/null")
    lines.append(f"exec /usr/sbin/sshd -D -f {shlex.quote(str(_sshd_config_path(h.name)))} "
                 f"-E {shlex.quote(str(hd / 'sshd.log'))}")
    return " && ".join(lines)


def _wait_port(ip: str, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((ip, 22), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.005)
    return False


def _check_prereqs() -> None:
    if os.geteuid() != 0:
        raise PermissionError("the test fleet needs root (network namespaces, bind mounts)")
    for tool in ("ip", "unshare", "nsenter", "ssh-keygen", "/usr/sbin/sshd", "/usr/bin/ssh"):
        if not shutil.which(tool):
            raise FileNotFoundError(f"the test fleet needs {tool} (iproute2, util-linux, openssh)")
    if len(str(FLEET_DIR / "cm")) + 42 > 104:
        raise OSError(f"{FLEET_DIR} is too deep for ssh ControlPath sockets (108-byte limit)")


def up(n: int = 3, limits: list[Limits] | None = None) -> Fleet:
    """Bring up hosts h1..hn, host i limited to limits[i] (default: none); reuses a healthy fleet
    of the same size (setting or clearing its limits to these), else rebuilds it."""
    if not 1 <= n <= MAX_HOSTS:
        raise ValueError(f"--hosts must be 1..{MAX_HOSTS}")
    limits = list(limits) if limits is not None else [Limits()] * n
    if len(limits) != n:
        raise ValueError(f"{len(limits)} host limits for {n} hosts")
    _check_prereqs()
    if any(not lim.unlimited for lim in limits):
        fleet_limits.detect()  # before building: a fleet that cannot be limited as asked is an error
    current = load()
    if current is not None and len(current.hosts) == n and _healthy(current, json.loads(STATE.read_text())):
        for h, lim in zip(current.hosts, limits):
            if h.limits != lim:
                limit(h.name, lim.cpu, lim.memory)
        return load()
    down()
    try:
        _build(n)
        for i, lim in enumerate(limits):
            if not lim.unlimited:
                limit(f"h{i + 1}", lim.cpu, lim.memory)
        return load()
    except BaseException:
        down()  # a half-built fleet is worse than none
        raise


def _build(n: int) -> Fleet:
    hosts = [Host(f"h{i}", f"{SUBNET}.{10 + i}", f"{NETNS_PREFIX}h{i}", f"{VETH_PREFIX}h{i}")
             for i in range(1, n + 1)]
    FLEET_DIR.mkdir(mode=0o700, exist_ok=True)
    (FLEET_DIR / "cm").mkdir(mode=0o700, exist_ok=True)
    (FLEET_DIR / "ansible" / "cp").mkdir(parents=True, exist_ok=True)
    created_opt = not Path("/opt/mlx-train").exists()
    # The mount point must exist on the shared disk; `down` removes it again if we made it.
    Path("/opt/mlx-train").mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    state = {"hosts": [], "python": real_python(), "created_opt": created_opt, "sshd_start": {}}
    _save(state)

    # Keys in parallel: one for the controller, one host key per host.
    keygens = [subprocess.Popen(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mlx-train-fleet-controller",
                                 "-f", str(FLEET_DIR / "id_ed25519")])]
    for h in hosts:
        key = _host_dir(h.name) / PRIVATE_DIRS["/etc/ssh"] / "ssh_host_ed25519_key"
        key.parent.mkdir(parents=True, exist_ok=True)
        keygens.append(subprocess.Popen(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", h.name, "-f", str(key)]))

    batch = [f"link add {BRIDGE} type bridge", f"addr add {BRIDGE_IP}/24 dev {BRIDGE}", f"link set {BRIDGE} up"]
    for h in hosts:
        batch += [f"netns add {h.netns}",
                  f"link add {h.veth} type veth peer name {h.interface} netns {h.netns}",
                  f"link set {h.veth} master {BRIDGE} up"]
    _ip_batch(batch)
    for h in hosts:
        _ip_batch(["link set lo up", f"addr add {h.ip}/24 dev {h.interface}", f"link set {h.interface} up",
                   f"route add default via {BRIDGE_IP}"], netns=h.netns)

    if any(p.wait() for p in keygens):
        raise RuntimeError("ssh-keygen failed")
    pubkey = (FLEET_DIR / "id_ed25519.pub").read_text()
    known = []
    for h in hosts:
        _seed_host(h, hosts, pubkey)
        hostkey = (_host_dir(h.name) / PRIVATE_DIRS["/etc/ssh"] / "ssh_host_ed25519_key.pub").read_text().split()
        known.append(f"{h.name},{h.ip} {hostkey[0]} {hostkey[1]}\n")
    _write(FLEET_DIR / "known_hosts", "".join(known))
    _write(FLEET_DIR / "ssh_config", _ssh_config(hosts))
    _write(FLEET_DIR / "bin" / "ssh", f'#!/bin/sh\nexec /usr/bin/ssh -F {shlex.quote(str(FLEET_DIR / "ssh_config"))} "$@"\n', 0o755)

    started = []
    for h in hosts:
        # `ip netns exec`, `unshare` (no --fork) and `sh -c exec` all exec: the pid is sshd's.
        with open(_host_dir(h.name) / "sshd.log", "ab") as log:
            p = subprocess.Popen(["ip", "netns", "exec", h.netns, "unshare", "--uts", "--", "sh", "-c", _sshd_script(h)],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        started.append((h, p))
    deadline = time.monotonic() + 10
    for h, p in started:
        if not _wait_port(h.ip, deadline) or p.poll() is not None:
            log = _host_dir(h.name) / "sshd.log"
            err = log.read_text() if log.exists() else ""
            raise RuntimeError(f"sshd on {h.name} did not come up: {err.strip()}")
    hosts = [Host(h.name, h.ip, h.netns, h.veth, h.interface, p.pid) for h, p in started]
    state["hosts"] = [h.__dict__ for h in hosts]
    state["sshd_start"] = {h.name: procs.start_time(h.sshd_pid) for h in hosts}
    _save(state)
    _write_inventory(hosts, state["python"])
    return load()


def _write_inventory(hosts: list[Host], python: str) -> None:
    import yaml  # only `up` and `limit` need it; `down` must run from a bare python3

    _write(FLEET_DIR / "inventory.yml",
           "# Generated by tools/fleet.py for the test fleet; removed by `fleet.py down`.\n"
           + yaml.safe_dump(_inventory(hosts, python), sort_keys=False))


def limit(host: Host | str, cpu: float | None = None, memory: int | None = None) -> Host:
    """Set the running host's CPU quota (cores) and memory limit (bytes); None: no such limit.

    Its sshd and every process in its namespace move into its group `mlxfleet/<host>`; what
    they start later stays there. Both None lifts the limits: the processes go back to the
    groups they came from and the group goes. Recorded in state.json and in the inventory's
    host vars. LimitsUnavailable when this machine cannot limit a host."""
    fleet = load()
    if fleet is None:
        raise RuntimeError("the test fleet is not up: run `fleet.py up` first")
    h = fleet.host(host)
    state = json.loads(STATE.read_text())
    wanted = Limits(cpu, memory)
    origins = state.setdefault("cgroup_origin", {})
    if wanted.unlimited:
        if not h.limits.unlimited:  # else nothing to lift, and no cgroups needed to say so
            fleet_limits.detect().release(h.name, origins.pop(h.name, {}))
    else:
        cgroups = fleet_limits.detect()
        if h.limits.unlimited:
            origins[h.name] = cgroups.origin(h.sshd_pid)
        cgroups.apply(h.name, wanted, lambda: _netns_members(h.netns))
        state["cgroup"] = cgroups.version
    for row in state["hosts"]:
        if row["name"] == h.name:
            row.update(cpu=cpu, memory=memory)
    _save(state)
    _write_inventory([Host(**row) for row in state["hosts"]], state["python"])
    return load().host(h.name)


def limits_in_force(host: Host | str) -> Limits:
    """What the host's cgroup holds now (read back from the kernel's files)."""
    fleet = load()
    state = json.loads(STATE.read_text()) if fleet else {}
    if not state.get("cgroup"):
        return Limits()
    return fleet_limits.detect().read(fleet.host(host).name)


def _save(state: dict) -> None:
    tmp = STATE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(STATE)


# ---------------------------------------------------------------- down

def down() -> None:
    """Stop the fleet's sshds, remove namespaces, veths, bridge and .fleet/. Safe to rerun."""
    try:
        state = json.loads(STATE.read_text())
    except (OSError, ValueError):
        state = {}
    targets = {}  # pid -> start time: re-checked before every signal, pids get reused
    for h in state.get("hosts", []):
        pid, start = h.get("sshd_pid", 0), state.get("sshd_start", {}).get(h["name"], -1)
        if pid and _is_ours(pid, start, str(_sshd_config_path(h["name"]))):
            targets[pid] = start
    ours = [ns for ns in _netns_list() if ns.startswith(NETNS_PREFIX)]
    # Anything else inside a fleet namespace was started through its sshd (ssh sessions, ranks
    # left running): fleet processes, which would otherwise spin on with a dead network.
    for ns in ours:
        for pid in _netns_members(ns):
            targets.setdefault(pid, procs.start_time(pid))
    _signal(targets, signal.SIGTERM)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and any(procs.alive(p) for p in targets):
        for pid in targets:
            _reap(pid)
        time.sleep(0.01)
    _signal({p: t for p, t in targets.items() if procs.alive(p)}, signal.SIGKILL)
    for pid in targets:
        _reap(pid)
    links = _run(["ip", "-o", "link", "show"], check=False).stdout
    veths = re.findall(rf"^\d+: ({re.escape(VETH_PREFIX)}[^:@]+)", links, re.M)
    batch = [f"netns del {ns}" for ns in ours] + [f"link del {v}" for v in veths]
    if re.search(rf"^\d+: {BRIDGE}[:@]", links, re.M):
        batch.append(f"link del {BRIDGE}")
    if batch:
        _ip_batch(batch, force=True)
    try:
        fleet_limits.remove_all()  # after the kill: a group with processes in it cannot go
    except OSError as e:
        print(f"fleet down: could not remove the hosts' cgroups: {e}", file=sys.stderr)
    if state.get("created_opt"):
        try:
            os.rmdir("/opt/mlx-train")  # only if still empty: never removes a real install
        except OSError:
            pass
    shutil.rmtree(FLEET_DIR, ignore_errors=True)


# ---------------------------------------------------------------- inside a host

def _host(host: Host | str) -> Host:
    if isinstance(host, Host):
        return host
    fleet = load()
    if fleet is None:
        raise RuntimeError("the test fleet is not up")
    return fleet.host(host)


def run_in(host: Host | str, argv: list[str], *, check: bool = True, timeout: float = 30,
           input: str | None = None) -> subprocess.CompletedProcess:
    """Run argv as root inside `host`: its network, hostname and (while its sshd runs) its mounts."""
    host = _host(host)
    if host.sshd_pid and procs.alive(host.sshd_pid):
        full = ["nsenter", "-t", str(host.sshd_pid), "-n", "-m", "-u", "--"] + list(argv)
    else:
        full = ["ip", "netns", "exec", host.netns] + list(argv)
    return _run(full, check=check, timeout=timeout, input=input)


def link_down(host: Host | str) -> None:
    """Cut the host's cable: both ends see no carrier until link_up()."""
    host = _host(host)
    _run(["ip", "link", "set", host.veth, "down"])


def link_up(host: Host | str) -> None:
    """Plug the cable back in."""
    host = _host(host)
    _run(["ip", "link", "set", host.veth, "up"])


def drop_packets(host: Host | str, *, peers: list[str] | None = None, per_mille: int = 1000) -> None:
    """Drop `per_mille`/1000 of the host's packets (to and from `peers`, default all) with nftables.

    1000 is a partition. Rules live in the host's namespace, so they vanish with it.
    """
    host = _host(host)
    if not 0 < per_mille <= 1000:
        raise ValueError("per_mille must be 1..1000")
    chance = "" if per_mille == 1000 else f"numgen random mod 1000 < {per_mille} "
    lines = [f"table inet {FAULT_TABLE} {{",
             "  chain input { type filter hook input priority 0; policy accept; }",
             "  chain output { type filter hook output priority 0; policy accept; }",
             "}"]
    for peer in peers or [None]:
        src = f"ip saddr {peer} " if peer else ""
        dst = f"ip daddr {peer} " if peer else ""
        lines += [f"add rule inet {FAULT_TABLE} input {src}{chance}drop",
                  f"add rule inet {FAULT_TABLE} output {dst}{chance}drop"]
    run_in(host, ["nft", "-f", "-"], input="\n".join(lines) + "\n")


def rate_limit(host: Host | str, rate: str = "1gbit") -> None:
    """Token-bucket rate limit on the host's interface (this kernel has no netem for delay)."""
    host = _host(host)
    run_in(host, ["tc", "qdisc", "replace", "dev", host.interface, "root", "tbf",
                  "rate", rate, "burst", "256kb", "latency", "50ms"])


def clear_faults(host: Host | str) -> None:
    """Undo link_down, drop_packets and rate_limit on `host`."""
    host = _host(host)
    link_up(host)
    run_in(host, ["nft", "delete", "table", "inet", FAULT_TABLE], check=False)
    run_in(host, ["tc", "qdisc", "del", "dev", host.interface, "root"], check=False)


# ---------------------------------------------------------------- provisioning

_RECAP = re.compile(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", re.M)


LOCK = "/tmp/mlx-fleet.lock"  # every user of the machine-global test fleet takes it


@contextlib.contextmanager
def held_at(rate: str, n: int = 3):
    """The fleet of `n` hosts, its links limited to tc's `rate` ("unlimited": none), for one
    measurement: the machine-wide lock held throughout (other work needs the fleet too, so a bench
    holds it one rate at a time), the limits cleared after, and the fleet brought down unless it
    was up before."""
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        was_up = status()["up"] and len(load().hosts) == n
        fl = up(n)
        try:
            for h in fl.hosts:
                if rate != "unlimited":
                    rate_limit(h, rate)
            yield fl
        finally:
            for h in fl.hosts:
                clear_faults(h)
            if not was_up:
                down()


def parse_recap(stdout: str) -> dict[str, dict[str, int]]:
    recap = {}
    tail = stdout.rsplit("PLAY RECAP", 1)[-1] if "PLAY RECAP" in stdout else ""
    for host, counters in _RECAP.findall(tail):
        recap[host] = {k: int(v) for k, v in (c.split("=") for c in counters.split())}
    return recap


def provision(fleet: Fleet, *, inventory: Path | str | None = None, extra_args: list[str] = (),
              timeout: float = 900) -> ProvisionResult:
    """Run ansible/site.yml against the fleet with the current venv's ansible-playbook."""
    playbook = Path(sys.executable).parent / "ansible-playbook"
    argv = [str(playbook), "-i", str(inventory or fleet.inventory_path), str(REPO / "ansible" / "site.yml"),
            *extra_args]
    t0 = time.monotonic()
    res = subprocess.run(argv, capture_output=True, text=True, env=fleet.ansible_env(), cwd=REPO, timeout=timeout)
    return ProvisionResult(res.returncode, res.stdout, res.stderr, time.monotonic() - t0, parse_recap(res.stdout))


def provisioned(fleet: Fleet, log=print) -> None:
    """Provision the fleet for a bench or the fault matrix; stop with Ansible's output if it fails."""
    log("provisioning")
    res = provision(fleet)
    if not res.ok:
        raise SystemExit(f"provisioning failed:\n{res.stdout[-3000:]}")
    log(f"provisioned in {res.seconds:.0f} s")


def configure(fleet: Fleet, where: Path) -> Path:
    """The cluster file `mlx-train configure --distributed` writes for the provisioned fleet, in `where`."""
    out = where / "cluster.yaml"
    subprocess.run([str(Path(sys.executable).parent / "mlx-train"), "configure", "--distributed", "--inventory",
                    str(fleet.inventory_path), "--output", str(out), "--hostfile", str(where / "hostfile.json")],
                   env=fleet.client_env(), check=True, capture_output=True, text=True, timeout=120)
    return out


def corpus(where: Path) -> Path:
    """A small text corpus every fleet host sees (they share /tmp): tools/corpus.py's, the same bytes
    on every host and at every commit."""
    return corpus_text.write(where)


# ---------------------------------------------------------------- CLI

def status() -> dict:
    fleet = load()
    if fleet is None:
        return {"up": False, "hosts": []}
    state = json.loads(STATE.read_text())
    netns = set(_netns_list())
    rows = []
    for h in fleet.hosts:
        sshd = _is_ours(h.sshd_pid, state["sshd_start"].get(h.name, -1), str(_sshd_config_path(h.name)))
        rows.append({"name": h.name, "ip": h.ip, "netns": h.netns in netns, "sshd_pid": h.sshd_pid,
                     "sshd": sshd, "link": _link_state(h.veth), "limits": fleet_limits.describe(h.limits)})
    return {"up": all(r["netns"] and r["sshd"] for r in rows), "hosts": rows,
            "inventory": str(fleet.inventory_path), "ssh_wrapper_dir": str(fleet.ssh_wrapper_dir)}


def _link_state(veth: str) -> str:
    out = _run(["ip", "-o", "link", "show", veth], check=False).stdout
    m = re.search(r"state (\S+)", out)
    return m.group(1) if m else "missing"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="bring up hosts h1..hN")
    p_up.add_argument("--hosts", type=int, default=3)
    p_up.add_argument("--cpu", help="CPU quota in cores per host, e.g. 0.5,0.5,0.125 (or one for all; none: unlimited)")
    p_up.add_argument("--memory", help="memory limit per host, e.g. 6G,6G,2G (or one for all; none: unlimited)")
    p_limit = sub.add_parser("limit", help="set or lift a running host's CPU quota and memory limit")
    p_limit.add_argument("host", help="h1..hN")
    p_limit.add_argument("--cpu", help="CPU quota in cores, e.g. 0.125 (omitted: unlimited)")
    p_limit.add_argument("--memory", help="memory limit, e.g. 2G (omitted: unlimited)")
    p_limit.add_argument("--clear", action="store_true", help="lift both limits")
    sub.add_parser("down", help="tear the fleet down (safe to rerun)")
    sub.add_parser("status", help="show the fleet")
    args = ap.parse_args(argv)
    if args.cmd == "limit":
        return _limit_cli(args)
    if args.cmd == "up":
        t0 = time.monotonic()
        try:
            fleet = up(args.hosts, fleet_limits.parse_limits(args.cpu, args.memory, args.hosts))
        except (PermissionError, FileNotFoundError, RuntimeError, OSError, ValueError) as e:
            print(f"fleet up: {e}", file=sys.stderr)
            return 1
        for h in fleet.hosts:
            print(f"{h.name}  {h.ip}  netns={h.netns}  veth={h.veth}  sshd={h.sshd_pid}  {fleet_limits.describe(h.limits)}")
        print(f"up in {time.monotonic() - t0:.2f}s; inventory {fleet.inventory_path}; "
              f"ssh: PATH={fleet.ssh_wrapper_dir}:$PATH ssh h1")
    elif args.cmd == "down":
        t0 = time.monotonic()
        down()
        print(f"fleet down in {time.monotonic() - t0:.2f}s")
    else:
        st = status()
        if not st["hosts"]:
            print("fleet: down")
            return 1
        for r in st["hosts"]:
            print(f"{r['name']}  {r['ip']}  netns={'yes' if r['netns'] else 'NO'}  "
                  f"sshd={'up' if r['sshd'] else 'DOWN'}({r['sshd_pid']})  link={r['link']}  {r['limits']}")
        return 0 if st["up"] else 1
    return 0


def _limit_cli(args) -> int:
    try:
        if args.clear and (args.cpu or args.memory):
            raise ValueError("--clear lifts both limits: give it alone, or --cpu/--memory without it")
        if not (args.clear or args.cpu or args.memory):
            raise ValueError("give --cpu and/or --memory, or --clear")
        (wanted,) = fleet_limits.parse_limits(args.cpu, args.memory, 1)
        h = limit(args.host, wanted.cpu, wanted.memory)
    except (KeyError, RuntimeError, OSError, ValueError) as e:
        print(f"fleet limit: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 1
    print(f"{h.name}: {fleet_limits.describe(h.limits)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
