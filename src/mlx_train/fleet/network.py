"""`mlx-train check-network`: is the fleet fit for distributed training, and if not, what to fix.

From the controller to every host: ssh, the pinned interface and its address, the Open MPI
values in effect. From every host to every other: ssh over the nodes' key mesh, then a 2-rank
MLX ring all_sum over the pinned addresses (proves the ring ports are reachable, and measures
bandwidth); with 3+ hosts, one ring all_sum across all of them (the bus bandwidth training
sees). With --backend mpi: an all-reduce across every host, started by mpirun on the first host,
once through MLX's MPI backend and once through mpi4py (plain MPI). With --link-gbps, each
bandwidth is also given as a percentage of that link rate (nccl-tests' bus bandwidth against the
wire: an all-reduce of B bytes over n ranks cannot beat B x 2(n-1)/n / rate).

Every network operation is bounded (ssh ConnectTimeout, process timeouts, SIGALRM inside the
probes), so a dead link costs seconds.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import shlex
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from mlx_train.fleet import mpi, ssh
from mlx_train.fleet.hosts import Host, load_hosts

OK, WARN, FAIL = "ok", "warn", "FAIL"
RING_TIMEOUT_S = 15
MPI_TIMEOUT_S = 40


@dataclass
class Finding:
    check: str
    where: str
    verdict: str
    detail: str
    fix: str = ""
    # A bandwidth probe's numbers: bytes, ranks, ms (median, slowest rank), algbw/busbw in GB/s.
    figures: Dict[str, float] = field(default_factory=dict)


_HOST_PROBE = r"""
iface=$1
echo "hostname=$(hostname)"
if command -v ip >/dev/null 2>&1; then
  echo "addrs=$(ip -4 -o addr show dev "$iface" 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | tr '\n' ' ')"
else
  echo "addrs=$(ipconfig getifaddr "$iface" 2>/dev/null)"
fi
if command -v ompi_info >/dev/null 2>&1; then
  ompi_info --param btl tcp --level 9 2>/dev/null | grep -E '"btl_tcp_(links|if_include)"' | sed 's/^/mca=/'
else
  echo "mca=none"
fi
"""

# On host A: ssh to every peer over the node key mesh, fresh connections, timed. The ssh options
# come from the controller (argv[2]): one builder of ssh command lines.
MESH_CONNECT_S = 3
_MESH_PROBE = """
import json, subprocess, sys, time
out = {}
for peer in json.loads(sys.argv[1]):
    t = time.monotonic()
    try:
        p = subprocess.run(["ssh", "-T", *json.loads(sys.argv[2]), peer, "true"], capture_output=True, text=True,
                           timeout=6, stdin=subprocess.DEVNULL)
        err = p.stderr.strip().splitlines()
        out[peer] = [p.returncode, time.monotonic() - t, err[-1] if err else ""]
    except subprocess.TimeoutExpired:
        out[peer] = [124, time.monotonic() - t, "timed out after 6 s"]
print(json.dumps(out))
"""

# One rank of an all_sum probe. SIGALRM ends it even inside a blocked connect or all_sum.
_ALL_SUM = """
import json, os, signal, sys, tempfile, time
signal.alarm(int(sys.argv[1]))
size_mb, reps = float(sys.argv[2]), int(sys.argv[3])
if len(sys.argv) > 5:
    fd, path = tempfile.mkstemp(prefix="mlx-train-ring-", suffix=".json")
    os.write(fd, sys.argv[5].encode()); os.close(fd)
    os.environ["MLX_HOSTFILE"], os.environ["MLX_RANK"] = path, sys.argv[4]
import mlx.core as mx
t0 = time.monotonic()
try:
    g = mx.distributed.init(backend=sys.argv[6] if len(sys.argv) > 6 else "ring", strict=True)
finally:
    if len(sys.argv) > 5:
        os.unlink(path)
init_s = time.monotonic() - t0
mx.eval(mx.distributed.all_sum(mx.ones(16), group=g))
x = mx.ones(int(size_mb * 2**20 / 4))
mx.eval(x)
times = []
for _ in range(reps):
    t = time.monotonic()
    y = mx.distributed.all_sum(x, group=g)
    mx.eval(y)
    times.append(time.monotonic() - t)
