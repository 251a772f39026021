"""Reduce-scatter where the backend lacks sum_scatter: the "ring" strategy (N - 1 rounds of send to
r + 1 / recv from r - 1) against "all_sum" (one all-reduce, keep one's slice), each against the wire.

For each world size (2, 3), backend and buffer size (1, 4, 16 MiB of float32), interleaved rounds
time three things on rank 0: one all_sum of the buffer (the yardstick), and reduce_scatter with
each strategy. Reported per strategy: ms per call; wire Gbit/s, the (N - 1)/N x size bytes a
rank must move at the least over that time (against a link's rate: how much of the wire it
uses); and x all_sum, its time over the all_sum's in the same run.

Places: the ring backend on loopback (ranks started directly, as bench/ring.py), MPI on loopback
over TCP (OMPI_MCA_btl=self,tcp: the wire, not shared memory) when mpirun is here, and with
--fleet RATE[,RATE] the ring backend on the 3-host test fleet, each host's eth0 rate-limited with
tc tbf. The fleet is machine-global: run that only under its lock, e.g.
    flock /tmp/mlx-fleet.lock env PYTHONPATH=$PWD/src .venv/bin/python bench/reduce_scatter.py --fleet 1gbit
The limits are removed afterwards; the fleet is brought down again unless it was up before.
Prints a table; writes bench/reduce_scatter.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))  # bench/run.py imports this module from elsewhere
from ring import rank0_result, rank_env  # noqa: E402
MIB = 1 << 20
STRATEGIES = ("ring", "all_sum")


def rank_main(backend: str, sizes_mib: list, rounds: int, reps: int) -> None:
    import mlx.core as mx

    from mlx_train.rank.collectives import padded_length, reduce_scatter

    group = mx.distributed.init(backend=backend, strict=True)
    n = group.size()
    out = []
    for mib in sizes_mib:
        x = mx.random.normal((padded_length(mib * MIB // 4, n),), key=mx.random.key(group.rank()))
        mx.eval(x)
        fns = {"all_sum (yardstick)": lambda: mx.eval(mx.distributed.all_sum(x, group=group))}
        for how in STRATEGIES:
            fns[how] = lambda how=how: mx.eval(reduce_scatter(x, group, how, backend=backend))
        barrier = lambda: mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # noqa: E731
        times = {k: [] for k in fns}
        for fn in fns.values():  # warm up: allocator, connections
            fn()
        for _ in range(rounds):  # interleaved: the machine's noise hits each alike
            for k, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                barrier()  # the block ends when every rank's has: a ring lets a rank run ahead
                times[k].append((time.perf_counter() - t0) / reps)
        base = statistics.median(times["all_sum (yardstick)"])
        for k, ts in times.items():
            s = statistics.median(ts)
            out.append({"ranks": n, "mib": mib, "what": k, "ms": s * 1e3,
                        "wire_gbps": (n - 1) / n * mib * MIB * 8 / s / 1e9, "x_all_sum": s / base})
    if group.rank() == 0:
        print(json.dumps(out))


def _rank_cmd(backend: str, sizes, rounds: int, reps: int) -> list:
    return [sys.executable, __file__, "--rank", json.dumps({"backend": backend, "sizes_mib": sizes,
                                                            "rounds": rounds, "reps": reps})]




def loopback_ring(n: int, sizes, rounds: int, reps: int, timeout: float) -> list:
    from ring import ring_hostfile

    hostfile = ring_hostfile(n)
    env = rank_env(n)
    try:
        procs = [subprocess.Popen(_rank_cmd("ring", sizes, rounds, reps), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env={**env, "MLX_RANK": str(r), "MLX_HOSTFILE": hostfile}) for r in range(n)]
        return rank0_result(procs, timeout, f"ring x{n} on loopback")
    finally:
        os.unlink(hostfile)


def loopback_mpi(n: int, sizes, rounds: int, reps: int, timeout: float) -> list:
    from mlx_train.fleet import mpi

    env = {**mpi.env_here(), "OMPI_MCA_btl": "self,tcp", "PYTHONPATH": str(REPO / "src")}
    argv = ["mpirun", "--oversubscribe", "-np", str(n), *mpi.forward(env), *_rank_cmd("mpi", sizes, rounds, reps)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**rank_env(n), **env})
    return rank0_result([proc], timeout, f"mpi x{n} on loopback")


def fleet_ring(hosts, sizes, rounds: int, reps: int, timeout: float) -> list:
    """One ring rank in each of `hosts`' network namespaces (the fleet shares this disk and venv)."""
    base = 20000 + os.getpid() % 20000
    fd, hostfile = tempfile.mkstemp(prefix="mlx-train-rs-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump([[f"{h.ip}:{base + i}"] for i, h in enumerate(hosts)], fh)
    env = {**rank_env(len(hosts)), "MLX_HOSTFILE": hostfile}
    try:
        procs = [subprocess.Popen(["ip", "netns", "exec", h.netns, *_rank_cmd("ring", sizes, rounds, reps)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**env, "MLX_RANK": str(r)}) for r, h in enumerate(hosts)]
        return rank0_result(procs, timeout, f"ring x{len(hosts)} on the fleet")
    finally:
        os.unlink(hostfile)


def on_fleet(rates, sizes, rounds: int, reps: int, timeout: float) -> list:
    sys.path.insert(0, str(REPO / "tools"))
    import fleet as fleet_tools  # tools/fleet.py

    if subprocess.run(["flock", "-n", "/tmp/mlx-fleet.lock", "true"]).returncode == 0:
        raise SystemExit("--fleet: run under the fleet lock: flock /tmp/mlx-fleet.lock ... (see the docstring)")
    was_up = fleet_tools.status()["up"] and len(fleet_tools.load().hosts) == 3
    fl = fleet_tools.up(3)
    rows = []
    try:
        for rate in rates:
            for h in fl.hosts:
                fleet_tools.rate_limit(h, rate)
            for n in (2, 3):
                for row in fleet_ring(fl.hosts[:n], sizes, rounds, reps, timeout):
                    rows.append({**row, "place": f"ring, fleet, tbf {rate}"})
    finally:
        for h in fl.hosts:
            fleet_tools.clear_faults(h)
        if not was_up:
            fleet_tools.down()
    return rows


def table(rows: list) -> str:
    lines = ["| place | ranks | MiB | what | ms | wire Gbit/s | x all_sum |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['place']} | {r['ranks']} | {r['mib']} | {r['what']} | {r['ms']:.1f} | "
                     f"{r['wire_gbps']:.2f} | {r['x_all_sum']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,4,16", help="buffer sizes, MiB")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-mpi", action="store_true")
    ap.add_argument("--fleet", default="", help="also on the test fleet at these tbf rates (e.g. 1gbit,200mbit)")
    ap.add_argument("--no-loopback", action="store_true", help="only the fleet (with --fleet)")
    ap.add_argument("--append", action="store_true", help="keep the rows already in --out of places not run now")
    ap.add_argument("--out", default=str(REPO / "bench" / "reduce_scatter.json"))
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    timeout = 600
    rows = []
    for n in (2, 3) if not a.no_loopback else ():
        rows += [{**r, "place": "ring, loopback"} for r in loopback_ring(n, sizes, a.rounds, a.reps, timeout)]
    if not (a.no_mpi or a.no_loopback) and shutil.which("mpirun"):
        for n in (2, 3):
            rows += [{**r, "place": "mpi (tcp), loopback"} for r in loopback_mpi(n, sizes, a.rounds, a.reps, timeout)]
    if a.fleet:
        rows += on_fleet(a.fleet.split(","), sizes, a.rounds, a.reps, timeout)
    runs = [{"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, load "
                        f"{os.getloadavg()[0]:.1f}", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "places": sorted({r["place"] for r in rows})}]
    if a.append and Path(a.out).exists():
        old = json.loads(Path(a.out).read_text())
        rows = [r for r in old["rows"] if r["place"] not in runs[0]["places"]] + rows
        runs = old["runs"] + runs
    print(table(rows))
    Path(a.out).write_text(json.dumps({
        "runs": runs,
        "note": "medians of interleaved rounds on rank 0; wire_gbps: Gbit/s of (N-1)/N x size over the time; "
                "x all_sum: the time over one all_sum of the whole buffer in the same run",
        "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--rank":
        rank_main(**json.loads(sys.argv[2]))
    else:
        sys.exit(main())
