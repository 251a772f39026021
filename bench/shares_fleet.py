"""Unequal hosts: tokens/s with `--shares auto` against `--shares equal` on the 3-host test fleet,
its hosts under CPU quotas (cgroups) of 0.5, 0.5 and 0.125 cores.

With equal shares every synchronous step waits for the 0.125 host; auto gives each host rows in
proportion to its measured speed. The ideal is the global batch's work over the sum of the hosts'
measured speeds (rows per second of compute, from the equal run): about 3x equal's for 4:4:1.
It leaves out the step's sync (one ring all_sum of the gradients per optimizer step, whatever the
accumulation), which no split shrinks: so each configuration also splits auto's step into the
slowest rank's compute, the sync (the quickest sync of any rank: the slowest rank arrives last and
waits for no one) and the rest, and records each host's CFS throttling (cgroup cpu.stat) over each
run. Two configurations by default: micro-batch 8 at accumulation 4 (the sync a large part of the
step on this tiny model) and accumulation 16 (the same micro-batch, the sync a quarter of the share:
what a desk user training with accumulation sees).

The fleet is machine-global: this script takes /tmp/mlx-fleet.lock itself (blocking) unless
MLX_TRAIN_FLEET_LOCKED=1 says the caller holds it, provisions the fleet without limits (Ansible
on a 0.125 host is slow), then limits the hosts, runs `equal` and `auto` interleaved, and brings the
fleet down again unless it was up before. `bench/run.py --only shares` runs it; alone:
    PYTHONPATH=$PWD/src .venv/bin/python bench/shares_fleet.py '{"rounds": 2}'
    ... '{"rounds": 1, "configs": [{"accumulation": 4, "steps": 30}]}'
    ... '{"cfs_period_us": 10000, "configs": [{"accumulation": 4, "steps": 30}], "out": "/tmp/p10.json"}'
Writes bench/shares_fleet.json (this run's figures; the top level is the first configuration's,
`configs` every one's) and prints the summary as JSON on its last line.
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
MODEL = ["--layers", "2", "--width", "64", "--heads", "2", "--seq-len", "32", "--batch-size", "8"]
# 30 steps at accumulation 16 take ~4 min at equal shares on 2 shared cores: fewer, 12 of them settled.
CONFIGS = [{"accumulation": 4, "steps": 30}, {"accumulation": 16, "steps": 24}]


def model(accumulation: int) -> list:
    return [*MODEL, "--accumulation", str(accumulation)]


def throttled(names: list) -> list:
    """Each host's CFS throttling so far (cgroup cpu.stat): periods, throttled periods, seconds held."""
    import fleet_limits  # tools/fleet_limits.py
    out = []
    for name in names:
        stat = next((d / "cpu.stat" for d in fleet_limits.detect().dirs(name) if (d / "cpu.stat").exists()), None)
        kv = dict(line.split() for line in stat.read_text().splitlines()) if stat else {}
        # v1 counts throttled_time in ns, v2 throttled_usec
        held = int(kv.get("throttled_time", 0)) / 1e9 + int(kv.get("throttled_usec", 0)) / 1e6
        out.append([int(kv.get("nr_periods", 0)), int(kv.get("nr_throttled", 0)), held])
    return out


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