ok = float(y[0].item()) == float(g.size())
print(json.dumps({"rank": g.rank(), "size": g.size(), "init_s": init_s, "ms": 1e3 * sorted(times)[len(times) // 2],
                  "correct": ok}))
"""


def _last_json(text: str) -> Optional[dict]:
    """The last line of `text` that is a JSON object, or None."""
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _figures(size_mb: float, ms: float, ranks: int, link_gbps: float = 0.0) -> Dict[str, float]:
    # nccl-tests' definitions (planning/perf.py has the same; fleet may not import planning).
    nbytes = size_mb * 2**20
    algbw = nbytes / (ms / 1e3) / 1e9
    busbw = algbw * 2 * (ranks - 1) / ranks
    out = {"bytes": nbytes, "ranks": ranks, "ms": ms, "algbw_gbs": algbw, "busbw_gbs": busbw}
    if link_gbps > 0:
        out["wire_pct"] = 100 * busbw * 8 / link_gbps
    return out


def _bw_text(f: Dict[str, float]) -> str:
    text = f"{f['bytes'] / 2**20:g} MB in {f['ms']:.1f} ms, busbw {f['busbw_gbs']:.2f} GB/s"
    return text + (f" = {f['wire_pct']:.0f}% of the link" if "wire_pct" in f else "")


def check_host(node: Host, backend: str) -> List[Finding]:
    res = ssh.run(node.name, f"sh -c {shlex.quote(_HOST_PROBE)} probe {shlex.quote(node.iface)}",
                  timeout=ssh.CONNECT_TIMEOUT_S + 10, fresh=True)
    if not res.ok:
        return [Finding("ssh", f"controller -> {node.name}", FAIL, res.why(),
                        f"is {node.name} on and cabled? try `ssh {node.name} true`; then rerun")]
    out = [Finding("ssh", f"controller -> {node.name}", OK, f"{res.seconds * 1e3:.0f} ms")]
    facts: Dict[str, List[str]] = {}
    for line in res.out.splitlines():
        k, _, v = line.partition("=")
        facts.setdefault(k, []).append(v.strip())
    addrs = " ".join(facts.get("addrs", [])).split()
    if node.addr in addrs:
        out.append(Finding("interface", node.name, OK, f"{node.iface} has {node.addr}"))
    else:
        have = ", ".join(addrs) or "no IPv4 address"
        out.append(Finding("interface", node.name, FAIL, f"{node.iface} has {have}, cluster file says {node.addr}",
                           "bring the interface up, or rerun `mlx-train configure --distributed` if it changed"))
    out.append(_mca_finding(node, facts.get("mca", []), backend))
    return out


def _mca_finding(node: Host, lines: List[str], backend: str) -> Finding:
    if lines == ["none"] or not lines:
        return Finding("MCA values", node.name, FAIL if backend == "mpi" else WARN, "ompi_info not found",
                       "run `make provision` (installs Open MPI)")
    values = {}
    for line in lines:
        m = re.search(r'"(btl_tcp_\w+)" \(current value: "([^"]*)", data source: ([^,]+)', line)
        if m:
            values[m.group(1)] = f"{m.group(2)} ({m.group(3)})"
    links, include = values.get("btl_tcp_links", "?"), values.get("btl_tcp_if_include", "?")
    detail = f"btl_tcp_links={links}, btl_tcp_if_include={include}"
    if links.startswith("1 (default") or node.iface not in include:
        return Finding("MCA values", node.name, WARN, detail,
                       "run `make provision`: it writes btl_tcp_links and the pinned interface to the MCA params file")
    return Finding("MCA values", node.name, OK, detail)


def check_mesh(node: Host, peers: List[Host]) -> List[Finding]:
    res = ssh.run_python(node.name, node.python, _MESH_PROBE,
                         [json.dumps([p.name for p in peers]),
                          json.dumps(ssh.options(fresh=True, connect_timeout=MESH_CONNECT_S))],
                         timeout=6 * len(peers) + 10)
    data = _last_json(res.out) if res.ok else None
    if data is None:
        return [Finding("ssh mesh", f"{node.name} -> {p.name}", FAIL, f"probe on {node.name} failed: {res.why()}",
                        "run `make provision`") for p in peers]
    out = []
    for p in peers:
        code, secs, err = data[p.name]
        if code == 0:
            out.append(Finding("ssh mesh", f"{node.name} -> {p.name}", OK, f"{secs * 1e3:.0f} ms"))
        else:
            out.append(Finding("ssh mesh", f"{node.name} -> {p.name}", FAIL, err or f"exit {code}",
                               f"check the link between {node.name} and {p.name}; `make provision` "
                               "redistributes the fleet key and host keys"))
    return out


def check_ring_pair(a: Host, b: Host, size_mb: float, link_gbps: float = 0.0) -> Finding:
    where = f"{a.name} <-> {b.name}"
    port = random.randrange(20000, 60000)
    peers = json.dumps([[f"{a.addr}:{port}"], [f"{b.addr}:{port + 1}"]])
    args = lambda rank: [str(RING_TIMEOUT_S), str(size_mb), "5", str(rank), peers]  # noqa: E731
    results = ssh.parallel(lambda x: ssh.run_python(x[0].name, x[0].python, _ALL_SUM, args(x[1]),
                                                    timeout=RING_TIMEOUT_S + 8), [(a, 0), (b, 1)])
    parsed = [_last_json(r.out) if r.ok else None for r in results]
    if not all(parsed):
        bad = [n.name for n, p in zip((a, b), parsed) if not p]
        why = "; ".join(f"{n.name}: {r.why()}" for n, r, p in zip((a, b), results, parsed) if not p)
        return Finding("ring all_sum", where, FAIL, f"{why} (ports {port}-{port + 1} on {a.addr}, {b.addr})",
                       f"check the link and any firewall on the pinned interface of {', '.join(bad)}")
    figures = _figures(size_mb, max(p["ms"] for p in parsed), 2, link_gbps)
    detail = f"{_bw_text(figures)} (init {parsed[0]['init_s']:.1f} s)"
    if not all(p["correct"] for p in parsed):
        return Finding("ring all_sum", where, FAIL, detail + ", wrong result", "check that both hosts run the same mlx",
                       figures)
    return Finding("ring all_sum", where, OK, detail, figures=figures)


def check_ring_all(nodes: List[Host], size_mb: float, link_gbps: float = 0.0) -> Finding:
    """One ring all_sum with one rank on every host: the collective training runs, at its bus bandwidth."""
    where = f"all {len(nodes)} hosts"
    port = random.randrange(20000, 60000)
    peers = json.dumps([[f"{n.addr}:{port + i}"] for i, n in enumerate(nodes)])
    args = lambda rank: [str(RING_TIMEOUT_S), str(size_mb), "5", str(rank), peers]  # noqa: E731
    results = ssh.parallel(lambda x: ssh.run_python(x[0].name, x[0].python, _ALL_SUM, args(x[1]),
                                                    timeout=RING_TIMEOUT_S + 8), [(n, r) for r, n in enumerate(nodes)])
    parsed = [_last_json(r.out) if r.ok else None for r in results]
    if not all(parsed):
        why = "; ".join(f"{n.name}: {r.why()}" for n, r, p in zip(nodes, results, parsed) if not p)
        return Finding("ring all_sum", where, FAIL, why, "fix the pairwise ring findings above first")
    figures = _figures(size_mb, max(p["ms"] for p in parsed), len(nodes), link_gbps)
    ok = all(p["correct"] for p in parsed)
    return Finding("ring all_sum", where, OK if ok else FAIL, _bw_text(figures) + ("" if ok else ", wrong result"),
                   figures=figures)


# One rank per host under mpirun: a plain MPI Allreduce through mpi4py, independent of MLX.
_MPI4PY = """
import json, signal, sys, time
signal.alarm(int(sys.argv[1]))
import numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
x = np.ones(int(float(sys.argv[2]) * 2**20 / 4), dtype=np.float32)
y = np.empty_like(x)
comm.Allreduce(x, y)
times = []
for _ in range(int(sys.argv[3])):
    t = time.monotonic()
    comm.Allreduce(x, y)
    times.append(time.monotonic() - t)
print(json.dumps({"rank": comm.rank, "ms": 1e3 * sorted(times)[len(times) // 2], "correct": bool(y[0] == comm.size),
                  "library": MPI.Get_library_version().splitlines()[0][:40]}))
"""


def _mpirun_on_first(nodes: List[Host], argv: List[str]) -> tuple:
    """Run `argv` as one rank per host, with mpirun started on the first host (the node key mesh
    and its MCA params then apply). Returns (result, per-rank JSON rows)."""
    # Untagged output: each rank prints its one JSON line at exit, in one write (stdout buffered).
    res = ssh.run(nodes[0].name, mpi.on_node([(n.name, 1) for n in nodes], argv), timeout=MPI_TIMEOUT_S)
    return res, [row for row in map(_last_json, res.out.splitlines()) if row is not None]


def check_mpi(nodes: List[Host], size_mb: float, link_gbps: float = 0.0) -> List[Finding]:
    """The MPI path two ways: MLX's own MPI backend (what training uses) and mpi4py (plain MPI)."""
    python, where = nodes[0].python, f"all hosts (mpirun on {nodes[0].name})"
    findings = []
    for what, argv, label in (
            ("mpi all_sum", [python, "-c", _ALL_SUM, str(MPI_TIMEOUT_S - 5), str(size_mb), "5", "0", "", "mpi"],
             "MLX mpi backend"),
            ("mpi4py allreduce", [python, "-c", _MPI4PY, str(MPI_TIMEOUT_S - 5), str(size_mb), "5"], "mpi4py")):
        res, rows = _mpirun_on_first(nodes, argv)
        if not res.ok or len(rows) != len(nodes):
            findings.append(Finding(what, where, FAIL, f"{res.why()} ({len(rows)}/{len(nodes)} ranks answered)",
                                    "fix the ssh mesh and ring findings above; `make provision` sets up Open MPI"))
            continue
        figures = _figures(size_mb, max(r["ms"] for r in rows), len(nodes), link_gbps)
        detail = f"{label}, {_bw_text(figures)}"
        findings.append(Finding(what, where, OK if all(r["correct"] for r in rows) else FAIL, detail, figures=figures))
    return findings


def run_checks(nodes: List[Host], backend: str = "ring", size_mb: float = 8.0,
               link_gbps: float = 0.0) -> List[Finding]:
    findings: List[Finding] = []
    per_host = ssh.parallel(lambda n: check_host(n, backend), nodes)
    reachable = [n for n, f in zip(nodes, per_host) if f[0].verdict == OK]
    for f in per_host:
        findings += f
    for mesh in ssh.parallel(lambda n: check_mesh(n, [p for p in nodes if p is not n]), reachable):
        findings += mesh
    for a, b in itertools.combinations(nodes, 2):
        if a in reachable and b in reachable:
            findings.append(check_ring_pair(a, b, size_mb, link_gbps))
        else:
            down = ", ".join(n.name for n in (a, b) if n not in reachable)
            findings.append(Finding("ring all_sum", f"{a.name} <-> {b.name}", FAIL, f"not tested: {down} unreachable",
                                    f"fix ssh to {down} first"))
    pairs_ok = all(f.verdict == OK for f in findings if f.check == "ring all_sum")
    if len(nodes) > 2 and len(reachable) == len(nodes) and pairs_ok:
        findings.append(check_ring_all(nodes, size_mb, link_gbps))
    if backend == "mpi":
        if len(reachable) == len(nodes) and len(nodes) > 1:
            findings += check_mpi(nodes, size_mb, link_gbps)
        else:
            findings.append(Finding("mpi all_sum", "all hosts", FAIL, "not tested: a host is unreachable",
                                    "fix the ssh findings first"))
    return findings


def print_findings(findings: List[Finding]) -> None:
    from rich.console import Console
    from rich.table import Table

    colour = {OK: "green", WARN: "yellow", FAIL: "red"}
    t = Table(title="check-network", title_justify="left")
    for col in ("check", "between", "verdict", "detail", "fix"):
        t.add_column(col, overflow="fold")
    for f in findings:
        t.add_row(f.check, f.where, f"[{colour[f.verdict]}]{f.verdict}[/]", f.detail, f.fix)
    Console(width=max(160, Console().width)).print(t)


def check_network(cluster_file: Optional[str] = None, backend: str = "ring", size_mb: float = 8.0,
                  link_gbps: float = 0.0) -> int:
    nodes = load_hosts(cluster_file)
    findings = run_checks(nodes, backend, size_mb, link_gbps)
    print_findings(findings)
    failed = [f for f in findings if f.verdict == FAIL]
    warned = sum(f.verdict == WARN for f in findings)
    print(f"{len(findings)} checks: {len(failed)} failed, {warned} warnings")
    return 1 if failed else 0
