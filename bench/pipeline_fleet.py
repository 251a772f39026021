"""A training pipeline's bubble and step time on the rate-limited test fleet (docs/pipeline.md).

    PYTHONPATH=$PWD/src .venv/bin/python bench/pipeline_fleet.py '{"rates": ["1gbit"]}'   # root
    python bench/pipeline_fleet.py '{"loopback": true}'  # the same on loopback, no fleet (a quick check)
    python bench/pipeline_fleet.py --table               # docs/pipeline.md's table from bench/pipeline_fleet.json

For S = 2 and 3 stages, one ring rank in each of the first S fleet hosts' network namespaces (the
fleet shares this disk and venv), every host's eth0 limited with `tc tbf` to the rate. Every rank
builds the same seeded GPT and its stage of it (rank/pipeline.py's Pipeline, as the trainer does),
then runs rounds of `steps` steps for each M (micro-batches per step) in turn, the order rotated each
round so the shared machine's drifting load falls on each alike; each block starts on a barrier.
Per (S, M): the median step time, and per stage its median idle time inside the 1F1B schedule
(StepStats.idle_s: its waits for its neighbours, transfers included) as a share of the step, the
measured bubble being the stages' mean share, against the theory (S-1)/(M+S-1). And the step time
against one host's for the same work: one process (the trainer's compiled Stepper) in h1's namespace
running the same M micro-batches per step. The fleet's hosts share this machine's cores: S stages
on 2 cores do not have S hosts' compute, so the step-time ratio is not what S real hosts would show
(their ideal, (M+S-1)/(S M), is printed beside it); the bubble is the schedule's own.
Prints one JSON line (a fleet run also writes bench/pipeline_fleet.json). The fleet lock
(/tmp/mlx-fleet.lock) is taken for one rate at a time; the limits are removed, and the fleet brought
down unless it was up, after each rate.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))  # bench/run.py imports this module from elsewhere
from ring import command_line, ranks_at  # noqa: E402

OUT = REPO / "bench" / "pipeline_fleet.json"  # the last fleet run (bench/run.py keeps it in results.json too)


def theory(stages: int, micro: int) -> float:
    return (stages - 1) / (micro + stages - 1)


def rank_main(a: dict) -> None:
    import mlx.core as mx
    import numpy as np

    from mlx_train.config import ModelConfig, OptimConfig
    from mlx_train.rank.model import build_model
    from mlx_train.rank.pipeline import Pipeline
    from mlx_train.rank.step import Stepper, make_optimizer

    stages, micros = a["stages"], a["micros"]
    cfg = ModelConfig(n_layers=a["layers"], d_model=a["width"], n_heads=a["heads"], seq_len=a["seq_len"])
    total = (a["warmup"] + a["rounds"] * a["steps"]) * len(micros)
    mx.random.seed(0)
    model, loss_fn = build_model(cfg)
    optimizer = make_optimizer(OptimConfig(), total)
    if stages > 1:
        group = mx.distributed.init(backend="ring", strict=True)
        stepper = Pipeline(model, optimizer, "fp32", 1.0, group, stages, backend="ring")
    else:  # one host doing the same work: the trainer's (compiled) one-process step
        group = None
        stepper = Stepper(model, loss_fn, optimizer, "fp32", 1.0)
    rank = group.rank() if group is not None else 0

    def batches(step, m):
        t = np.random.default_rng(step).integers(0, 256, (m, a["batch"], cfg.seq_len + 1)).astype(np.int32)
        return [(t[i, :, :-1], t[i, :, 1:]) for i in range(m)]

    def barrier():
        if group is not None:
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))

    step = 0
    for m in micros:  # tracing, the sockets' first bytes
        for _ in range(a["warmup"]):
            stepper.step(batches(step, m))
            step += 1
    times = {m: [] for m in micros}
    idle = {m: [] for m in micros}
    compute = {m: [] for m in micros}
    for rnd in range(a["rounds"]):
        for m in micros[rnd % len(micros):] + micros[:rnd % len(micros)]:
            barrier()
            for _ in range(a["steps"]):
                t0 = time.perf_counter()
                st = stepper.step(batches(step, m))
                wall = time.perf_counter() - t0
                times[m].append(wall)
                idle[m].append(st.idle_s / wall)
                compute[m].append(st.compute_s)
                step += 1
    mine = [[statistics.median(times[m]), statistics.median(idle[m]), statistics.median(compute[m])] for m in micros]
    if group is not None:
        everyone = np.array(mx.distributed.all_gather(mx.array(mine, dtype=mx.float32)[None], group=group))
    else:
        everyone = np.array([mine])
    if rank == 0:
        rows = []
        for j, m in enumerate(micros):
            shares = [float(everyone[r, j, 1]) for r in range(everyone.shape[0])]
            rows.append({"stages": stages, "micro": m, "step_s": float(everyone[0, j, 0]),
                         "stage_idle_share": shares, "stage_compute_s": [float(v) for v in everyone[:, j, 2]],
                         "bubble": sum(shares) / len(shares), "theory": theory(stages, m)})
        print(json.dumps({"rows": rows}), flush=True)


def _ranks(places, a: dict, timeout: float, what: str) -> dict:
    return ranks_at(__file__, places, a, timeout, what)


def _measure(places, a: dict, stage_counts, timeout: float, where: str) -> list:
    """The one-process baseline on the first place, then each S on the first S places."""
    rows = []
    one = _ranks(places[:1], {**a, "stages": 1}, timeout, f"one process {where}")["rows"]
    base = {r["micro"]: r["step_s"] for r in one}
    for s in stage_counts:
        for r in _ranks(places[:s], {**a, "stages": s}, timeout, f"{s} stages {where}")["rows"]:
            r["one_host_step_s"] = base[r["micro"]]
            r["x_one_host"] = r["step_s"] / base[r["micro"]]
            r["ideal_x_one_host"] = (r["micro"] + s - 1) / (s * r["micro"])
            rows.append(r)
    return rows


def main(rates=("1gbit",), loopback: bool = False, stages=(2, 3), micros=(2, 4, 8), layers: int = 6,
         width: int = 256, heads: int = 4, seq_len: int = 64, batch: int = 2, warmup: int = 2, rounds: int = 2,
         steps: int = 3, timeout: float = 600) -> dict:
    a = {"layers": layers, "width": width, "heads": heads, "seq_len": seq_len, "batch": batch, "warmup": warmup,
         "rounds": rounds, "steps": steps, "micros": list(micros)}
    out = {"model": f"gpt L{layers} D{width} T{seq_len}, micro-batch {batch}", "stages": list(stages),
           "micros": list(micros), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_before": round(os.getloadavg()[0], 1),
           "places": []}
    if loopback:
        rows = _measure([(None, "127.0.0.1")] * max(stages), a, stages, timeout, "on loopback")
        out["places"].append({"place": "ring, loopback", "rate": "unlimited", "rows": rows})
        return out
    sys.path.insert(0, str(REPO / "tools"))
    import fleet as fleet_tools  # tools/fleet.py

    for rate in rates:
        with fleet_tools.held_at(rate) as fl:  # one rate at a time: the fleet is the machine's
            rows = _measure([(h.netns, h.ip) for h in fl.hosts], a, stages, timeout, f"on the fleet at {rate}")
            out["places"].append({"place": f"ring, fleet hosts, tbf {rate}" if rate != "unlimited"
                                  else "ring, fleet hosts, no limit", "rate": rate,
                                  "load": round(os.getloadavg()[0], 1), "rows": rows})
    out["load_after"] = round(os.getloadavg()[0], 1)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    return out


def _link(rate: str) -> str:
    for unit, name in (("gbit", "Gbit/s"), ("mbit", "Mbit/s")):
        if rate.endswith(unit):
            return f"{rate[:-len(unit)]} {name}"
    return "no limit"


def table(out: dict) -> str:
    """docs/pipeline.md's "On the test fleet" table from a run's JSON."""
    lines = ["| link | S | M | bubble measured | theory (S-1)/(M+S-1) | idle share per stage | step ms | "
             "one host ms | x one host | ideal x (S real hosts) |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for place in out["places"]:
        for r in place["rows"]:
            lines.append(f"| {_link(place['rate'])} | {r['stages']} | {r['micro']} | {r['bubble']:.0%} | "
                         f"{r['theory']:.0%} | {' / '.join(f'{v:.0%}' for v in r['stage_idle_share'])} | "
                         f"{r['step_s'] * 1e3:.0f} | {r['one_host_step_s'] * 1e3:.0f} | {r['x_one_host']:.2f} | "
                         f"{r['ideal_x_one_host']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    command_line(sys.argv, rank_main, main, table, OUT)
