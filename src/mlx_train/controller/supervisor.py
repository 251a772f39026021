"""The supervisor: owns the rank processes of a run, restarts them from the last checkpoint.

It knows each rank's exit as it happens (one waiter thread per process, blocked in wait()), reads
every rank's output through a pipe (one pump thread per process), and sleeps on a queue in
between: nothing polls. A rank that dies takes its peers down with it (they would hang or fail in
the next all_sum anyway); the whole group is then relaunched with --resume, up to --max-restarts.
"""

from __future__ import annotations

import ctypes
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from mlx_train.controller import launch

from mlx_train import protocol
from mlx_train.config import TrainConfig
from mlx_train.controller.console import ProgressView
from mlx_train.controller.launch import Host, RankProc
from mlx_train.rundir import RunDir

_TAGGED = re.compile(r"^\[\d+,(\d+)\]<(?:stdout|stderr)>:\s?(.*)$")
STOP_GRACE_S = 5.0
# How a process dies when memory runs out: the OOM killer (SIGKILL), MLX under an address-space
# limit (SIGSEGV), Metal aborting a command buffer (SIGABRT); 128+n when ssh or mpirun relays it.
_CRASH_SIGNALS = {signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS}
_ALLOC_FAILURE = re.compile(r"bad_alloc|[Uu]nable to allocate|[Oo]ut of memory|MemoryError|Cannot allocate memory|"
                            r"[Ff]ailed to allocate|Insufficient Memory")
# A crash counts as out of memory once the rank's memory (seen, or predicted for its step) had
# reached this fraction of its budget.
OOM_EVIDENCE_FRACTION = 0.5


def _die_with_parent() -> None:
    # Linux: a rank gets SIGKILL if the supervisor dies, so no orphan outlives a killed supervisor.
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _remote_kill(host: str, pid: int, sig: int) -> None:
    # Fresh (no ControlMaster): over a dead link a multiplexed session hangs past ConnectTimeout.
    from mlx_train.fleet import ssh

    try:
        subprocess.run(ssh.argv(host, f"kill -{int(sig)} {int(pid)}", fresh=True),
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=15)
    except subprocess.TimeoutExpired:
        pass  # an unreachable host: its rank fails on its own once the ring is gone


@dataclass
class Outcome:
    status: str                 # done | stopped | failed | oom | user_error | interrupted
    step: int = 0
    reason: str = ""
    oom: Optional[dict] = None


@dataclass
class _Progress:
    """What the supervisor knows of the current attempt's progress."""
    step: int = 0
    finished: set = field(default_factory=set)
    status: str = "done"
    launched: bool = False
    last: float = field(default_factory=time.monotonic)


@dataclass
class _Proc:
    spec: RankProc
    popen: subprocess.Popen
    pump: threading.Thread = None
    code: Optional[int] = None