def train(env: dict, cluster: Path, corpus: Path, run: Path, shares: str, steps: int, accumulation: int) -> dict:
    argv = [MLX_TRAIN, "train", "--cluster", str(cluster), "--devices", "3", *model(accumulation), "--shares", shares,
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
    comm = [statistics.fmean(m["rank_comm_s"][r] for m in steady) for r in range(n)]
    step = statistics.fmean(step_s)
    # The step split, step by step: the slowest rank's compute, then the sync (the rank that arrives
    # last waits for no one: the least of the ranks' sync times is the all_sum alone), and what is
    # left (rank 0's wait for the others beyond that, the data window, the bookkeeping).
    most = statistics.fmean(max(m["rank_compute_s"]) for m in steady)
    least = statistics.fmean(min(m["rank_comm_s"]) for m in steady)
    split = {"compute_s": most, "sync_s": least, "other_s": step - most - least}
    return {"steps": len(steady), "tokens_per_step": round(tokens), "step_s": statistics.fmean(step_s),
            "tokens_per_s": tokens * len(step_s) / sum(step_s),
            "whole_run_tokens_per_s": tokens * len(ms) / sum(m["step_time_s"] for m in ms),
            "rows_first": ms[0]["rows"], "rows_last": ms[-1]["rows"], "mean_rows": rows, "rank_compute_s": compute,
            "rank_wait_s": [statistics.fmean(m["rank_wait_s"][r] for m in steady) for r in range(n)],
            "rank_comm_s": comm, "split": split, "sync_share": split["sync_s"] / step,
            "rows_per_s": [r / c for r, c in zip(rows, compute)]}


def verdict(runs: dict, accumulation: int, steps: int) -> dict:
    """One configuration's figures over its rounds (medians; every round kept in `equal` and `auto`)."""
    ok = [(e, a) for e, a in zip(runs["equal"], runs["auto"]) if "error" not in e and "error" not in a]
    if not ok:
        return {"accumulation": accumulation, "error": "no round finished"}
    ratios = [a["tokens_per_s"] / e["tokens_per_s"] for e, a in ok]
    # The ideal: every host busy all step, the global batch's rows over the sum of the hosts' speeds
    # (each measured in the equal run, rows per second of its own compute); no sync.
    ideal = [sum(e["rows_per_s"]) * e["tokens_per_step"] / sum(e["mean_rows"]) / e["tokens_per_s"] for e, _ in ok]
    # The ideal's compute per step against auto's slowest rank's: how well the split balanced.
    balance = [sum(e["mean_rows"]) / sum(e["rows_per_s"]) / a["split"]["compute_s"] for e, a in ok]
    return {"accumulation": accumulation, "steps": steps, "model": " ".join(model(accumulation)), **runs,
            "ratios": ratios, "ideal_ratios": ideal, "of_ideal_rounds": [r / i for r, i in zip(ratios, ideal)],
            "ratio": statistics.median(ratios), "ideal_ratio": statistics.median(ideal),
            "of_ideal": statistics.median(r / i for r, i in zip(ratios, ideal)),
            "compute_of_ideal": statistics.median(balance),
            "auto_sync_share": statistics.median(a["sync_share"] for _, a in ok),
            "equal_tokens_per_s": statistics.median(e["tokens_per_s"] for e, _ in ok),
            "auto_tokens_per_s": statistics.median(a["tokens_per_s"] for _, a in ok),
            "auto_rows": ok[-1][1]["rows_last"]}


SUMMARY = ("ratio", "ideal_ratio", "of_ideal", "ratios", "of_ideal_rounds", "compute_of_ideal", "auto_sync_share",
           "equal_tokens_per_s", "auto_tokens_per_s", "auto_rows", "model", "accumulation")


def main() -> None:
    args = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    rounds = int(args.get("rounds", 2))
    # The quotas' CFS period (tools/fleet_limits.py; 10 ms): a shorter one holds a host off in shorter
    # stretches, as a slower chip would be, not for most of 100 ms at a time (docs/performance.md).
    period = int(args.get("cfs_period_us", fleet_tools.fleet_limits.PERIOD_US))
    fleet_tools.fleet_limits.PERIOD_US = period
    out = Path(args.get("out", OUT))
    one = [{"accumulation": 4, "steps": int(args.get("steps", 30))}]
    configs = args.get("configs") or (one if "steps" in args else CONFIGS)
    res = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": list(CPU), "rounds": rounds,
           "cfs_period_us": period,
           "load": [round(os.getloadavg()[0], 1)]}
    runs = [{"equal": [], "auto": []} for _ in configs]
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
            names = [h.name for h in fl.hosts]
            for i in range(rounds):
                for cfg, got in zip(configs, runs):
                    acc, steps = int(cfg["accumulation"]), int(cfg["steps"])
                    for shares in ("equal", "auto") if i % 2 == 0 else ("auto", "equal"):
                        log(f"round {i + 1}, accumulation {acc}: --shares {shares}")
                        before = throttled(names)
                        got[shares].append(train(env, cluster, corpus, work / f"run-{shares}-{acc}-{i}", shares,
                                                 steps, acc))
                        # Each host's share of its CFS periods that hit the quota, and seconds held back.
                        got[shares][-1]["throttled"] = [[(t - b) / max(p - q, 1), hs - hb] for (p, t, hs), (q, b, hb)
                                                        in zip(throttled(names), before)]
                        log(json.dumps(got[shares][-1])[:400])
        finally:
            if fleet_tools.status()["up"]:
                for h in fleet_tools.load().hosts:
                    fleet_tools.limit(h.name)
            fleet_tools.down()  # other sessions need the machine's one fleet
            shutil.rmtree(work, ignore_errors=True)
    res["load"].append(round(os.getloadavg()[0], 1))
    res["seconds"] = round(time.monotonic() - t0)
    res["configs"] = [verdict(got, int(cfg["accumulation"]), int(cfg["steps"])) for cfg, got in zip(configs, runs)]
    if "error" in res["configs"][0]:
        raise SystemExit(f"no round finished: {json.dumps(res)[-2000:]}")
    first = res["configs"][0]
    res.update({k: first[k] for k in SUMMARY}, steps=first["steps"])
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({**{k: res[k] for k in (*SUMMARY, "cpu", "date", "seconds")},
                      "configs": [{k: c[k] for k in SUMMARY if k in c} for c in res["configs"]]}))


if __name__ == "__main__":
    main()
