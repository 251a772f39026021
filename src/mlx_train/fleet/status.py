"""Per-host status across the cluster: one ssh round trip per host, all hosts at once."""

from __future__ import annotations

from typing import Optional

from mlx_train.fleet import ssh

# Runs on each host with its own interpreter (sent on stdin): facts plus the live pid records.
_FACTS = """
import json, os, platform, sys
out = {"os": f"{platform.system()} {platform.release()} {platform.machine()}", "python": sys.executable,
       "hostname": platform.node()}
try:
    out["memory"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
except (ValueError, OSError):
    pass
try:
    import mlx.core as mx
    out["mlx"] = mx.__version__
    out["device"] = str(mx.device_info().get("device_name") or mx.default_device())
except Exception as exc:
    out["mlx"] = f"not importable ({exc.__class__.__name__})"
try:
    from mlx_train.rank import pidrecords
    out["ranks"] = [{"run_id": r["run_id"], "rank": r["rank"], "pid": r["pid"]} for r in pidrecords.records() if r["alive"]]
except Exception as exc:
    out["ranks_error"] = str(exc)
print(json.dumps(out))
"""


def host_facts(name: str, python: str) -> dict:
    facts, why = ssh.probe(name, python, _FACTS)
    return {"reachable": True, **facts} if facts is not None else {"reachable": False, "why": why}


def _ranks(facts: dict) -> str:
    if "ranks_error" in facts:
        return f"unknown ({facts['ranks_error']})"
    runs: dict = {}
    for r in facts.get("ranks", []):
        runs.setdefault(r["run_id"], []).append(str(r["rank"]))
    return "; ".join(f"{run}: rank {','.join(ranks)}" for run, ranks in runs.items()) or "none"


def print_fleet_status(console, cluster_file: Optional[str]) -> int:
    from rich.table import Table

    from mlx_train.fleet.hosts import configured, load_cluster
    from mlx_train.units import human

    if cluster_file is None and configured() is None:
        console.print("cluster: none configured (mlx-train configure --distributed)")
        return 0
    cluster = load_cluster(cluster_file)
    path, hosts = cluster.path, cluster.hosts
    facts = ssh.parallel(lambda h: host_facts(h.name, h.python), hosts)
    t = Table(title=f"cluster ({path})", title_justify="left")
    for col in ("host", "reachable", "OS", "mlx", "python", "memory", "device", "running ranks"):
        t.add_column(col)
    down = 0
    for h, f in zip(hosts, facts):
        if not f["reachable"]:
            down += 1
            t.add_row(h.name, f"[red]no[/] ({f['why']})", "-", "-", h.python, "-", "-", "-")
            continue
        t.add_row(h.name, "[green]yes[/]", f["os"], f.get("mlx", "?"), f["python"],
                  human(f["memory"]) if "memory" in f else "?", f.get("device", "?"), _ranks(f))
    console.print(t)
    if down:
        console.print(f"{down} host(s) unreachable: `mlx-train check-network` says why")
    return 0
