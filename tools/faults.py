#!/usr/bin/env python3
"""The fault matrix: one short training run on the 3-host test fleet per fault, measured.

    make faults                                  # every fault, the table into build/faults.md
    python tools/faults.py --only kill-rank nan  # some of them
    python tools/faults.py --local 3             # no fleet, no root: the default local 2-rank run, rank 1 killed

Each run is the same small job (3 hosts, a tiny model, 80 steps, a checkpoint every 10,
--min-devices 2); one fault is injected once it has passed step 15, and the run must finish.
From the run's events and per-step metrics it reports: detection (injection to the supervisor's
first reaction: a stall, an exit, `diverged`, `bad_step`, `checkpoint_failed`, ...; for a killed
controller, until its last rank is gone), time to the next optimizer step after recovery, steps
lost (done before the fault, redone after it), and whether the final parameters equal those of
the same run without a fault (bitwise, or the largest difference). Needs root and the fleet
(tools/fleet.py); tests/test_fleet_faults.py asserts the events and outcomes, not these timings.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import fleet as fleet_tools  # noqa: E402
from mlx_train.events import Event  # noqa: E402  (the package whose mlx-train writes the runs)
# Finer polling than the tests': the matrix's timings come from these waits.
wait_for = functools.partial(fleet_tools.wait_for, every=0.05)

MLX_TRAIN = str(Path(sys.executable).parent / "mlx-train")
TINY = ["--layers", "2", "--width", "64", "--heads", "2", "--seq-len", "64", "--batch-size", "4"]
STEPS = 80


def job(steps: int = STEPS, restarts: int = 6) -> List[str]:
    """The matrix's job; the tests run it shorter (every fault is in by step 30). Equal shares: under
    the default (auto) the hosts' measured speeds on a loaded machine may re-share a run, at steps
    that differ between runs, and its parameters are compared bit for bit with the run without a fault."""
    return [*TINY, "--steps", str(steps), "--checkpoint-every", "10", "--log-every", "1", "--eval-every", "1000",
            "--min-devices", "2", "--max-restarts", str(restarts), "--no-live", "--shares", "equal"]


REACTIONS = {Event.STALL, Event.RANK_EXIT, Event.DIVERGED, Event.BAD_STEP, Event.CHECKPOINT_FAILED,
             Event.CHECKPOINT_DAMAGED, Event.EXCLUDE, Event.RESTART, Event.ROLLBACK}
INJECT_AFTER_STEP = 15


def jsonl(path: Path) -> List[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


@dataclass
class Ctx:
    fleet: fleet_tools.Fleet
    cluster: Path
    corpus: Path
    run: Path
    env: dict
    steps: int = STEPS
    restarts: int = 6
    proc: Optional[subprocess.Popen] = None
    notes: List[str] = field(default_factory=list)

    def events(self, kind: Optional[Event] = None) -> List[dict]:
        return [e for e in jsonl(self.run / "events.jsonl") if kind is None or e.get("event") == kind]

    def metrics(self) -> List[dict]:
        return jsonl(self.run / "metrics.jsonl")

    def rank(self, r: int) -> dict:
        return [x for x in self.events(Event.LAUNCH)[-1]["ranks"] if x["rank"] == r][0]

    def start(self, *extra: str) -> None:
        argv = [MLX_TRAIN, "train", "--cluster", str(self.cluster), "--data", str(self.corpus), *job(self.steps, self.restarts), *extra]
        self.proc = subprocess.Popen(argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@dataclass
class Fault:
    name: str
    what: str
    inject: Callable[[Ctx], None]
    hook: Dict[str, str] = field(default_factory=dict)  # a test hook's environment (injects by itself)
    prepare: Optional[Callable[[Ctx], None]] = None    # right after the run starts
    after: Optional[Callable[[Ctx], None]] = None      # once the run is over: undo what is left


def _signal_rank(sig: str, rank: int = 1):
    def inject(ctx: Ctx) -> None:
        r = ctx.rank(rank)
        ctx.fleet.run_in(r["host"], ["kill", f"-{sig}", str(r["pid"])], check=True)
    return inject


def _link_down_for(host: str, seconds: Optional[float]):
    def inject(ctx: Ctx) -> None:
        fleet_tools.link_down(host)
        if seconds is not None:
            time.sleep(seconds)
            fleet_tools.link_up(host)
    return inject


def _loss(host: str, per_mille: int, seconds: Optional[float]):
    def inject(ctx: Ctx) -> None:
        fleet_tools.drop_packets(host, per_mille=per_mille)
        if seconds is not None:
            time.sleep(seconds)
            fleet_tools.clear_faults(host)
    return inject


def _kill_controller(ctx: Ctx) -> None:
    pids = [(r["host"], r["pid"]) for r in ctx.events(Event.LAUNCH)[-1]["ranks"]]
    ctx.proc.send_signal(signal.SIGKILL)
    ctx.proc.communicate(timeout=30)
    t0 = time.time()
    wait_for(lambda: not any(_is_worker(p) for _, p in pids), 60, "every rank's end after the controller's")
    ctx.notes.append(f"last rank gone {time.time() - t0:.1f} s after the controller")
    ctx.run_gone = time.time()
    ctx.start("--resume", str(ctx.run))


def _is_worker(pid: int) -> bool:
    try:
        if b"mlx_train.rank.worker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
    except OSError:
        return False
    st = fleet_tools.procs.stat(pid)
    return st is not None and st.state != "Z"


def _ckpt_dir(ctx: Ctx) -> Path:
    return ctx.run / "checkpoints"


def _tmpfs_on_h1(ctx: Ctx) -> None:
    # Rank 0 (on h1) writes checkpoints: their storage is a small tmpfs in h1's own mount namespace,
    # mounted once the supervisor made the run directory and before the ranks are up.
    wait_for(lambda: _ckpt_dir(ctx).is_dir(), 60, "the run directory")
    ctx.fleet.run_in("h1", ["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(_ckpt_dir(ctx))], check=True)


def _fill_h1(ctx: Ctx) -> None:
    # h1's own tools (its /root, where this Python may live, is private to the host).
    d = _ckpt_dir(ctx)
    avail = int(ctx.fleet.run_in("h1", ["df", "-B1", "--output=avail", str(d)], check=True).stdout.split()[-1])
    ctx.fleet.run_in("h1", ["fallocate", "-l", str(max(4096, avail - 300 * 1024)), str(d / "filler")], check=True)
    wait_for(lambda: len(ctx.events(Event.CHECKPOINT_FAILED)) >= 2, 120, "two failed checkpoints")
    ctx.fleet.run_in("h1", ["rm", "-f", str(d / "filler")], check=True)


def _unmount_h1(ctx: Ctx) -> None:
    # The final checkpoint lives in h1's tmpfs: copy it out for the comparison, then unmount.
    final = _ckpt_dir(ctx) / f"step-{ctx.steps:06d}"
    out = ctx.run / "final"
    ctx.fleet.run_in("h1", ["cp", "-r", str(final), str(out)], check=False)
    ctx.fleet.run_in("h1", ["umount", "-l", str(_ckpt_dir(ctx))], check=False)


def _corrupt_newest(ctx: Ctx) -> None:
    # Past two checkpoints, so that there is an intact one behind the corrupted newest.
    wait_for(lambda: len(ctx.events(Event.CHECKPOINT)) >= 2, 120, "a second checkpoint")
    _signal_rank("KILL")(ctx)  # the group stops: no newer checkpoint can be completed
    time.sleep(1.0)
    newest = sorted(p for p in _ckpt_dir(ctx).iterdir() if p.name.startswith("step-"))[-1]
    blob = newest / "model.safetensors"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    blob.write_bytes(bytes(data))
    ctx.notes.append(f"corrupted {newest.name}")


def _by_hook(ctx: Ctx) -> None:
    pass  # the rank injects it itself at the step its hook names


FAULTS = [
    Fault("kill-rank", "SIGKILL rank 1 (h2)", _signal_rank("KILL")),
    Fault("sigstop-rank", "SIGSTOP rank 1 (h2)", _signal_rank("STOP")),
    Fault("link-down-10s", "h2's link down for 10 s", _link_down_for("h2", 10)),
    Fault("link-down", "h3's link down for good (--min-devices 2)", _link_down_for("h3", None),
          after=lambda ctx: fleet_tools.link_up("h3")),
    Fault("loss-100", "100% packet loss on h2 for 15 s", _loss("h2", 1000, 15)),
    Fault("loss-5", "5% packet loss on h2 until the end", _loss("h2", 50, None),
          after=lambda ctx: fleet_tools.clear_faults("h2")),
    Fault("controller-kill", "SIGKILL the supervisor, then train --resume", _kill_controller),
    Fault("disk-full", "checkpoint storage full (tmpfs on h1) for two intervals", _fill_h1, prepare=_tmpfs_on_h1,
          after=_unmount_h1),
    Fault("corrupt-checkpoint", "newest checkpoint corrupted (a flipped byte), rank 1 killed", _corrupt_newest),
    Fault("perturb", "rank 1's weights perturbed by 1e-3 at step 25 (MLX_TRAIN_TEST_PERTURB)", _by_hook,
          hook={"MLX_TRAIN_TEST_PERTURB": "25:1"}),
    Fault("nan", "rank 1's weights NaN for 3 steps from 25 (MLX_TRAIN_TEST_POISON)", _by_hook,
          hook={"MLX_TRAIN_TEST_POISON": "25:1:3"}),
]


def final_params(run: Path, steps: int = STEPS) -> Dict[str, "object"]:
    import mlx.core as mx
    import numpy as np

    d = run / "final" if (run / "final").is_dir() else run / "checkpoints" / f"step-{steps:06d}"
    return {k: np.array(v) for k, v in mx.load(str(d / "model.safetensors")).items()}


def compare(base: dict, other: dict) -> str:
    import numpy as np

    if sorted(base) != sorted(other):
        return "different tensors"
    if all(np.array_equal(base[k], other[k]) for k in base):
        return "equal (bitwise)"
    diff = max(float(np.max(np.abs(base[k] - other[k]))) for k in base)
    scale = max(float(np.max(np.abs(base[k]))) for k in base)
    return f"max abs diff {diff:.1e} (weights up to {scale:.2f})"


@dataclass
class Row:
    fault: Fault
    outcome: str
    detection_s: Optional[float]
    next_step_s: Optional[float]
    steps_lost: Optional[int]
    params: str
    events: List[str]
    notes: List[str]


def measure(ctx: Ctx, t_inject: float, base: Optional[dict]) -> Row:
    evs = ctx.events()
    after = [e for e in evs if e["time"] >= t_inject]
    # A rank's exit 0 is the run ending well, no reaction to the fault.
    reaction = next((e for e in after if e["event"] in REACTIONS and not (e["event"] == Event.RANK_EXIT
                                                                          and e.get("code") == 0)), None)
    detection = None
    if getattr(ctx, "run_gone", None):
        detection = ctx.run_gone - t_inject
    elif reaction is not None:
        detection = reaction["time"] - t_inject
    ms = ctx.metrics()
    resume = next((e for e in after if e["event"] == Event.RESUME), None)
    since = resume["time"] if resume else t_inject
    nxt = next((m for m in ms if m.get("time", 0) > since), None)
    next_step = nxt["time"] - t_inject if nxt else None
    lost = 0
    if resume:
        done = max((m["step"] for m in ms if m.get("time", 0) < since), default=0)
        lost = max(0, done - resume["step"])
    params = compare(base, final_params(ctx.run, ctx.steps)) if base is not None else "-"
    outcome = evs[-1]["event"] if evs else "?"
    kinds = []
    for e in after:
        if e["event"] not in (Event.CHECKPOINT, Event.RANK_EXIT, Event.LAUNCH) and e["event"] not in kinds:
            kinds.append(e["event"])
    return Row(None, outcome, detection, next_step, lost, params, kinds, ctx.notes)


def run_one(fleet, cluster: Path, corpus: Path, root: Path, fault: Optional[Fault], base: Optional[dict],
            log=print, steps: int = STEPS) -> Row:
    run = root / (fault.name if fault else "baseline")
    env = fleet.client_env(**(fault.hook if fault else {}))
    ctx = Ctx(fleet, cluster, corpus, run, env, steps=steps)
    ctx.start("--run-dir", str(run))
    try:
        if fault and fault.prepare:
            fault.prepare(ctx)
        if fault is None:
            out, _ = ctx.proc.communicate(timeout=600)
            if ctx.proc.returncode:
                raise RuntimeError(f"the baseline run failed:\n{out[-3000:]}")
            return Row(None, ctx.events()[-1]["event"], None, None, 0, "-", [], [])
        wait_for(lambda: any(m["step"] >= INJECT_AFTER_STEP for m in ctx.metrics()) and ctx.events(Event.CHECKPOINT),
                 180, "step 15")
        if fault.hook:  # the rank injects at step 25: the injection is when step 25 was reported
            m = wait_for(lambda: [m for m in ctx.metrics() if m["step"] == 25], 120, "step 25")
            t_inject = m[0]["time"]
        else:
            t_inject = time.time()
            fault.inject(ctx)
        out, _ = ctx.proc.communicate(timeout=600)
        if ctx.proc.returncode:
            log(out[-3000:])
    except BaseException:
        if ctx.proc and ctx.proc.poll() is None:
            ctx.proc.kill()
            ctx.proc.communicate(timeout=30)
        raise
    finally:
        if fault and fault.after:
            fault.after(ctx)
    row = measure(ctx, t_inject, base)
    row.fault = fault
    return row


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f}"


def table(rows: List[Row]) -> str:
    lines = ["| fault | outcome | detection (s) | to next step (s) | steps lost | final parameters vs. no fault | events |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        note = f" ({'; '.join(r.notes)})" if r.notes else ""
        lines.append(f"| {r.fault.what}{note} | {r.outcome} | {_fmt(r.detection_s)} | {_fmt(r.next_step_s)} | "
                     f"{r.steps_lost} | {r.params} | {', '.join(r.events)} |")
    return "\n".join(lines)


def setup(root: Path):
    """The fleet up and provisioned, its cluster file, a corpus every host sees."""
    fleet = fleet_tools.up(3)
    fleet_tools.provisioned(fleet)
    return fleet, fleet_tools.configure(fleet, root), fleet_tools.corpus(root / "corpus")


# Faults a long run can take again and again (the test hooks act once, in a first attempt only).
SOAK = ["kill-rank", "sigstop-rank", "link-down-10s", "loss-100", "corrupt-checkpoint", "controller-kill"]


def soak(fleet, cluster, corpus, root: Path, n: int, seed: int) -> str:
    """n random faults, one after another, in one long run; each must be followed by progress."""
    import random

    rng = random.Random(seed)
    run = root / "soak"
    ctx = Ctx(fleet, cluster, corpus, run, fleet.client_env(), steps=100000, restarts=4 * n)
    ctx.start("--run-dir", str(run))
    faults = {f.name: f for f in FAULTS}
    done, t0 = [], time.time()

    def top() -> int:
        return max((m["step"] for m in ctx.metrics()), default=0)
    try:
        for i in range(n):
            name = rng.choice(SOAK)
            before = top()
            wait_for(lambda: top() >= before + 15, 300, f"progress before fault {i + 1}")
            t = time.time()
            faults[name].inject(ctx)
            done.append((name, t))
            print(f"{i + 1:2d}. {name}", flush=True)
        before = top()
        wait_for(lambda: top() >= before + 15, 300, "progress after the last fault")
    finally:
        if ctx.proc.poll() is None:
            ctx.proc.send_signal(signal.SIGINT)
            ctx.proc.communicate(timeout=120)
        for h in ("h1", "h2", "h3"):
            fleet_tools.clear_faults(h)
    # Afterwards, per fault: the first step after the last relaunch it caused (or after it, if none).
    lines, ms, resumes = [], ctx.metrics(), [e["time"] for e in ctx.events(Event.RESUME)]
    for i, (name, t) in enumerate(done):
        end = done[i + 1][1] if i + 1 < len(done) else float("inf")
        since = max([r for r in resumes if t <= r < end] or [t])
        nxt = [m["time"] for m in ms if since < m.get("time", 0) < end]
        lines.append(f"{i + 1:2d}. {name}: " + (f"training again after {min(nxt) - t:.1f} s" if nxt else "NOT recovered"))
    survived = sum("NOT" not in line for line in lines)
    restarts = len(ctx.events(Event.RESTART))
    return (f"Soak: {survived}/{n} faults survived in one run ({time.time() - t0:.0f} s, {restarts} restarts, "
            f"last step {max(m['step'] for m in ctx.metrics())}):\n\n" + "\n".join(lines) + "\n")


# The default local run (`mlx-train train --devices 2`: 4 layers, width 128, batch 8 per rank, a
# checkpoint every 50 steps), shortened, with a metrics line every step so the next step is seen.
LOCAL_STEPS = 150
LOCAL_JOB = ["--devices", "2", "--steps", str(LOCAL_STEPS), "--log-every", "1", "--no-live"]
LOCAL_INJECT_AFTER = 60


def local(root: Path, repeats: int) -> str:
    """SIGKILL rank 1 of the default local 2-rank run `repeats` times, once per run past step 60;
    the same table as the fleet's, against one run without a fault."""
    def start(run: Path) -> Ctx:
        ctx = Ctx(None, None, None, run, {**os.environ, "COLUMNS": "200"}, steps=LOCAL_STEPS)
        ctx.proc = subprocess.Popen([MLX_TRAIN, "train", *LOCAL_JOB, "--run-dir", str(run)], env=ctx.env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return ctx

    base = start(root / "local-baseline")
    out, _ = base.proc.communicate(timeout=600)
    if base.proc.returncode:
        raise RuntimeError(f"the baseline run failed:\n{out[-3000:]}")
    params = final_params(base.run, LOCAL_STEPS)
    fault = Fault("kill-rank-local", "SIGKILL rank 1, default local 2-rank run", _signal_rank("KILL"))
    rows = []
    for i in range(repeats):
        ctx = start(root / f"local-kill-{i}")
        try:
            wait_for(lambda: any(m["step"] >= LOCAL_INJECT_AFTER for m in ctx.metrics()), 300, "step 60")
            t_inject = time.time()
            os.kill(ctx.rank(1)["pid"], signal.SIGKILL)
            out, _ = ctx.proc.communicate(timeout=600)
        finally:
            if ctx.proc.poll() is None:
                ctx.proc.kill()
                ctx.proc.communicate(timeout=30)
        row = measure(ctx, t_inject, params)
        row.fault = fault
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
    return (f"Measured {time.strftime('%Y-%m-%d %H:%M')} on this machine, no fleet ({repeats} runs); job: "
            f"mlx-train train {' '.join(LOCAL_JOB)} (the defaults otherwise), rank 1 killed past step "
            f"{LOCAL_INJECT_AFTER}\n\n{table(rows)}\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=[f.name for f in FAULTS], help="these faults only")
    p.add_argument("--soak", type=int, metavar="N", help="instead: N random faults in one long run")
    p.add_argument("--seed", type=int, default=0, help="the soak's choice of faults")
    p.add_argument("--local", type=int, metavar="N", help="instead: no fleet, rank 1 of the default local 2-rank "
                                                           "run killed, N times")
    p.add_argument("--output", help="where the table goes (default build/faults.md, with --local build/faults-local.md)")
    args = p.parse_args(argv)
    args.output = args.output or str(REPO / "build" / ("faults-local.md" if args.local else "faults.md"))
    root = Path(tempfile.mkdtemp(prefix="mlx-train-faults-", dir="/tmp"))
    t0 = time.time()
    if args.local:
        text = local(root, args.local)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
        print("\n" + text)
        return 0 if f"| {Event.FINISH} |" in text and "error" not in text else 1
    fleet, cluster, corpus = setup(root)
    if args.soak:
        text = soak(fleet, cluster, corpus, root, args.soak, args.seed)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
        print("\n" + text)
        return 0 if text.startswith(f"Soak: {args.soak}/") else 1
    run_one(fleet, cluster, corpus, root, None, None)
    base = final_params(root / "baseline")
    rows = []
    for fault in [f for f in FAULTS if not args.only or f.name in args.only]:
        print(f"-- {fault.name}: {fault.what}", flush=True)
        try:
            row = run_one(fleet, cluster, corpus, root, fault, base)
        except Exception as exc:  # one fault's trouble is a row, not the end of the matrix
            row = Row(fault, f"error: {exc}"[:200], None, None, None, "-", [], [])
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
    text = (f"Measured {time.strftime('%Y-%m-%d %H:%M')} on the 3-host test fleet ({len(rows)} faults, "
            f"{time.time() - t0:.0f} s in all); job: {' '.join(job())}\n\n{table(rows)}\n")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print("\n" + text)
    return 0 if all(r.outcome == Event.FINISH for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
