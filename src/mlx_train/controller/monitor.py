"""`mlx-train monitor`: a live terminal view of a run, a one-shot snapshot, or a PNG of its curves.

Reads only the run directory (metrics.jsonl, events.jsonl, config.yaml), so it works on any run,
finished or not, from any terminal on the controller.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from mlx_train.controller.console import fmt_duration
from mlx_train.errors import UserError
from mlx_train.units import human
from mlx_train.events import ENDINGS, Event
from mlx_train.rundir import RunDir, newest_run

_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: List[float], width: int = 40) -> str:
    values = values[-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(_BARS[int((v - lo) / span * (len(_BARS) - 1))] for v in values)


def printable(text: str) -> str:
    """A sample on one line: line breaks and tabs shown as symbols, other control characters as '·'
    (a byte-level model early in training writes any byte)."""
    text = text.replace("\n", "⏎").replace("\t", "⇥")
    return "".join(c if c.isprintable() else "·" for c in text)


@dataclass
class Snapshot:
    run: RunDir
    total: int
    metrics: List[dict]
    events: List[dict]
    state: str = "running"
    restarts: int = 0
    eta_s: Optional[float] = None
    val: List[tuple] = field(default_factory=list)
    sample: Optional[tuple] = None  # (step, text): the embedded GPT's latest evaluation sample

    @property
    def last(self) -> Optional[dict]:
        return self.metrics[-1] if self.metrics else None


def take_snapshot(run: RunDir) -> Snapshot:
    cfg = run.load_config()
    by_step = {}
    for m in run.metrics():  # a restarted attempt re-logs steps: the latest record of a step wins
        by_step[m["step"]] = m
    metrics = [by_step[s] for s in sorted(by_step)]
    events = run.events()
    snap = Snapshot(run, cfg.steps, metrics, events)
    snap.restarts = sum(e["event"] == Event.RESTART for e in events)
    ended = [e for e in events if e["event"] in ENDINGS]
    if ended and (not metrics or ended[-1]["time"] >= metrics[-1].get("time", 0)) and \
            not any(e["event"] == Event.LAUNCH and e["time"] > ended[-1]["time"] for e in events):
        snap.state = ENDINGS[Event(ended[-1]["event"])]
    snap.val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    samples = [(m["step"], m["sample"]) for m in metrics if isinstance(m.get("sample"), str)]
    snap.sample = samples[-1] if samples else None
    recent = [m for m in metrics if "time" in m][-6:]
    if len(recent) >= 2 and recent[-1]["step"] > recent[0]["step"]:
        rate = (recent[-1]["time"] - recent[0]["time"]) / (recent[-1]["step"] - recent[0]["step"])
        snap.eta_s = rate * (snap.total - recent[-1]["step"])
    return snap


def render(snap: Snapshot, performance: bool = False):
    last = snap.last
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("run", str(snap.run.path))
    head.add_row("state", snap.state)
    if last is None:
        head.add_row("step", f"0/{snap.total} (waiting for the first logged step)")
        return head
    losses = [m["loss"] for m in snap.metrics]
    head.add_row("step", f"{last['step']}/{snap.total}   eta {fmt_duration(snap.eta_s) if snap.state == 'running' else '-'}")
    head.add_row("loss", f"{last['loss']:.4f}  {sparkline(losses)}")
    if snap.val:
        head.add_row("val loss", f"{snap.val[-1][1]:.4f}  {sparkline([v for _, v in snap.val])}")
    head.add_row("tokens/s", f"{last['tokens_per_s']:,.0f}  ({last['devices']} devices, global batch {last['global_batch']})")
    head.add_row("restarts", str(snap.restarts))
    reshares = [e for e in snap.events if e["event"] == Event.RESHARE]
    if reshares:  # an elastic resize carried the shares and caps to the new hosts
        head.add_row("reshare", Text(printable(str(reshares[-1].get("note", "")))))
    if snap.sample:
        head.add_row("sample", Text(f"step {snap.sample[0]}: {printable(snap.sample[1])}"))
    ranks = Table(title="per rank", title_justify="left")
    ranks.add_column("rank")
    ranks.add_column("peak memory", justify="right")
    ranks.add_column("param checksum", justify="right")
    # Each rank's rows of the global batch (--shares); a record from before they were logged has none.
    rows = last.get("rows") if isinstance(last.get("rows"), list) else []
    if rows:
        ranks.add_column("rows", justify="right")
    for r, (mem, ck) in enumerate(zip(last["peak_memory"], last["param_checksum"])):
        ranks.add_row(str(r), human(mem), f"{ck:08x}", *([str(rows[r])] if r < len(rows) else []))
    parts = [head, ranks]
    if performance:
        parts += [performance_table(snap), spread_table(snap)] + _stages(snap)
    return Group(*parts)


def _stages(snap: Snapshot) -> list:
    table = stage_table(snap)
    return [table] if table is not None else []


def stage_table(snap: Snapshot) -> Optional[Table]:
    """A pipelined run's latest logged step, stage by stage and replica by replica: each stage's
    compute, its idle time inside the 1F1B schedule (waiting for its neighbours, transfers included)
    and the sync after it, and the bubble (idle share of the step) against (S-1)/(M+S-1), which
    assumes equal forwards and backwards on every stage. None when the run is not pipelined."""
    from mlx_train.controller.bubble import replica_bubble, stage_times, theory

    d = snap.run.load_config().dist
    last = snap.last or {}
    times = stage_times(last, d.pipeline_stages)
    if not times:
        return None
    expected = theory(d.pipeline_stages, d.gradient_accumulation)
    t = Table(title=f"pipeline stages (step {last.get('step', '-')}): {d.pipeline_stages} stages x "
                    f"{d.gradient_accumulation} micro-batches, bubble in theory {expected:.0%} of a step",
              title_justify="left")
    for col in ("replica", "stage", "rank", "compute s", "idle s", "sync s", "idle % of step", "bubble", "theory"):
        t.add_column(col, justify="right")
    for st in times:
        whole = st.stage == d.pipeline_stages - 1  # the replica's bubble on its last stage's row
        t.add_row(str(st.replica), str(st.stage), str(st.rank), f"{st.compute_s:.4f}", f"{st.idle_s:.4f}",
                  f"{st.sync_s:.4f}", f"{st.bubble:.0%}", f"{replica_bubble(times, st.replica):.0%}" if whole else "",
                  f"{expected:.0%}" if whole else "")
    return t


@dataclass(frozen=True)
class MemoryNeed:
    """The memory model's peak per rank (what mx.get_peak_memory should show) for the run's config:
    at its own shard level, and at `none`, what data parallel would need."""
    level: str
    at_level: int
    data_parallel: int


def memory_need(cfg) -> Optional[MemoryNeed]:
    """None when the planner cannot size the model (a factory's, or a hub id: monitor fetches nothing)."""
    from dataclasses import replace
    from pathlib import Path

    from mlx_train.config import ModelKind, shard_level_of
    from mlx_train.planning.planner import MemoryOptimizer

    if not cfg.model.kind.knows_shape or (cfg.model.kind is ModelKind.PRETRAINED
                                          and not Path(cfg.model.name).expanduser().is_dir()):
        return None
    level = shard_level_of(cfg)
    try:
        at = MemoryOptimizer.estimate(cfg)
        dp = at if level == "none" else MemoryOptimizer.estimate(replace(cfg, shard="none", shard_level=None))
    except (UserError, OSError, ValueError):
        return None
    return MemoryNeed(level, at, dp)


def spread_table(snap: Snapshot) -> Table:
    """How the latest logged step was spread over the ranks, by rank: its rows of the global batch, its
    compute time and its time in the step's collectives (the all-reduce, or sharded the reduce-scatter
    and gathers: a rank that finishes its share first waits there for the others), the bytes it
    reduce-scattered and gathered, and its peak memory against the memory model's need at the run's
    shard level and at data parallel's (level none)."""
    from mlx_train.config import shard_level_of

    cfg = snap.run.load_config()
    last = snap.last or {}
    level = shard_level_of(cfg)
    need = memory_need(cfg)
    peaks = last.get("peak_memory") or []
    n = len(peaks)

    def by_rank(key: str) -> list:
        # A record from before these were logged has none ("-").
        v = last.get(key)
        return v if isinstance(v, list) and len(v) == n else [None] * n

    compute, wait, rows = by_rank("rank_compute_s"), by_rank("rank_wait_s"), by_rank("rows")
    scattered, gathered = last.get("scattered_bytes", 0), last.get("gathered_bytes", 0)
    title = f"spread over the ranks (step {last.get('step', '-')}): shard level {level}"
    if need is not None:
        title += f"; memory model peak per rank {human(need.at_level)}, data parallel {human(need.data_parallel)}"
    t = Table(title=title, title_justify="left")
    for col in ("rank", "rows", "compute s", "wait s", "reduce-scattered B/step", "gathered B/step",
                "peak memory", "vs data parallel"):
        t.add_column(col, justify="right")
    for r in range(n):
        vs_dp = f"{peaks[r] / need.data_parallel:.2f}x" if need is not None and need.data_parallel else "-"
        t.add_row(str(r), "-" if rows[r] is None else str(rows[r]),
                  "-" if compute[r] is None else f"{compute[r]:.4f}", "-" if wait[r] is None else f"{wait[r]:.4f}",
                  f"{scattered:,}", f"{gathered:,}", human(peaks[r]), vs_dp)
    return t


def performance_table(snap: Snapshot, rows: int = 8) -> Table:
    """Per logged step: compute vs communication, all-reduce bandwidth as nccl-tests defines it, and,
    when the run records its link rate (--link-gbps), the sync against the wire's limit. The title
    says how many bytes each rank all-reduces per step (the trainable parameters' gradients: under
    LoRA only the adapters'). At `--shard full` the gathers and reduce-scatters run inside the
    forward and backward, so their time is in "compute s" and no bandwidth can be told apart."""
    from mlx_train.config import shard_level_of
    from mlx_train.planning.perf import bus_bandwidth, scaling_efficiency, wire_limit_s

    cfg = snap.run.load_config()
    gbps, inside = cfg.dist.link_gbps, shard_level_of(cfg) == "full"
    last = snap.metrics[-1] if snap.metrics else {}
    # The same every step (the trainable parameters' gradients), so it goes in the title.
    sent = last.get("grad_bytes", 0) if last.get("devices", 1) > 1 and not inside else 0
    notes = ([f"all-reduced per step {sent:,} B"] if sent else []) + \
        (["shard full: collectives inside compute s"] if inside else []) + ([f"links {gbps:g} Gbit/s"] if gbps else [])
    t = Table(title="performance" + (f" ({', '.join(notes)})" if notes else ""), title_justify="left")
    cols = ["step", "compute s", "comm s", "algbw GB/s", "busbw GB/s"] + (["sync % of wire"] if gbps else [])
    for col in cols + ["tok/s/device", "scaling eff."]:
        t.add_column(col, justify="right")
    for m in snap.metrics[-rows:]:
        algbw, busbw = (0, 0) if inside else bus_bandwidth(m.get("grad_bytes", 0), m["comm_time_s"], m["devices"])
        eff = scaling_efficiency(snap.run, m)
        row = [str(m["step"]), f"{m.get('compute_time_s', 0):.4f}", f"{m['comm_time_s']:.4f}",
               f"{algbw:.2f}" if algbw else "-", f"{busbw:.2f}" if busbw else "-"]
        if gbps:
            limit = 0 if inside else wire_limit_s(m.get("grad_bytes", 0), m["devices"], gbps)
            row.append(f"{limit / m['comm_time_s']:.0%}" if limit and m["comm_time_s"] > 0 else "-")
        t.add_row(*row, f"{m['tokens_per_s'] / m['devices']:,.0f}", f"{eff:.0%}" if eff is not None else "-")
    return t


def write_plot(snap: Snapshot, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    steps = [m["step"] for m in snap.metrics]
    ax1.plot(steps, [m["loss"] for m in snap.metrics], label="train loss")
    if snap.val:
        ax1.plot([s for s, _ in snap.val], [v for _, v in snap.val], "o-", label="validation loss")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(steps, [m["tokens_per_s"] for m in snap.metrics], color="tab:green")
    ax2.set_ylabel("tokens/s")
    ax2.set_xlabel("step")
    fig.suptitle(str(snap.run.path))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def monitor(run_dir: Optional[str] = None, once: bool = False, plot: Optional[str] = None,
            performance: bool = False, refresh_s: float = 1.0) -> int:
    run = RunDir(run_dir) if run_dir else newest_run()
    if run is None:
        raise UserError("no runs under runs/: start one with `mlx-train train`, or pass a run directory")
    if not run.exists():
        raise UserError(f"{run.path} is not a run directory (no config.yaml): pass the --run-dir of a run")
    console = Console()
    if plot:
        write_plot(take_snapshot(run), plot)
        console.print(f"wrote {plot}")
        if not once:
            return 0
    if once:
        console.print(render(take_snapshot(run), performance))
        return 0
    if not console.is_terminal:
        return _follow(run, refresh_s, performance)
    with Live(render(take_snapshot(run), performance), console=console, refresh_per_second=4) as live:
        while True:
            snap = take_snapshot(run)
            live.update(render(snap, performance))
            if snap.state != "running":
                break
            time.sleep(refresh_s)
    return 0


def _follow(run: RunDir, refresh_s: float, performance: bool = False) -> int:
    """Not a terminal: one line per logged step until the run ends (for logs and pipes)."""
    shown = 0
    while True:
        snap = take_snapshot(run)
        for m in snap.metrics:
            if m["step"] > shown:
                val = f"  val {m['val_loss']:.4f}" if "val_loss" in m else ""
                print(f"step {m['step']}/{snap.total}  loss {m['loss']:.4f}{val}  {m['tokens_per_s']:,.0f} tok/s",
                      flush=True)
                if isinstance(m.get("sample"), str):
                    print(f"  sample: {printable(m['sample'])}", flush=True)
                shown = m["step"]
        if snap.state != "running":
            print(f"{snap.state} at step {shown} ({snap.restarts} restarts)", flush=True)
            if performance and snap.metrics:  # piped, --performance printed nothing more (the guide's command)
                Console(width=200).print(performance_table(snap))
                Console(width=200).print(spread_table(snap))
                for table in _stages(snap):
                    Console(width=200).print(table)
            return 0
        time.sleep(refresh_s)
