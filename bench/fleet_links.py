"""Gradient sync against the wire: the 3-host test fleet with its links rate-limited (`tc` tbf).

For each link rate (unlimited, then e.g. 1 Gbit/s and 200 Mbit/s on every host's eth0) and each
backend (ring, mpi):
  - check-network's all_sum probe across all hosts, with the gradient's bytes: bus bandwidth and
    its percentage of the rate;
  - a short real training run of the embedded GPT (`mlx-train train --cluster`): the trainer's own
    compute_time_s, comm_time_s and step_time_s (metrics.jsonl, medians from step 3 on), the
    sync time against the wire limit bytes x 2(n-1)/n / rate, and step / max(compute, comm).
And, ring only, bench/overlap.py's three step variants (phased, one fused graph, the fused graph
with each bucket's all_sum on a communication stream) with one rank in each host's namespace.

The fleet is machine-global: run it only under the fleet lock, e.g.
    flock /tmp/mlx-fleet.lock timeout 1500 env PYTHONPATH=$PWD/src .venv/bin/python bench/fleet_links.py
The rate limits are removed in a finally; the fleet is brought down again unless it was up before.
Appends this invocation (its arguments, machine, load and results) to bench/fleet_links.json, which is
committed, and renders every invocation kept there into bench/fleet_links.md: docs/performance.md
quotes its figures from those files, never from a run that was not kept.
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
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "bench"))
import fleet as fleet_tools  # noqa: E402  (tools/fleet.py)

PY = sys.executable
MLX_TRAIN = str(Path(PY).parent / "mlx-train")
RATE_GBPS = {"unlimited": 0.0, "10gbit": 10.0, "1gbit": 1.0, "500mbit": 0.5, "200mbit": 0.2, "100mbit": 0.1}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def set_rate(fl, rate: str) -> None:
    for h in fl.hosts:
        if rate == "unlimited":
            fleet_tools.run_in(h, ["tc", "qdisc", "del", "dev", h.interface, "root"], check=False)
        else:
            fleet_tools.rate_limit(h, rate)


def probe(nodes, backend: str, size_mb: float, gbps: float) -> dict:
    from mlx_train.fleet import network

    findings = network.check_mpi(nodes, size_mb, gbps) if backend == "mpi" else \
        [network.check_ring_all(nodes, size_mb, gbps)]
    extra = {"mpi4py": findings[1].detail} if len(findings) > 1 else {}
    f = findings[0]
    return {"verdict": f.verdict, "detail": f.detail, **f.figures, **extra}


MCA_FILE = "/etc/openmpi/openmpi-mca-params.conf"
# Open MPI's tuned collectives pick the all-reduce algorithm by message size and rank count; 4 is
# the ring (bandwidth-optimal: B x 2(n-1)/n per link), what MLX's ring backend does.
MPI_RING = "coll_tuned_use_dynamic_rules = 1\ncoll_tuned_allreduce_algorithm = 4\n"


def set_mca(fl, extra: str) -> dict:
    """Append `extra` to every host's MCA params file (in its own mount namespace); returns the
    old contents for restore_mca."""
    old = {}
    for h in fl.hosts:
        old[h.name] = fleet_tools.run_in(h, ["cat", MCA_FILE], check=False).stdout
        fleet_tools.run_in(h, ["sh", "-c", f"cat >> {MCA_FILE}"], input=extra)
    return old


def restore_mca(fl, old: dict) -> None:
    for h in fl.hosts:
        if h.name in old:
            fleet_tools.run_in(h, ["sh", "-c", f"cat > {MCA_FILE}"], input=old[h.name])


def train(env: dict, cluster: Path, corpus: Path, run: Path, backend: str, model: list, steps: int) -> dict:
    argv = [MLX_TRAIN, "train", "--cluster", str(cluster), "--backend", backend, *model, "--data", str(corpus),
            "--run-dir", str(run), "--steps", str(steps), "--log-every", "1", "--eval-every", "100000",
            "--checkpoint-every", "100000", "--no-live"]
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    if res.returncode:
        return {"error": (res.stdout + res.stderr)[-800:]}
    ms = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ms = [m for m in ms if m["step"] >= 3]  # the first steps pay for compiling and connecting
    if not ms:
        return {"error": "no metrics from step 3 on"}
    # Means, not medians: step = compute + sync holds per step, and so for means. On 2 shared cores
    # a rank's compute and its peers' waits trade places from step to step (the sync includes
    # waiting for the slowest rank), so the fastest sync is the one closest to the transfer itself.
    mean = lambda k: statistics.fmean(m[k] for m in ms)  # noqa: E731
    return {"steps": len(ms), "compute_s": mean("compute_time_s"), "comm_s": mean("comm_time_s"),
            "step_s": mean("step_time_s"), "comm_min_s": min(m["comm_time_s"] for m in ms),
            "ratio_median": statistics.median(m["step_time_s"] / max(m["compute_time_s"], m["comm_time_s"]) for m in ms),
            "grad_bytes": ms[-1]["grad_bytes"], "devices": ms[-1]["devices"],
            "tokens_per_s": statistics.fmean(m["tokens_per_s"] for m in ms)}


def show_cli(env: dict, cluster: Path, corpus: Path, run: Path, gbps: float, a) -> str:
    """The commands a user runs, with the link rate: their output as printed."""
    size_mb = f"{3492864 / 2**20:.4f}"
    cn = subprocess.run([MLX_TRAIN, "check-network", "--cluster", str(cluster), "--backend", "mpi", "--size-mb",
                         size_mb, "--link-gbps", str(gbps)], env=env, capture_output=True, text=True, timeout=300)
    tr = subprocess.run([MLX_TRAIN, "train", "--cluster", str(cluster), *a.model.split(), "--data", str(corpus),
                         "--run-dir", str(run), "--steps", "8", "--log-every", "1", "--link-gbps", str(gbps),
                         "--no-live"], env=env, capture_output=True, text=True, timeout=300)
    mon = subprocess.run([MLX_TRAIN, "monitor", str(run), "--once", "--performance"], env=env, capture_output=True,
                         text=True, timeout=60)
    return "\n".join([f"$ mlx-train check-network --backend mpi --size-mb {size_mb} --link-gbps {gbps} (exit {cn.returncode})",
                      cn.stdout[-6000:], f"$ mlx-train train ... --link-gbps {gbps} (exit {tr.returncode})",
                      tr.stdout[-300:] + tr.stderr[-300:], "$ mlx-train monitor RUN --once --performance", mon.stdout[-4000:]])


def overlap(hosts, width: int, batch: int, rounds: int, bucket_mib: int) -> dict:
    """bench/overlap.py's rank_main, one rank in each host's network namespace (shared disk and venv)."""
    from mlx_train.rank import blas

    base = 20000 + os.getpid() % 20000
    hostfile = Path(tempfile.mkstemp(prefix="mlx-train-overlap-", suffix=".json")[1])
    hostfile.write_text(json.dumps([[f"{h.ip}:{base + i}"] for i, h in enumerate(hosts)]))
    args = json.dumps({"width": width, "batch": batch, "rounds": rounds, "bucket_mib": bucket_mib})
    env = {**os.environ, **blas.rank_env(ranks_on_host=len(hosts)), "MLX_HOSTFILE": str(hostfile),
           "PYTHONPATH": str(REPO / "src")}
    procs = [subprocess.Popen(["ip", "netns", "exec", h.netns, PY, str(REPO / "bench" / "overlap.py"), "--rank", args],
                              env={**env, "MLX_RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r, h in enumerate(hosts)]
    try:
        outs = [p.communicate(timeout=400) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return {"error": "timed out"}
    finally:
        hostfile.unlink()
    if any(p.returncode for p in procs):
        return {"error": " | ".join(e[-300:] for _, e in outs)}
    return json.loads(outs[0][0].strip().splitlines()[-1])


def wire_s(nbytes: float, n: int, gbps: float) -> float:
    return nbytes * 2 * (n - 1) / n / (gbps * 1e9 / 8) if gbps else 0.0


def table(res: dict) -> str:
    from mlx_train.planning import perf

    rows = ["| link | backend | acc | probe busbw MB/s | probe % of wire | compute ms | sync ms (fastest) | step ms "
            "| step / max(compute, sync) | wire limit ms | fastest sync % of wire | tokens/s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["runs"]:
        p, t, g = r["probe"], r["train"], r["gbps"]
        pw = f"{p['wire_pct']:.0f}%" if "wire_pct" in p else "-"
        pb = f"{p['busbw_gbs'] * 1e3:.0f}" if "busbw_gbs" in p else "FAIL"
        head = f"| {r['rate']} | {r['backend']} | {r.get('accumulation', 1)} | {pb} | {pw} |"
        if "error" in t:
            rows.append(head + " failed | | | | | | |")
            continue
        limit = wire_s(t["grad_bytes"], t["devices"], g)
        rows.append(head + f" {t['compute_s'] * 1e3:.0f} | {t['comm_s'] * 1e3:.0f} ({t['comm_min_s'] * 1e3:.0f}) | "
                    f"{t['step_s'] * 1e3:.0f} | {t['step_s'] / max(t['compute_s'], t['comm_s']):.2f} | "
                    + (f"{limit * 1e3:.0f} | {100 * limit / t['comm_min_s']:.0f}%" if g else "- | -")
                    + f" | {t['tokens_per_s']:,.0f} |")
    rows += ["", "The scaling model (planning/perf.py) against these runs: measured compute + the predicted sync "
             "(the wire limit at the probe's share of the link), phased step (MLX does not overlap):", "",
             "| link | backend | acc | predicted sync ms | measured sync ms | predicted step ms | measured step ms "
             "| predicted / measured |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["runs"]:
        p, t = r["probe"], r["train"]
        if not r["gbps"] or "error" in t or not p.get("wire_pct"):
            continue
        link = perf.Link(r["rate"], r["gbps"], p["wire_pct"] / 100, 0.0)
        pred = perf.predict_step(t["compute_s"], t["grad_bytes"], t["devices"], link)
        rows.append(f"| {r['rate']} | {r['backend']} | {r.get('accumulation', 1)} | {pred.comm_s * 1e3:.0f} | "
                    f"{t['comm_s'] * 1e3:.0f} | {pred.step_s * 1e3:.0f} | {t['step_s'] * 1e3:.0f} | "
                    f"{pred.step_s / t['step_s']:.2f} |")
    if res.get("overlap"):
        rows += ["", "bench/overlap.py across the fleet (ring, one rank per host), ms per step, medians of interleaved rounds:", "",
                 "| link | phased compute | phased comm | phased step | fused | overlap (comm stream) "
                 "| overlap / max(compute, comm) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for rate, o in res["overlap"].items():
            if "error" in o:
                rows.append(f"| {rate} | failed: {o['error'][:80]} | | | | | |")
                continue
            rows.append(f"| {rate} | {o['phased_compute_ms']:.0f} | {o['phased_comm_ms']:.0f} | {o['phased_ms']:.0f} | "
                        f"{o['fused_ms']:.0f} | {o['overlap_ms']:.0f} | "
                        f"{o['overlap_ms'] / max(o['phased_compute_ms'], o['phased_comm_ms']):.2f} |")
    return "\n".join(rows)


def render(invocations: list) -> str:
    """Every kept invocation's tables, newest first, each headed by its arguments, date and load."""
    parts = ["# bench/fleet_links.py results (rendered from bench/fleet_links.json; newest first)\n"]
    for res in reversed(invocations):
        parts.append(f"## {res['date']}: `bench/fleet_links.py {' '.join(res.get('argv', []))}`\n\n"
                     f"Machine: {res['machine']}; model {res['model']}, {res['devices']} hosts, 1 rank each; "
                     f"{res['seconds']:.0f} s.\n\n{table(res)}\n")
        for rate, text in res.get("cli", {}).items():
            parts.append(f"As printed at {rate}:\n\n" + "\n".join("    " + line for line in text.splitlines()) + "\n")
    return "\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="unlimited,1gbit,200mbit")
    ap.add_argument("--backends", default="ring,mpi")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--devices", type=int, default=3, help="use the first N hosts (2: a core each on 2 cores)")
    ap.add_argument("--accumulations", default="1", help="ring runs at each of these accumulations (mpi: the first)")
    ap.add_argument("--model", default="--layers 4 --width 128 --heads 4 --seq-len 128 --batch-size 4")
    ap.add_argument("--mpi-ring", action="store_true",
                    help="also run mpi with Open MPI's ring all-reduce (coll_tuned algorithm 4) in the MCA params")
    ap.add_argument("--show-cli", action="store_true",
                    help="at each limited rate also run `check-network --link-gbps` and a `train --link-gbps` "
                         "run's `monitor --performance`, as a user would, and keep their output")
    ap.add_argument("--overlap-rounds", type=int, default=5, help="0: skip bench/overlap.py")
    ap.add_argument("--out", default=str(REPO / "bench" / "fleet_links"),
                    help="OUT.json collects every invocation (appended), OUT.md renders them all")
    a = ap.parse_args()
    if os.environ.get("MLX_TRAIN_FLEET_LOCKED") != "1" and subprocess.run(
            ["flock", "-n", "/tmp/mlx-fleet.lock", "true"]).returncode == 0:
        raise SystemExit("run under the fleet lock: flock /tmp/mlx-fleet.lock timeout 1500 ... (see the docstring)")
    rates, backends = a.rates.split(","), a.backends.split(",")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    was_up = fleet_tools.status()["up"] and len(fleet_tools.load().hosts) == 3
    log(f"fleet up (was up: {was_up})")
    fl = fleet_tools.up(3)
    work = Path(tempfile.mkdtemp(prefix="mlx-train-fleet-links-", dir="/tmp"))
    res = {"argv": sys.argv[1:], "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, load "
                      f"{os.getloadavg()[0]:.1f}", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "model": a.model, "devices": a.devices, "runs": [], "overlap": {},
           "note": "compute, sync, step: means over steps 3..N of the trainer's metrics; (fastest): the least sync"}
    try:
        fleet_tools.provisioned(fl, log)
        env = fl.client_env()
        os.environ["PATH"] = env["PATH"]  # the probes' ssh is the fleet's wrapper
        cluster, corpus = fleet_tools.configure(fl, work), fleet_tools.corpus(work / "corpus")
        from mlx_train.fleet.hosts import load_hosts

        nodes = load_hosts(str(cluster))[:a.devices]
        for rate in rates:
            gbps = RATE_GBPS[rate]
            set_rate(fl, rate)
            for backend in backends + (["mpi-ring"] if a.mpi_ring else []):
                accs = [int(k) for k in a.accumulations.split(",")]
                old_mca = set_mca(fl, MPI_RING) if backend == "mpi-ring" else {}
                backend = "mpi" if backend == "mpi-ring" else backend
                for acc in accs if backend == "ring" else accs[:1]:
                    run = work / f"run-{rate}-{backend}{'-ring' if old_mca else ''}-{acc}"
                    log(f"{rate} {backend} accumulation {acc}: training")
                    t = train(env, cluster, corpus, run, backend,
                              a.model.split() + ["--accumulation", str(acc), "--devices", str(a.devices)],
                              a.steps)
                    size_mb = t.get("grad_bytes", 3.3 * 2**20) / 2**20
                    log(f"{rate} {backend}: probe {size_mb:.2f} MB")
                    p = probe(nodes, backend, size_mb, gbps)
                    res["runs"].append({"rate": rate, "gbps": gbps, "accumulation": acc, "probe": p, "train": t,
                                        "backend": backend + (" (ring all-reduce)" if old_mca else "")})
                    log(json.dumps(res["runs"][-1])[:600])
                restore_mca(fl, old_mca)
            if a.show_cli and gbps:
                res.setdefault("cli", {})[rate] = show_cli(env, cluster, corpus, work / f"cli-{rate}", gbps, a)
                log(res["cli"][rate])
            if a.overlap_rounds and "ring" in backends:
                log(f"{rate}: overlap bench")
                width = int(a.model.split("--width")[1].split()[0]) if "--width" in a.model else 128
                res["overlap"][rate] = overlap(fl.hosts[:a.devices], width, 4, a.overlap_rounds, 1)
                log(json.dumps(res["overlap"][rate])[:400])
    finally:
        for h in fl.hosts:
            fleet_tools.clear_faults(h)
        if not was_up:
            fleet_tools.down()
        shutil.rmtree(work, ignore_errors=True)
        res["seconds"] = time.monotonic() - t0
        kept = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
        kept.setdefault("invocations", []).append(res)
        out.with_suffix(".json").write_text(json.dumps(kept, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(kept["invocations"]))
    print(render([res]))
    log(f"done in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
