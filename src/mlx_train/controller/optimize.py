"""`mlx-train optimize`: run the tuner's trials as real supervised runs; write the best as a config.

The trials' run directories live in a scratch directory beside the output file and are removed
when the command ends, whatever the outcome.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import List

from rich.console import Console
from rich.table import Table

from mlx_train.config import RunOptions, TrainConfig
from mlx_train.controller.console import ProgressView
from mlx_train.errors import UserError
from mlx_train.events import Event
from mlx_train.fleet import ship
from mlx_train.planning.tuner import Trial, Tuner
from mlx_train.rundir import RunDir
from mlx_train.units import human


class _Quiet(ProgressView):
    def __init__(self, total: int):
        super().__init__(total, live=False)

    def note(self, text: str) -> None:
        pass


def run_trial(hosts, scratch: Path, console: Console):
    """The tuner's `measure`: a short supervised run of `cfg` on `hosts`, timed from step 2 on."""
    from mlx_train.controller.reporting import MetricsFile
    from mlx_train.controller.supervisor import Supervision, Supervisor

    def measure(t: Trial, cfg: TrainConfig) -> None:
        run = RunDir(scratch / f"trial-{len(list(scratch.iterdir())) + 1:02d}")
        run.prepare(cfg, resume=False)
        code = Supervisor(cfg, run, hosts, Supervision(max_restarts=0, stall_timeout=120), view=_Quiet(cfg.steps),
                          sinks=[MetricsFile(run)]).supervise()
        ms = [m for m in run.metrics() if m["step"] > 1]  # step 1 pays for start-up
        oom = bool(run.events(Event.OOM))
        launched = run.events(Event.LAUNCH)
        # Where the trial's ranks ran, as the launch recorded them: a cluster's trials use every host.
        where = ", ".join(f"{r['rank']}@{r['host']}" for r in launched[0]["ranks"]) if launched else "not launched"
        shutil.rmtree(run.path, ignore_errors=True)  # a trial's checkpoints are worth nothing after it
        if code != 0 or not ms:
            t.status = "over budget" if oom else "failed"
            return
        t.tokens_per_s = statistics.median(m["tokens_per_s"] for m in ms)
        # What the tuner's scaling model calibrates on (planning/tuner.StepModel).
        t.compute_s = statistics.median(m["compute_time_s"] for m in ms)
        t.comm_s = statistics.median(m["comm_time_s"] for m in ms)
        t.peak = max(max(m["peak_memory"]) for m in ms)
        t.status = "ok"
        console.print(f"  {t.split}, {t.connections} ring connection(s): {t.tokens_per_s:,.0f} tok/s"
                      + (f" (predicted {t.predicted:,.0f})" if t.predicted else "") + f", peak {human(t.peak)}"
                      + f"; ranks {where}")

    return measure


def optimize(flags: dict, opts: RunOptions, trial_steps: int, output: str) -> int:
    """Tune the run that `flags` (the knobs given, nested like TrainConfig.to_dict()) and `opts`
    resolve to, as `train` would; write the best settings to `output`."""
    from mlx_train.controller.run import check_fits, check_inputs, hosts_for, resolve_config
    from mlx_train.rank.device import rank_budget_for

    if trial_steps < 3:
        raise UserError("--trial-steps must be at least 3 (the first step pays for start-up)")
    # Without --devices, a cluster keeps all of its hosts (and a local run one device).
    hosts, base = hosts_for(opts, resolve_config(flags, opts), flags)
    base = check_inputs(base)
    budget = rank_budget_for(base, hosts)
    check_fits(replace(base, memory_budget=budget), hosts)  # nothing to try if not even batch 1 fits
    # The trials read the model and data where `train` would.
    hosts, _ = ship.ship(base, hosts, opts.ship_cache, opts.ship_cache_days)
    console = Console(soft_wrap=True, width=None if Console().is_terminal else 140)
    console.print(f"optimize: {base.dist.num_devices} devices, global batch {base.dist.global_batch_size}, "
                  f"budget {human(budget)} per device, {trial_steps} steps per trial")
    scratch = Path(tempfile.mkdtemp(prefix=".mlx-train-optimize-", dir=Path(output).parent.resolve()))
    try:
        tuner = Tuner(base, budget, trial_steps, len({h.name for h in hosts}) > 1,
                      run_trial(hosts, scratch, console))
        best = tuner.run()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    console.print(_table(tuner.trials))
    if best is None:
        raise UserError("no candidate ran within the memory budget: raise --memory-budget or use a smaller model")
    out = replace(best.apply(base), memory_budget=base.memory_budget)
    out.to_yaml(output)
    if base.dist.num_devices == 1:
        from mlx_train.planning.perf import record_baseline

        record_baseline(out, best.tokens_per_s)
    console.print(f"best: {best.split}" + (f", {best.split.stages} pipeline stages" if best.split.stages > 1 else "")
                  + f", {best.connections} ring connection(s): {best.tokens_per_s:,.0f} tok/s; "
                  f"shard level {best.split.shard}{_why_level(base, best)}; "
                  f"wrote {output} (use: mlx-train train --config {output})")
    return 0


def _why_level(base: TrainConfig, best: Trial) -> str:
    if base.shard != "auto":
        return f" (--shard {base.shard})"
    if base.dist.num_devices == 1:
        return " (one device: nothing to shard over)"
    return " (the least that fits its setting; --shard auto)"


def _table(trials: List[Trial]) -> Table:
    t = Table(title="trials, fastest first", title_justify="left")
    for col in ("rank", "stages", "batch/device", "accumulation", "checkpointing", "precision", "shard", "ring conn.",
                "predicted", "tokens/s", "peak memory"):
        t.add_column(col, justify="right")
    t.add_column("status", no_wrap=True)  # one line: tests and users grep it
    ranked = sorted(trials, key=lambda x: -x.tokens_per_s)
    for i, x in enumerate(ranked, 1):
        t.add_row(str(i) if x.status == "ok" else "-", str(x.split.stages), str(x.split.batch), str(x.split.accumulation),
                  "on" if x.split.checkpointing else "off", x.split.precision, x.split.shard, str(x.connections),
                  f"{x.predicted:,.0f}" if x.predicted else "-", f"{x.tokens_per_s:,.0f}" if x.status == "ok" else "-", human(x.peak) if x.peak else "-", x.status)
    return t
