"""Unequal hosts: tokens/s with `--shares auto` against `--shares equal` on the 3-host test fleet,
its hosts under CPU quotas (cgroups) of 0.5, 0.5 and 0.125 cores.

With equal shares every synchronous step waits for the 0.125 host; auto gives each host rows in
proportion to its measured speed. The ideal is the global batch's work over the sum of the hosts'
measured speeds (rows per second of compute, from the equal run): about 3x equal's for 4:4:1.

The fleet is machine-global: this script takes /tmp/mlx-fleet.lock itself (blocking) unless
MLX_TRAIN_FLEET_LOCKED=1 says the caller holds it, provisions the fleet without limits (Ansible
on a 0.125 host is slow), then limits the hosts, runs `equal` and `auto` interleaved, and brings the
fleet down again unless it was up before. `bench/run.py --only shares` runs it; alone:
    PYTHONPATH=$PWD/src .venv/bin/python bench/shares_fleet.py '{"rounds": 1}'
Writes bench/shares_fleet.json (this run's figures) and prints them as JSON on its last line.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import fleet as fleet_tools  # noqa: E402  (tools/fleet.py)

PY = sys.executable
MLX_TRAIN = str(Path(PY).parent / "mlx-train")
OUT = REPO / "bench" / "shares_fleet.json"
CPU = (0.5, 0.5, 0.125)
MODEL = ["--layers", "2", "--width", "64", "--heads", "2", "--seq-len", "32", "--batch-size", "8", "--accumulation", "4"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextmanager
def fleet_lock():
    if os.environ.get("MLX_TRAIN_FLEET_LOCKED") == "1":
        yield
        return
    with open("/tmp/mlx-fleet.lock", "a") as fh:
        log("waiting for the fleet lock")
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def train(env: dict, cluster: Path, corpus: Path, run: Path, shares: str, steps: int) -> dict:
    argv = [MLX_TRAIN, "train", "--cluster", str(cluster), "--devices", "3", *MODEL, "--shares", shares,
            "--data", str(corpus), "--run-dir", str(run), "--steps", str(steps), "--log-every", "1",
            "--eval-every", "100000", "--checkpoint-every", "100000", "--no-live"]
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    if res.returncode:
        return {"error": (res.stdout + res.stderr)[-800:]}
    return summarize([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()])


def summarize(ms: list, settled: int = 12) -> dict:
    """Figures over the steps from `settled` on: auto has measured and re-shared by then (its first
    gather is after step 10, step 11 traces the new shapes); equal is measured over the same steps."""
    steady = [m for m in ms if m["step"] >= settled]
    tokens = steady[0]["tokens_per_s"] * steady[0]["step_time_s"]  # one step per record (--log-every 1)
    step_s = [m["step_time_s"] for m in steady]
    n = len(steady[0]["rows"])
    rows = [statistics.fmean(m["rows"][r] for m in steady) for r in range(n)]
    compute = [statistics.fmean(m["rank_compute_s"][r] for m in steady) for r in range(n)]
    return {"steps": len(steady), "tokens_per_step": round(tokens), "step_s": statistics.fmean(step_s),
            "tokens_per_s": tokens * len(step_s) / sum(step_s),
            "whole_run_tokens_per_s": tokens * len(ms) / sum(m["step_time_s"] for m in ms),
            "rows_first": ms[0]["rows"], "rows_last": ms[-1]["rows"], "mean_rows": rows, "rank_compute_s": compute,
            "rank_wait_s": [statistics.fmean(m["rank_wait_s"][r] for m in steady) for r in range(n)],
            "rows_per_s": [r / c for r, c in zip(rows, compute)]}


def main() -> None:
    args = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    rounds, steps = int(args.get("rounds", 1)), int(args.get("steps", 30))
    res = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": list(CPU), "model": " ".join(MODEL),
           "steps": steps, "load": [round(os.getloadavg()[0], 1)], "equal": [], "auto": []}
    with fleet_lock():
        t0 = time.monotonic()  # the locked stretch, not the wait for the lock
        work = Path(tempfile.mkdtemp(prefix="mlx-train-shares-", dir="/tmp"))
        try:
            fl = fleet_tools.up(3)  # unlimited while Ansible provisions it
            for h in fl.hosts:
                fleet_tools.limit(h.name)
            fleet_tools.provisioned(fl, log)
            env = fl.client_env()
            cluster, corpus = fleet_tools.configure(fl, work), fleet_tools.corpus(work / "corpus")
            for h, cpu in zip(fl.hosts, CPU):
                fleet_tools.limit(h.name, cpu=cpu)
            for i in range(rounds):
                for shares in ("equal", "auto") if i % 2 == 0 else ("auto", "equal"):
                    log(f"round {i + 1}: --shares {shares}")
                    res[shares].append(train(env, cluster, corpus, work / f"run-{shares}-{i}", shares, steps))
                    log(json.dumps(res[shares][-1])[:400])
        finally:
            if fleet_tools.status()["up"]:
                for h in fleet_tools.load().hosts:
                    fleet_tools.limit(h.name)
            fleet_tools.down()  # other sessions need the machine's one fleet
            shutil.rmtree(work, ignore_errors=True)
    res["load"].append(round(os.getloadavg()[0], 1))
    res["seconds"] = round(time.monotonic() - t0)
    ok = [(e, a) for e, a in zip(res["equal"], res["auto"]) if "error" not in e and "error" not in a]
    if not ok:
        raise SystemExit(f"no round finished: {json.dumps(res)[-2000:]}")
    ratios = [a["tokens_per_s"] / e["tokens_per_s"] for e, a in ok]
    # The ideal: every host busy all step, the global batch's rows over the sum of the hosts' speeds
    # (each measured in the equal run, rows per second of its own compute).
    ideal = [sum(e["rows_per_s"]) * e["tokens_per_step"] / sum(e["mean_rows"]) / e["tokens_per_s"] for e, _ in ok]
    res.update(ratio=statistics.median(ratios), ideal_ratio=statistics.median(ideal),
               of_ideal=statistics.median(r / i for r, i in zip(ratios, ideal)),
               equal_tokens_per_s=statistics.median(e["tokens_per_s"] for e, _ in ok),
               auto_tokens_per_s=statistics.median(a["tokens_per_s"] for _, a in ok),
               auto_rows=ok[-1][1]["rows_last"])
    OUT.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("ratio", "ideal_ratio", "of_ideal", "equal_tokens_per_s", "auto_tokens_per_s",
                                          "auto_rows", "cpu", "model", "date", "seconds")}))


if __name__ == "__main__":
    main()