class Attempt:
    """One launch of every rank: the processes, their pumps and waiters."""

    def __init__(self, specs: List[RankProc], run: RunDir, inbox: "queue.Queue", attempt: int):
        self.run, self.inbox = run, inbox
        self.logs = {}
        self.hello: Dict[int, dict] = {}
        self.oom: Optional[dict] = None
        self.peaks: Dict[int, int] = {}
        self.budgets: Dict[int, int] = {}
        self.procs: List[_Proc] = []
        for spec in specs:
            for r in spec.ranks:
                self.logs[r] = run.log_path(r).open("a", buffering=1)
                self.logs[r].write(f"==== attempt {attempt} on {spec.host} ====\n")
            popen = subprocess.Popen(spec.argv, env=spec.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                                     start_new_session=True, preexec_fn=_die_with_parent)
            proc = _Proc(spec, popen)
            proc.pump = threading.Thread(target=self._pump, args=(proc,), daemon=True)
            proc.pump.start()
            threading.Thread(target=self._wait, args=(len(self.procs), proc), daemon=True).start()
            self.procs.append(proc)

    def _pump(self, proc: _Proc) -> None:
        for line in proc.popen.stdout:
            line = line.rstrip("\n")
            rank = proc.spec.ranks[0]
            if proc.spec.tagged:
                m = _TAGGED.match(line)
                if m:
                    rank, line = int(m.group(1)), m.group(2)
            msg = protocol.parse(line)
            if msg is None:
                self.logs.get(rank, self.logs[proc.spec.ranks[0]]).write(line + "\n")
                continue
            if msg["kind"] != "hb":
                self.logs[rank].write(line + "\n")
            self.inbox.put(("msg", rank, msg))

    def _wait(self, index: int, proc: _Proc) -> None:
        code = proc.popen.wait()
        proc.pump.join()  # every line the process wrote is in before its exit is reported
        self.inbox.put(("exit", index, code))

    def running(self) -> List[_Proc]:
        return [p for p in self.procs if p.popen.poll() is None]

    def stop(self) -> None:
        """SIGTERM every rank still running, then SIGKILL whatever is left after a grace period."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = self.running()
            if not alive:
                return
            for p in alive:
                self._signal(p, sig)
            deadline = time.monotonic() + STOP_GRACE_S
            for p in alive:
                try:
                    p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass

    def _signal(self, proc: _Proc, sig: int) -> None:
        if proc.spec.host not in (launch.LOCAL, "mpirun"):
            # A remote rank: the ssh client dying does not reliably end it, so signal it by the
            # pid it reported, on its own host (under a remote mpirun, each rank's own host).
            hosts = proc.spec.rank_hosts or [proc.spec.host] * len(proc.spec.ranks)
            kills = [(h, self.hello[r]["pid"]) for r, h in zip(proc.spec.ranks, hosts) if self.hello.get(r, {}).get("pid")]
            threads = [threading.Thread(target=_remote_kill, args=(h, pid, sig), daemon=True) for h, pid in kills]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=20)
        try:
            os.killpg(proc.popen.pid, sig)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        for f in self.logs.values():
            f.close()


class Supervisor:
    def __init__(self, cfg: TrainConfig, run: RunDir, hosts: List[Host], *, max_restarts: int,
                 stall_timeout: float, resume: bool = False, stop_after: Optional[int] = None,
                 view: Optional[ProgressView] = None, rank_wrapper: Optional[List[str]] = None,
                 reconfigure: Optional[Callable[[TrainConfig, Outcome], Optional[TrainConfig]]] = None):
        self.cfg, self.run, self.hosts = cfg, run, hosts
        self.max_restarts, self.stall_timeout = max_restarts, stall_timeout
        self.resume, self.stop_after = resume, stop_after
        self.view = view or ProgressView(cfg.steps, live=False)
        # Called after an out-of-memory failure: the configuration to relaunch with, or None.
        self.reconfigure = reconfigure
        self.inbox: "queue.Queue" = queue.Queue()
        self.rank_wrapper = rank_wrapper or []

    def _on_signal(self, signum, _frame) -> None:
        self.inbox.put(("signal", signum))

    def supervise(self) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._loop()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.view.close()

    def _loop(self) -> int:
        attempt, resume, oom_steps = 0, self.resume, 0
        while True:
            out = self._attempt(attempt, resume)
            if out.status in ("done", "stopped"):
                self.run.event("finish" if out.status == "done" else "stopped", step=out.step)
                self.view.note(f"[green]{'finished' if out.status == 'done' else 'stopped'} at step {out.step}[/]")
                return 0
            if out.status == "interrupted":
                self.run.event("interrupted", step=out.step)
                self.view.note("interrupted: every rank stopped; continue with --resume " + str(self.run.path))
                return 130
            if out.status == "user_error":
                self.run.event("failed", reason=out.reason)
                self.view.note(f"[red]error:[/] {out.reason}")
                return 2
            if out.status == "oom":
                new = self.reconfigure(self.cfg, out) if self.reconfigure else None
                if new is None:
                    reason = (f"out of memory ({out.reason}) and nothing smaller is left to try: use more devices, "
                              "a smaller model or --seq-len, or a larger --memory-budget")
                    self.run.event("failed", reason=reason)
                    self.view.note(f"[red]failed:[/] {reason}")
                    return 1
                self.cfg = new
                d = new.dist
                self.view.note(f"[yellow]out of memory:[/] {out.reason}; relaunching with {d.batch_size_per_device} "
                               f"per device x {d.gradient_accumulation} accumulation, checkpointing "
                               f"{'on' if new.grad_checkpoint else 'off'}, {new.precision}")
                # Memory recovery walks a finite ladder, so it does not use up --max-restarts.
                oom_steps += 1
            elif attempt - oom_steps >= self.max_restarts:
                reason = f"{out.reason}; gave up after {self.max_restarts} restarts"
                self.run.event("failed", reason=reason)
                self.view.note(f"[red]failed:[/] {reason}")
                return 1
            attempt += 1
            resume = True
            self.run.event("restart", attempt=attempt, reason=out.reason)
            if out.status != "oom":
                self.view.note(f"[yellow]restart {attempt - oom_steps}/{self.max_restarts}:[/] {out.reason}")

    def _attempt(self, attempt: int, resume: bool) -> Outcome:
        specs = launch.plan(self.cfg, self.hosts, str(self.run.path.resolve()), self.run.run_id, resume,
                            self.stop_after, self.rank_wrapper)
        group = Attempt(specs, self.run, self.inbox, attempt)
        try:
            return self._watch(group, attempt)
        finally:
            group.close()

    def _watch(self, group: Attempt, attempt: int) -> Outcome:
        """Sleep on the inbox until every process of the attempt has exited; say how it went."""
        p = _Progress()
        failure: Optional[Outcome] = None
        exited = 0
        while exited < len(group.procs):
            try:
                item = self.inbox.get(timeout=1.0)
            except queue.Empty:
                if failure is None and time.monotonic() - p.last > self.stall_timeout:
                    failure = Outcome("failed", p.step, f"no progress from the ranks for {self.stall_timeout:.0f} s")
                    self.run.event("stall", step=p.step, timeout_s=self.stall_timeout)
                    group.stop()
                continue
            if item[0] == "signal":
                if failure is None or failure.status != "interrupted":
                    failure = Outcome("interrupted", p.step, "interrupted")
                    group.stop()
            elif item[0] == "exit":
                exited += 1
                proc, code = group.procs[item[1]], item[2]
                for r in proc.spec.ranks if not proc.spec.tagged else [None]:
                    self.run.event("rank_exit", rank=r, host=proc.spec.host,
                                   **({"signal": -code} if code < 0 else {"code": code}))
                if failure is None and (code != 0 or not set(proc.spec.ranks) <= p.finished):
                    failure = self._classify(group, proc, code, p.step)
                    group.stop()
            else:
                self._on_message(group, attempt, item[1], item[2], p)
        return failure or Outcome(p.status, p.step)

    def _on_message(self, group: Attempt, attempt: int, rank: int, msg: dict, p: "_Progress") -> None:
        k = msg["kind"]
        body = {key: v for key, v in msg.items() if key != "kind"}
        if k in ("hb", "metrics", "resumed"):
            p.last = time.monotonic()
        if k == "hb":
            group.peaks[rank] = msg.get("peak", 0)
            if rank == 0:
                p.step = max(p.step, msg["step"])
        elif k == "hello":
            group.hello[rank] = msg
            if len(group.hello) == self.cfg.dist.num_devices and not p.launched:
                p.launched = True
                d = self.cfg.dist
                ranks = [{"rank": r, "host": h["host"], "pid": h["pid"]} for r, h in sorted(group.hello.items())]
                self.run.event("launch", attempt=attempt, backend=d.backend, ranks=ranks, devices=d.num_devices,
                               global_batch=d.global_batch_size, batch_size_per_device=d.batch_size_per_device,
                               gradient_accumulation=d.gradient_accumulation)
        elif k == "metrics":
            body.update(time=time.time(), attempt=attempt)
            self.run.append(self.run.metrics_path, body)
            self.view.metrics(body)
        elif k == "resumed":
            self.run.event("resume", step=msg["step"])
            p.step = msg["step"]
        elif k == "event" and msg["event"] == "resume_empty":
            self.run.event("resume", step=0, note="no checkpoint yet: starting from scratch")
        elif k == "event":
            fields = {key: v for key, v in body.items() if key != "event"}
            self.run.event(msg["event"], rank=rank, **fields)
            self.view.note(f"[yellow]warning:[/] {msg['event']} {fields}")
        elif k == "checkpoint":
            self.run.event("checkpoint", step=msg["step"])
        elif k == "budget":
            group.budgets[rank] = msg["budget"]
        elif k == "oom":
            group.oom = body
        elif k in ("done", "stopped"):
            p.finished.add(rank)
            p.step, p.status = msg["step"], k

    def _classify(self, group: Attempt, proc: _Proc, code: int, step: int) -> Outcome:
        where = f"rank {proc.spec.ranks[0]}" if len(proc.spec.ranks) == 1 else "mpirun"
        what = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        if code == protocol.EXIT_USER_ERROR:
            tail = self._log_tail(proc.spec.ranks[0])
            return Outcome("user_error", step, tail or f"{where} rejected its input ({what})")
        if code == protocol.EXIT_OUT_OF_MEMORY:
            return Outcome("oom", step, f"{where} passed its memory budget", oom=group.oom)
        evidence = self._memory_evidence(group, proc, code)
        if evidence:
            return Outcome("oom", step, f"{where} {what} {evidence}",
                           oom={"rank": proc.spec.ranks[0], "code": code, "evidence": evidence})
        if code == 0:
            return Outcome("failed", step, f"{where} exited before finishing")
        return Outcome("failed", step, f"{where} {what}")

    def _memory_evidence(self, group: Attempt, proc: _Proc, code: int) -> str:
        """Why this crash looks like running out of memory, or "" when it does not."""
        rank = proc.spec.ranks[0]
        sig = -code if code < 0 else code - 128 if code > 128 else 0
        crashed = sig in {int(s) for s in _CRASH_SIGNALS}
        alloc = self._attempt_log(rank)
        alloc_failed = bool(_ALLOC_FAILURE.search(alloc))
        if not (crashed or alloc_failed):
            return ""
        budget = group.budgets.get(rank) or self.cfg.memory_budget
        if not budget:
            return ""
        seen = group.peaks.get(rank, 0)
        predicted = 0
        if self.cfg.model.name == "gpt":
            from mlx_train.planning.planner import MemoryOptimizer

            predicted = MemoryOptimizer.estimate(self.cfg)
        if max(seen, predicted) < OOM_EVIDENCE_FRACTION * budget:
            return ""
        what = "an allocation failure in its log" if alloc_failed else "a crash"
        return (f"({what} with memory at {max(seen, predicted) / 2**20:.0f} MiB "
                f"{'predicted' if predicted > seen else 'seen'} of a {budget / 2**20:.0f} MiB budget)")

    def _attempt_log(self, rank: int) -> str:
        """This attempt's part of the rank's log."""
        try:
            text = self.run.log_path(rank).read_text(errors="replace")
        except OSError:
            return ""
        return text.rsplit("==== attempt ", 1)[-1]

    def _log_tail(self, rank: int) -> str:
        try:
            lines = self.run.log_path(rank).read_text().splitlines()
        except OSError:
            return ""
        errors = [l for l in lines if l.startswith("error: ")]
        return errors[-1][len("error: "):] if errors else ""
