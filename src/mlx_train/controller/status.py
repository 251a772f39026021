"""`mlx-train status`: this device, the runs in progress here, and (with a cluster file) every host."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from rich.console import Console
from rich.table import Table

from mlx_train.events import Event
from mlx_train.rank import pidrecords
from mlx_train.units import human
from mlx_train.rundir import RUNS_ROOT, RunDir


def system_memory() -> int:
    """Physical memory in bytes (sysconf works on Linux and macOS)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def rank_blas() -> str:
    """The BLAS a rank on this host ends up with, asked of a real worker-like process."""
    code = ("import os,sys\nfrom mlx_train.rank import blas\n"
            "if blas.needs_reexec(): os.execve(sys.executable,[sys.executable,'-c',sys.argv[1]],"
            "{**os.environ,**blas.rank_env(1)})\n"
            "import mlx.core as mx; a=mx.ones((64,64)); mx.eval(a@a); print(blas.in_use())")
    out = subprocess.run([sys.executable, "-c", code, code], capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or f"unknown ({out.stderr.strip()[-120:]})"


def device_facts() -> Dict[str, str]:
    import mlx.core as mx

    info = mx.device_info()
    facts = {"host": platform.node(), "os": f"{platform.system()} {platform.release()} {platform.machine()}",
             "python": sys.executable, "mlx": mx.__version__, "device": str(info.get("device_name", "?")),
             "system memory": human(system_memory())}
    if "max_recommended_working_set_size" in info:
        facts["GPU working set"] = human(info["max_recommended_working_set_size"])
    facts["BLAS (ranks)"] = rank_blas()
    return facts


def runs_in_progress(root: Path = RUNS_ROOT) -> List[dict]:
    """Runs with live ranks here, and runs that did not end but whose supervisor is gone (killed,
    a lost terminal, a reboot): those wait for `train --resume`."""
    by_run: Dict[str, dict] = {}
    for rec in pidrecords.records():
        run = by_run.setdefault(rec["run_dir"], {"run_id": rec["run_id"], "run_dir": rec["run_dir"], "ranks": []})
        if rec["alive"]:
            run["ranks"].append(rec["rank"])
    for d in (p for p in root.glob("*/") if (p / ".lock").is_file()) if root.is_dir() else []:
        by_run.setdefault(str(d), {"run_id": d.name, "run_dir": str(d), "ranks": []})
    runs = []
    for run in by_run.values():
        rd = RunDir(run["run_dir"])
        supervised = rd.supervised()
        if not run["ranks"] and (supervised or not rd.path.is_dir() or rd.ended() or rd.supervisor() is None):
            continue
        metrics = rd.metrics() if rd.path.is_dir() else []
        run["step"] = metrics[-1]["step"] if metrics else 0
        pid = rd.supervisor()
        run["supervisor"] = f"pid {pid}" if supervised else f"gone (pid {pid}): train --resume {rd.path}" \
            if pid else "?"
        runs.append(run)
    return runs


def measured_speeds(launch: Optional[dict], metrics: List[dict]) -> Dict[str, float]:
    """Each host's measured speed, rows per second per rank, from a run's newest metrics line that has
    every rank's rows and compute time (`rows` / `rank_compute_s`; the mean over the host's ranks) and
    the launch that placed the ranks ({} when the run recorded neither)."""
    line = next((m for m in reversed(metrics) if m.get("rows") and m.get("rank_compute_s")), None)
    if launch is None or line is None:
        return {}
    by_host: Dict[str, List[float]] = {}
    for r in launch.get("ranks", []):
        rank, host = r["rank"], r["host"]
        if rank < len(line["rows"]) and rank < len(line["rank_compute_s"]) and line["rank_compute_s"][rank] > 0:
            by_host.setdefault(host, []).append(line["rows"][rank] / line["rank_compute_s"][rank])
    return {host: sum(v) / len(v) for host, v in by_host.items()}


def newest_measured(runs: List[dict], root: Path = RUNS_ROOT) -> Tuple[Optional[str], Dict[str, float]]:
    """(run dir, its hosts' measured speeds) of the newest run with speeds: those in progress here
    first, then the newest under `root`."""
    dirs = [Path(r["run_dir"]) for r in runs]
    if root.is_dir():
        done = [p for p in root.glob("*/metrics.jsonl")]
        dirs += [p.parent for p in sorted(done, key=lambda p: p.stat().st_mtime, reverse=True)[:5]]
    for d in dirs:
        rd = RunDir(d)
        launched = rd.events(Event.LAUNCH) if rd.path.is_dir() else []
        speeds = measured_speeds(launched[-1] if launched else None, rd.metrics() if rd.path.is_dir() else [])
        if speeds:
            return str(d), speeds
    return None, {}


def speed_rows(hosts: List, measured: Dict[str, float]) -> List[Tuple[str, str, str, str]]:
    """Per host: (name, cores it may use, the cluster file's speed, the run's measured speed), '-' where
    none. A local host's ranks report the machine's own name, so a lone localhost takes the only one."""
    rows = []
    for h in hosts:
        seen = measured.get(h.name)
        if seen is None and h.name == "localhost" and len(measured) == 1 and len(hosts) == 1:
            seen = next(iter(measured.values()))
        rows.append((h.name, f"{h.cpus:g}" if h.cpus else "-", f"{h.speed:.1f}" if h.speed else "-",
                     f"{seen:.1f}" if seen is not None else "-"))
    return rows


def print_speeds(console: Console, cluster_file: Optional[str], runs: List[dict]) -> None:
    """The table of each host's speed: what the planner leaves a host too slow to help out by."""
    from mlx_train.fleet.hosts import configured, load_cluster

    if cluster_file is None and configured() is None:
        return
    where, measured = newest_measured(runs)
    t = Table(title="host speeds (rows per second per rank)" + (f", measured in {where}" if where else ""),
              title_justify="left")
    for col in ("host", "cpus", "speed (cluster file)", "measured"):
        t.add_column(col)
    for row in speed_rows(load_cluster(cluster_file).hosts, measured):
        t.add_row(*row)
    console.print(t)


def status(cluster_file: Optional[str] = None, local_only: bool = False) -> int:
    # Piped or logged: wide enough that host rows and run ids are not folded.
    console = Console(width=None if Console().is_terminal else 200)
    t = Table(title="this device", show_header=False, title_justify="left")
    for k, v in device_facts().items():
        t.add_row(k, v)
    console.print(t)
    runs = runs_in_progress()
    t = Table(title="runs in progress here", title_justify="left")
    for col in ("run", "live ranks", "last step", "supervisor", "run dir"):
        t.add_column(col)
    for r in runs:
        t.add_row(r["run_id"], ",".join(map(str, sorted(r["ranks"]))) or "none", str(r["step"]), r["supervisor"],
                  r["run_dir"])
    console.print(t if runs else "runs in progress here: none")
    if not local_only:
        from mlx_train.fleet.status import print_fleet_status

        code = print_fleet_status(console, cluster_file)
        print_speeds(console, cluster_file, runs)
        return code
    return 0


if __name__ == "__main__":
    print(json.dumps(device_facts()))
