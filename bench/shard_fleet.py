"""Step time and bytes on the wire of each shard level against data parallel, on the rate-limited test fleet.

    PYTHONPATH=$PWD/src .venv/bin/python bench/shard_fleet.py '{"rates": ["unlimited", "1gbit"]}'   # root
    python bench/shard_fleet.py '{"loopback": 3}'     # the same on loopback, no fleet (a quick check)
    python bench/shard_fleet.py --table               # docs/sharding.md's table from bench/shard_fleet.json

One ring rank in each of the 3 fleet hosts' network namespaces (the fleet shares this disk and venv),
every host's eth0 limited with `tc tbf` to each rate in turn ("unlimited": the veths as they are,
what the levels cost besides the wire). The fleet lock (/tmp/mlx-fleet.lock) is taken for one rate
at a time, so other users of the fleet wait minutes, not the whole bench. Every rank builds the
same seeded GPT once per level (rank/spread.py's Stepper, as the trainer does: the trainer's all_sum bucket size,
one lane), traces each with a few steps, then runs rounds of `steps` steps per level, the levels'
blocks interleaved (the order rotated each round) so that the shared machine's drifting load falls on
each alike; each block starts on a barrier. Per level, rank 0 reports the median step time and its
compute / communication split (StepStats: at `full` the gathers and reduce-scatter run inside the
forward and backward, so they count as compute), the level's own byte counts (Spread's
`scattered_bytes`, `gathered_bytes`) and the bytes its interface sent and received per step
(/proc/net/dev in its namespace: headers included, well under 1% with the veth's segmentation
offload), against
ZeRO's formulas per rank: data parallel's all-reduce sends 2(N-1)/N x the gradient bytes, the
`optimizer` and `gradients` levels the same, `full` 1.5x that; and against what this code's way
of moving them sends (`built_bytes`: at `optimizer` and `gradients` a ring reduce-scatter and an
all-gather, (N-1)/N of the buffer each; at `full` the reduce-scatter inside the backward is a ring's, or
an all_sum's twice that where fullshard.scatter_of picks the all_sum).
Prints one JSON line (rank 0's rows and the run's facts; a fleet run also writes it to
bench/shard_fleet.json); the limits are removed, and the fleet brought down unless it was up,
after each rate.
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
OUT = REPO / "bench" / "shard_fleet.json"  # the last fleet run (bench/run.py keeps it in results.json too)
LEVELS = ("none", "optimizer", "gradients", "full")
# ZeRO (arXiv 1910.02054, section 7): bytes each rank sends per step, in units of data parallel's.
ZERO_TRAFFIC = {"none": 1.0, "optimizer": 1.0, "gradients": 1.0, "full": 1.5}
GOALS = {"optimizer": 1.05, "gradients": 1.05, "full": 1.6}  # issue 17: step time / data parallel's


def _iface_bytes(iface: str) -> tuple:
    """(sent, received) bytes of `iface` in this process's network namespace."""
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, data = line.split(":", 1)
        if name.strip() == iface:
            f = data.split()
            return int(f[8]), int(f[0])
    return 0, 0


def rank_main(a: dict) -> None:
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from mlx_train.config import ModelConfig, OptimConfig
    from mlx_train.rank.model import build_model
    from mlx_train.rank.step import Stepper, all_sum_bytes, make_optimizer

    group = mx.distributed.init(backend="ring", strict=True)
    n, r = group.size(), group.rank()
    cfg = ModelConfig(n_layers=a["layers"], d_model=a["width"], n_heads=a["heads"], seq_len=a["seq_len"])
    levels = a["levels"]
    steps_total = a["warmup"] + a["rounds"] * a["steps"]

    def batch(step):
        t = np.random.default_rng(step * n + r).integers(0, 256, (a["batch"], cfg.seq_len + 1)).astype(np.int32)
        return [(t[:, :-1], t[:, 1:])]

    def stepper(level):
        mx.random.seed(0)
        model, loss_fn = build_model(cfg)
        grad_bytes = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
        return grad_bytes, Stepper(model, loss_fn, make_optimizer(OptimConfig(), steps_total), "fp32", 1.0, group,
                                   bucket_bytes=all_sum_bytes("ring", n, os.cpu_count() or 1, grad_bytes),
                                   shard=level, backend="ring")

    def barrier():
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))

    built = {level: stepper(level) for level in levels}
    grad_bytes = built[levels[0]][0]
    steppers = {level: s for level, (_, s) in built.items()}
    for level, s in steppers.items():  # tracing, compilation, the sockets' first bytes
        for step in range(a["warmup"]):
            s.step(batch(step))
    times = {level: [] for level in levels}
    split = {level: [] for level in levels}
    sent = {level: 0 for level in levels}
    received = {level: 0 for level in levels}
    step = a["warmup"]
    for rnd in range(a["rounds"]):
        order = levels[rnd % len(levels):] + levels[:rnd % len(levels)]
        for level in order:
            s = steppers[level]
            barrier()
            tx0, rx0 = _iface_bytes(a["iface"])
            for k in range(a["steps"]):
                t0 = time.perf_counter()
                st = s.step(batch(step + k))
                times[level].append(time.perf_counter() - t0)
                split[level].append((st.compute_s, st.comm_s))
            tx1, rx1 = _iface_bytes(a["iface"])
            sent[level] += tx1 - tx0
            received[level] += rx1 - rx0
        step += a["steps"]
    base = statistics.median(times["none"])
    dp_bytes = 2 * (n - 1) / n * grad_bytes
    share = (n - 1) / n  # of a buffer that a rank sends in a ring all-gather or reduce-scatter

    def built(sp) -> float:
        """What rank/spread.py and rank/fullshard.py send per step: an all_sum 2 x share of its
        buffer, a ring reduce-scatter or an all-gather 1 x share."""
        allreduce = dp_bytes if sp.level == "none" else 0.0
        all_sum = getattr(sp, "scatter", None) == "all_sum"  # full's backward by all_sum: twice a ring's bytes
        return allreduce + share * sp.gathered_bytes + (2 if all_sum else 1) * share * sp.scattered_bytes
    rows = []
    for level in levels:
        s, count = steppers[level], len(times[level])
        med = statistics.median(times[level])
        q = statistics.quantiles(times[level], n=4)
        rows.append({"level": level, "step_s": med, "x_none": med / base, "step_s_quartiles": [q[0], q[2]],
                     "compute_s": statistics.median(c for c, _ in split[level]),
                     "comm_s": statistics.median(c for _, c in split[level]),
                     "steps": count, "scattered_bytes": s.spread.scattered_bytes,
                     "gathered_bytes": s.spread.gathered_bytes,
                     "sent_bytes_per_step": sent[level] / count, "received_bytes_per_step": received[level] / count,
                     "zero_bytes": ZERO_TRAFFIC[level] * dp_bytes,
                     "sent_x_zero": sent[level] / count / (ZERO_TRAFFIC[level] * dp_bytes),
                     "built_bytes": built(s.spread), "sent_x_built": sent[level] / count / built(s.spread)})
    if r == 0:
        print(json.dumps({"ranks": n, "grad_bytes": grad_bytes, "params": grad_bytes // 4, "rows": rows}), flush=True)




def _ranks(places, a: dict, timeout: float, what: str) -> dict:
    return ranks_at(__file__, places, a, timeout, what)


def main(rates=("1gbit",), loopback: int = 0, layers: int = 4, width: int = 256, heads: int = 4, seq_len: int = 64,
         batch: int = 1, warmup: int = 3, rounds: int = 4, steps: int = 3, levels=LEVELS, timeout: float = 900) -> dict:
    a = {"layers": layers, "width": width, "heads": heads, "seq_len": seq_len, "batch": batch, "warmup": warmup,
         "rounds": rounds, "steps": steps, "levels": list(levels), "iface": "lo"}
    out = {"model": f"gpt L{layers} D{width} T{seq_len}, batch {batch} per rank", "levels": list(levels),
           "goals": GOALS, "zero_traffic": ZERO_TRAFFIC,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_before": round(os.getloadavg()[0], 1),
           "places": []}
    if loopback:
        res = _ranks([(None, "127.0.0.1")] * loopback, a, timeout, f"ring x{loopback} on loopback")
        out["places"].append({"place": "ring, loopback", **res})
        return out
    sys.path.insert(0, str(REPO / "tools"))
    import fleet as fleet_tools  # tools/fleet.py

    for rate in rates:
        with fleet_tools.held_at(rate) as fl:  # one rate at a time: the fleet is the machine's
            res = _ranks([(h.netns, h.ip) for h in fl.hosts], {**a, "iface": fl.hosts[0].interface}, timeout,
                         f"ring x3 on the fleet at {rate}")
            out["places"].append({"place": f"ring, 3 fleet hosts, tbf {rate}" if rate != "unlimited"
                                  else "ring, 3 fleet hosts, no limit", "rate": rate,
                                  "load": round(os.getloadavg()[0], 1), **res})
    out["load_after"] = round(os.getloadavg()[0], 1)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    return out


def _gbps(rate: str) -> float:
    """tc's rate ("1gbit", "200mbit") in Gbit/s; 0 for "unlimited"."""
    for unit, scale in (("gbit", 1.0), ("mbit", 1e-3), ("kbit", 1e-6)):
        if rate.endswith(unit):
            return float(rate[:-len(unit)]) * scale
    return 0.0


def table(out: dict) -> str:
    """docs/sharding.md's "Step time on the test fleet" table from a run's JSON."""
    lines = ["| link | level | step ms | x data parallel | goal | compute ms | comm ms | MB sent per step | "
             "x ZeRO's bytes | x the code's | wire ms (sent / rate) | step - wire ms |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for place in out["places"]:
        rate = _gbps(place["rate"])
        link = f"{rate:g} Gbit/s" if rate >= 1 else f"{rate * 1e3:g} Mbit/s" if rate else "no limit"
        for r in place["rows"]:
            wire = r["sent_bytes_per_step"] * 8 / (rate * 1e9) if rate else 0.0
            goal = f"<= {out['goals'][r['level']]}x" if r["level"] in out["goals"] else "-"
            lines.append(f"| {link} | {r['level']} | {r['step_s'] * 1e3:.0f} | {r['x_none']:.2f} | {goal} | "
                         f"{r['compute_s'] * 1e3:.0f} | {r['comm_s'] * 1e3:.0f} | "
                         f"{r['sent_bytes_per_step'] / 1e6:.1f} | "
                         f"{r['sent_x_zero']:.2f} | {r.get('sent_x_built', float('nan')):.2f} | "
                         + (f"{wire * 1e3:.0f} | {(r['step_s'] - wire) * 1e3:.0f} |" if rate else "- | - |"))
    return "\n".join(lines)


if __name__ == "__main__":
    command_line(sys.argv, rank_main, main, table, OUT)
