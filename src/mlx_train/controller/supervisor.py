"""The supervisor: owns the rank processes of a run, restarts them from the last checkpoint.

It knows each rank's exit as it happens (one waiter thread per process, blocked in wait()), reads
every rank's output through a pipe (one pump thread per process), and sleeps on a queue in
between. A rank that dies takes its peers down with it (they would hang or fail in the next
all_sum anyway); the whole group is then relaunched with --resume, up to --max-restarts. A rank
that goes quiet is found by the watchdog (watchdog.py), which the queue's one-second timeout
consults. What a rank says is typed in protocol.py; each kind has one handler below.

Nothing here waits without a bound: an exit is learnt from wait(), never from the pipe's end (a
process the rank spawned, e.g. an ssh ControlMaster, can hold the pipe open forever).
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import os
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from mlx_train.controller import divergence, elastic, keepalive, launch

from mlx_train import protocol
from mlx_train.config import Split, TrainConfig
from mlx_train.controller.console import ProgressView
from mlx_train.controller.launch import Host, RankProc
from mlx_train.controller.watchdog import CHECKPOINT, Allowances, Stall, Watchdog
from mlx_train.errors import UserError
from mlx_train.planning.oom import CrashFacts, OomPolicy
from mlx_train.rank import dataskip
from mlx_train.rundir import RunDir

_TAGGED = re.compile(r"^\[\d+,(\d+)\]<(?:stdout|stderr)>:\s?(.*)$")
STOP_GRACE_S = 5.0
# After a process exits, how long its pipe may still deliver what it wrote before it died.
DRAIN_S = 2.0
# Skipped (non-finite) steps in a row after which the group restarts from its last checkpoint.
ROLLBACK_AFTER_BAD_STEPS = protocol.ROLLBACK_AFTER_BAD_STEPS


class Status(enum.Enum):
    DONE = "done"
    STOPPED = "stopped"            # --stop-after reached, checkpointed
    FAILED = "failed"
    OOM = "oom"
    USER_ERROR = "user_error"
    INTERRUPTED = "interrupted"
    RESIZE = "resize"              # an excluded host is back: relaunch from the checkpoint just written


@dataclass
class Outcome:
    status: Status
    step: int = 0
    reason: str = ""
    oom: Optional[dict] = None
    host: Optional[str] = None     # the host that ended the attempt, when one did (elastic.py)


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


def _stopped_locally(pid: int) -> bool:
    """Is this local process stopped (SIGSTOP, a debugger)? False where /proc cannot tell."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def classify_exit(cfg: TrainConfig, oom: OomPolicy, facts: CrashFacts, where: str, step: int,
                  finished: bool, user_error: str = "") -> Optional[Outcome]:
    """How one process's exit ends the attempt, or None when it ended as it should (done, stopped).
    `where` names it ("rank 1", "mpirun"); `user_error` is the rank's own one-line error, if any."""
    code = facts.code
    if code == 0 and finished:
        return None
    what = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    if code == protocol.EXIT_USER_ERROR:
        return Outcome(Status.USER_ERROR, step, user_error or f"{where} rejected its input ({what})")
    verdict = oom.judge(cfg, facts)
    if verdict:
        return Outcome(Status.OOM, step, f"{where} {verdict.reason}", oom=verdict.details)
    if code == 0:
        return Outcome(Status.FAILED, step, f"{where} exited before finishing")
    return Outcome(Status.FAILED, step, f"{where} {what}")


@dataclass
class _Proc:
    spec: RankProc
    popen: subprocess.Popen
    drained: threading.Event = field(default_factory=threading.Event)
    wake: tuple = field(default_factory=os.pipe)  # _wait writes here so the pump starts its bounded drain


class Attempt:
    """One launch of every rank: the processes, their pumps and waiters.

    Everything it puts in the inbox carries its number, so a straggler of an earlier attempt
    (a pump still draining) is never mistaken for the current one."""

    def __init__(self, specs: List[RankProc], run: RunDir, inbox: "queue.Queue", number: int):
        self.run, self.inbox, self.number = run, inbox, number
        self.logs = {}
        self.hello: Dict[int, protocol.Hello] = {}
        self.oom: Optional[dict] = None
        self.peaks: Dict[int, int] = {}
        self.budgets: Dict[int, int] = {}
        self.procs: List[_Proc] = []
        self.keepalive = keepalive.Keepalive()  # the ranks' stdin also carries a beat (keepalive.py)
        for spec in specs:
            for r in spec.ranks:
                self.logs[r] = run.log_path(r).open("a", buffering=1)
                self.logs[r].write(f"==== attempt {number} on {spec.host} ====\n")
            try:
                # stdin: a pipe kept open that carries only the beat, the rank's lifeline (rank/lifeline.py).
                popen = subprocess.Popen(spec.argv, env=spec.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, bufsize=0, start_new_session=True,
                                         preexec_fn=_die_with_parent)
            except OSError as exc:
                self.stop()
                self.close()
                raise UserError(f"cannot start ranks {spec.ranks} on {spec.host} ({spec.argv[0]}: {exc.strerror}): "
                                "check --rank-wrapper and the interpreter path") from None
            proc = _Proc(spec, popen)
            self.keepalive.add(popen.stdin)
            threading.Thread(target=self._pump, args=(proc,), daemon=True).start()
            threading.Thread(target=self._wait, args=(len(self.procs), proc), daemon=True).start()
            self.procs.append(proc)

    @property
    def ranks(self) -> List[int]:
        return [r for p in self.procs for r in p.spec.ranks]

    def _pump(self, proc: _Proc) -> None:
        out, wake = proc.popen.stdout.fileno(), proc.wake[0]
        buf, deadline = b"", None
        try:
            while True:
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    break  # someone else holds the pipe open: what the rank wrote is in by now
                ready, _, _ = select.select([out, wake], [], [], wait)
                if wake in ready and deadline is None:
                    deadline = time.monotonic() + DRAIN_S
                if out not in ready:
                    continue
                chunk = os.read(out, 1 << 16)
                if not chunk:
                    break
                *lines, buf = (buf + chunk).split(b"\n")
                for line in lines:
                    self._line(proc, line.decode(errors="replace").rstrip("\r"))
            if buf:
                self._line(proc, buf.decode(errors="replace"))
        finally:
            proc.drained.set()
            proc.popen.stdout.close()
            os.close(wake)  # the write end is _wait's

    def _line(self, proc: _Proc, line: str) -> None:
        rank = proc.spec.ranks[0]
        if proc.spec.tagged:
            m = _TAGGED.match(line)
            if m:
                rank, line = int(m.group(1)), m.group(2)
        log = self.logs.get(rank, self.logs[proc.spec.ranks[0]])
        if log.closed:
            return  # a straggler of an attempt that is over
        msg = protocol.parse(line)
        if msg is None:
            _append(log, line + "\n")
            return
        if isinstance(msg, protocol.Malformed):
            _append(log, f"[supervisor] ignored a malformed protocol line ({msg.why}): {line}\n")
            return
        if not isinstance(msg, protocol.Heartbeat):
            _append(log, line + "\n")
        self.inbox.put(("msg", self.number, rank, msg))

    def _wait(self, index: int, proc: _Proc) -> None:
        code = proc.popen.wait()
        try:
            os.write(proc.wake[1], b"x")
        except OSError:
            pass  # the pump already met the pipe's end and is gone
        finally:
            os.close(proc.wake[1])
        # Every line the process wrote is in before its exit is reported, within a bound.
        proc.drained.wait(DRAIN_S + 1.0)
        self.inbox.put(("exit", self.number, index, code))

    def running(self) -> List[_Proc]:
        return [p for p in self.procs if p.popen.poll() is None]

    def stop(self) -> None:
        """SIGTERM every rank still running, then SIGKILL whatever is left after a grace period,
        and finally whatever an exited rank left behind in its process group (a child of it
        can hold the rank's output pipe open)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = self.running()
            if not alive:
                break
            for p in alive:
                self._signal(p, sig)
            deadline = time.monotonic() + STOP_GRACE_S
            for p in alive:
                try:
                    p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        self.sweep()

    def sweep(self) -> None:
        """SIGKILL what local ranks left in their process groups (e.g. a child holding the pipe).
        Remote ranks' groups hold only ssh, whose ControlMaster may serve other sessions."""
        for p in self.procs:
            if p.spec.host == launch.LOCAL:
                _killpg(p.popen.pid, signal.SIGKILL)

    def _signal(self, proc: _Proc, sig: int) -> None:
        if proc.spec.host not in (launch.LOCAL, "mpirun"):
            # A remote rank: the ssh client dying does not reliably end it, so signal it by the
            # pid it reported, on its own host (under a remote mpirun, each rank's own host).
            hosts = proc.spec.rank_hosts or [proc.spec.host] * len(proc.spec.ranks)
            kills = [(h, self.hello[r].pid) for r, h in zip(proc.spec.ranks, hosts) if r in self.hello]
            threads = [threading.Thread(target=_remote_kill, args=(h, pid, sig), daemon=True) for h, pid in kills]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=20)
        _killpg(proc.popen.pid, sig)
        if sig == signal.SIGTERM:
            _killpg(proc.popen.pid, signal.SIGCONT)  # a stopped rank handles SIGTERM only once continued

    def host_of(self, rank: int) -> str:
        for p in self.procs:
            if rank in p.spec.ranks:
                return (p.spec.rank_hosts or [p.spec.host] * len(p.spec.ranks))[p.spec.ranks.index(rank)]
        return "?"

    def close(self) -> None:
        self.keepalive.stop()
        for f in self.logs.values():
            f.close()
        for p in self.procs:
            p.popen.stdin.close()  # the lifeline: a rank still running anywhere ends now


def _append(log, text: str) -> None:
    try:
        log.write(text)
    except OSError:
        pass  # a full disk loses log text, never a message (the pump must go on reading)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class _State:
    """What the supervisor knows of the current attempt."""
    group: Attempt
    dog: Watchdog
    step: int = 0
    finished: set = field(default_factory=set)
    status: Status = Status.DONE
    launched: bool = False
    checksums: Optional[divergence.Reports] = None  # each rank's own checksum reports (the divergence check)


class Supervisor:
    def __init__(self, cfg: TrainConfig, run: RunDir, hosts: List[Host], *, max_restarts: int,
                 stall_timeout: Optional[float], resume: bool = False, stop_after: Optional[int] = None,
                 view: Optional[ProgressView] = None, rank_wrapper: Optional[List[str]] = None,
                 oom: Optional[OomPolicy] = None, allowances: Allowances = Allowances(),
                 min_devices: Optional[int] = None, max_devices: Optional[int] = None):
        self.cfg, self.run, self.hosts = cfg, run, hosts
        self.members = elastic.Membership(hosts, min_devices, max_devices)
        # stall_timeout None: the watchdog adapts to the run's pace (watchdog.py).
        self.max_restarts, self.stall_timeout, self.allowances = max_restarts, stall_timeout, allowances
        self.resume, self.stop_after = resume, stop_after
        self.view = view or ProgressView(cfg.steps, live=False)
        # Without a policy (the tuner's trials) out-of-memory is recognised but never reconfigured.
        self.oom = oom or OomPolicy(recover=False)
        self.inbox: "queue.Queue" = queue.Queue()
        self.agreement = divergence.Agreement()
        self.rank_wrapper = rank_wrapper or []
        self.report = None  # experiment trackers (reporting.Reporters), fed what metrics.jsonl gets
        self.handlers = {
            protocol.Hello: self._on_hello, protocol.Budget: self._on_budget, protocol.Start: self._on_start,
            protocol.Heartbeat: self._on_heartbeat, protocol.Phase: self._on_phase,
            protocol.Metrics: self._on_metrics, protocol.Resumed: self._on_resumed,
            protocol.Checkpoint: self._on_checkpoint, protocol.Checksum: self._on_checksum,
            protocol.RankWarning: self._on_warning,
            protocol.BadStep: self._on_bad_step, protocol.OutOfMemory: self._on_oom,
            protocol.Done: self._on_end, protocol.Stopped: self._on_end,
        }

    def _on_signal(self, signum, _frame) -> None:
        self.inbox.put(("signal", signum))

    def supervise(self) -> int:
        with self.run.lock():
            old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                return self._loop()
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
                self.view.close()

    def _finish(self, event: str, note: str, code: int, **fields) -> int:
        self.run.event(event, **fields)
        self.view.note(note)
        return code

    def _loop(self) -> int:
        attempt, resume, oom_steps = 0, self.resume, 0
        while True:
            out = self._attempt(attempt, resume)
            if out.status in (Status.DONE, Status.STOPPED):
                done = out.status is Status.DONE
                return self._finish("finish" if done else "stopped",
                                    f"[green]{'finished' if done else 'stopped'} at step {out.step}[/]", 0, step=out.step)
            if out.status is Status.INTERRUPTED:
                return self._finish("interrupted", "interrupted: every rank stopped; continue with --resume "
                                    f"{self.run.path}", 130, step=out.step)
            if out.status is Status.USER_ERROR:
                return self._finish("failed", f"[red]error:[/] {out.reason}", 2, reason=out.reason)
            if out.status is Status.RESIZE:
                oom_steps += 1  # taking a host back is no failure: it uses up no restart
            elif out.status is Status.OOM:
                if not self._reconfigure(out):
                    reason = (f"out of memory ({out.reason}) and nothing smaller is left to try: use more devices, "
                              "a smaller model or --seq-len, or a larger --memory-budget")
                    return self._finish("failed", f"[red]failed:[/] {reason}", 1, reason=reason)
                # Memory recovery walks a finite ladder, so it does not use up --max-restarts.
                oom_steps += 1
            elif attempt - oom_steps >= self.max_restarts:
                reason = f"{out.reason}; gave up after {self.max_restarts} restarts"
                return self._finish("failed", f"[red]failed:[/] {reason}", 1, reason=reason)
            attempt += 1
            resume = True
            self.run.event("restart", attempt=attempt, reason=out.reason)
            if out.status not in (Status.OOM, Status.RESIZE):
                self.view.note(f"[yellow]restart {attempt - oom_steps}/{self.max_restarts}:[/] {out.reason}")
            if self.members.enabled:
                self._membership(out)

    def _membership(self, out: Outcome) -> None:
        """Elastic runs (--min-devices): exclude or re-admit hosts before the relaunch, and re-split
        the global batch over the devices that remain (elastic.py)."""
        m = self.members
        before = [h.name for h in m.active]
        if out.status is Status.RESIZE:
            for h in m.readmittable():
                m.readmit(h)
                self.run.event("readmit", host=h.name)
                self.view.note(f"[green]readmit {h.name}:[/] it answers again")
        else:
            suspects = []
            blamed = m.blame(out.host)
            if blamed:
                suspects += [(h, f"{blamed} ({out.reason})") for h in m.active if h.name == out.host]
            suspects += [(h, f"unreachable at relaunch: {why}") for h, why in m.unreachable()]
            for h, why in dict((h.name, (h, w)) for h, w in suspects).values():
                if not m.can_exclude(h):
                    self.view.note(f"[yellow]{h.name} {why}; kept: without it fewer than --min-devices "
                                   f"{m.min_devices} remain[/]")
                    continue
                m.exclude(h, why)
                self.run.event("exclude", host=h.name, reason=why)
                self.view.note(f"[yellow]exclude {h.name}:[/] {why}")
        if [h.name for h in m.active] == before:
            return
        try:
            new = elastic.resplit(self.cfg, m.active)
        except UserError as exc:
            self.view.note(f"[yellow]cannot resize:[/] {exc}")
            return
        split = Split.of(new)
        self.run.event("resize", hosts=[h.name for h in m.active], **split.event())
        self.view.note(f"[yellow]resize:[/] {split.devices} devices ({', '.join(h.name for h in m.active)}), "
                       f"{split}, global batch {split.global_batch}")
        new.to_yaml(self.run.config_path)
        self.cfg, self.hosts = new, list(m.active)

    def _reconfigure(self, out: Outcome) -> bool:
        """After out-of-memory: record it, take the policy's next configuration; False when none is left."""
        self.run.event("oom", **{"step": out.step, "reason": out.reason, **(out.oom or {})})
        new = self.oom.next_config(self.cfg)
        if new is None:
            return False
        old, split = Split.of(self.cfg), Split.of(new)
        self.run.event("reconfigure", old=old.event(), new=split.event(), global_batch=split.global_batch)
        new.to_yaml(self.run.config_path)
        self.cfg = new
        self.view.note(f"[yellow]out of memory:[/] {out.reason}; relaunching with {split}")
        return True

    def _attempt(self, attempt: int, resume: bool) -> Outcome:
        specs = launch.plan(self.cfg, self.hosts, str(self.run.path.resolve()), self.run.run_id, resume,
                            self.stop_after, self.rank_wrapper)
        try:
            group = Attempt(specs, self.run, self.inbox, attempt)
        except UserError as exc:
            self.run.event("failed", reason=str(exc))
            raise
        try:
            return self._watch(_State(group, Watchdog(group.ranks, self.stall_timeout, self.allowances)))
        finally:
            group.sweep()
            group.close()

    def _watch(self, s: _State) -> Outcome:
        """Sleep on the inbox until every process of the attempt has exited; say how it went."""
        group = s.group
        failure: Optional[Outcome] = None
        reported, give_up, next_check = set(), None, time.monotonic() + 1.0

        def end(outcome: Outcome) -> None:
            nonlocal failure, give_up
            failure = outcome
            group.stop()
            give_up = time.monotonic() + DRAIN_S + 5.0

        while len(reported) < len(group.procs):
            try:
                item = self.inbox.get(timeout=1.0)
            except queue.Empty:
                item = None
            now = time.monotonic()
            if now >= next_check:  # once a second, however busy the inbox
                next_check = now + 1.0
                stall = s.dog.check() if failure is None else None
                if self.members.enabled:
                    self.members.tick()  # probes excluded hosts in the background
                if stall:
                    end(self._stalled(s, stall))
                elif give_up is not None and now > give_up:
                    # stop() has SIGKILLed every process and waited; an exit still unreported
                    # would wait on something outside our control: do not wait for it.
                    self.run.event("unaccounted", ranks=[r for i, p in enumerate(group.procs) if i not in reported
                                                         for r in p.spec.ranks])
                    break
            if item is None:
                continue
            if item[0] == "signal":
                if failure is None or failure.status is not Status.INTERRUPTED:
                    end(Outcome(Status.INTERRUPTED, s.step, "interrupted"))
            elif item[1] != group.number:
                continue  # a late line or exit of an earlier attempt
            elif item[0] == "exit":
                reported.add(item[2])
                proc, code = group.procs[item[2]], item[3]
                for r in proc.spec.ranks if not proc.spec.tagged else [None]:
                    self.run.event("rank_exit", rank=r, host=proc.spec.host,
                                   **({"signal": -code} if code < 0 else {"code": code}))
                verdict = self._exit_outcome(s, proc, code) if failure is None else None
                if verdict is not None:
                    end(verdict)
            else:
                verdict = self._dispatch(s, item[2], item[3])
                if verdict is not None and failure is None:
                    end(verdict)
        return failure or Outcome(s.status, s.step)

    def _dispatch(self, s: _State, rank: int, msg: protocol.Message) -> Optional[Outcome]:
        """Hand `msg` to its kind's handler; an Outcome back means: end this attempt so."""
        s.dog.heard(rank)
        handler = self.handlers.get(type(msg))
        try:
            if handler is None:
                raise TypeError(f"no handler for {type(msg).__name__}")
            return handler(s, rank, msg)
        except Exception as exc:  # a rank's message must never bring the supervisor down
            log = s.group.logs.get(rank)
            if log is not None:
                log.write(f"[supervisor] could not handle {msg!r}: {exc}\n")
            return None

    def _exit_outcome(self, s: _State, proc: _Proc, code: int) -> Optional[Outcome]:
        rank = proc.spec.ranks[0]
        where = f"rank {rank}" if len(proc.spec.ranks) == 1 else "mpirun"
        facts = CrashFacts(rank, code, self._attempt_log(rank), s.group.peaks.get(rank, 0),
                           s.group.budgets.get(rank, 0), s.group.oom)
        out = classify_exit(self.cfg, self.oom, facts, where, s.step, set(proc.spec.ranks) <= s.finished,
                            self._log_error(rank) if code == protocol.EXIT_USER_ERROR else "")
        if out is not None and len(proc.spec.ranks) == 1:
            out.host = s.group.host_of(rank)
        return out

    def _stalled(self, s: _State, stall: Stall) -> Outcome:
        # Peers of a frozen rank wait in its collective and go quiet too; a local process that the
        # OS shows stopped is the certain culprit, otherwise the one quiet the longest.
        suspect = stall.rank
        for r in stall.quiet:
            hello = s.group.hello.get(r)
            if hello and s.group.host_of(r) == launch.LOCAL and _stopped_locally(hello.pid):
                suspect = r
                break
        host = s.group.host_of(suspect)
        step = s.dog.ranks[suspect].step
        self.run.event("stall", rank=suspect, host=host, step=step, phase=stall.phase,
                       quiet_s=round(stall.quiet_s, 1), timeout_s=stall.timeout_s, quiet=stall.quiet)
        return Outcome(Status.FAILED, s.step, f"no progress from rank {suspect} on {host} for {stall.quiet_s:.0f} s "
                                              f"(allowed {stall.timeout_s:.0f} s after its {stall.phase})", host=host)

    # -- one handler per message kind ---------------------------------------------------------------
    def _on_hello(self, s: _State, rank: int, msg: protocol.Hello) -> None:
        s.group.hello[rank] = msg
        if len(s.group.hello) == self.cfg.dist.num_devices and not s.launched:
            s.launched = True
            ranks = [{"rank": r, "host": h.host, "pid": h.pid} for r, h in sorted(s.group.hello.items())]
            self.run.event("launch", attempt=s.group.number, backend=self.cfg.dist.backend, ranks=ranks,
                           **Split.of(self.cfg).event())

    def _on_budget(self, s: _State, rank: int, msg: protocol.Budget) -> None:
        s.group.budgets[rank] = msg.budget

    def _on_start(self, s: _State, rank: int, msg: protocol.Start) -> None:
        s.dog.started(rank, msg.step)  # start-up is over: the first step's allowance begins
        s.step = max(s.step, msg.step)

    def _on_heartbeat(self, s: _State, rank: int, msg: protocol.Heartbeat) -> None:
        s.group.peaks[rank] = msg.peak
        s.dog.stepped(rank, msg.step, msg.step_s)
        s.step = max(s.step, msg.step)

    def _on_phase(self, s: _State, rank: int, msg: protocol.Phase) -> None:
        s.dog.phase(rank, msg.name, msg.step, msg.done)

    def _on_metrics(self, s: _State, rank: int, msg: protocol.Metrics) -> None:
        record = {**msg.fields(), "time": time.time(), "attempt": s.group.number}
        self.run.append(self.run.metrics_path, record)
        if self.report is not None:
            self.report.log(msg.step, record)
        self.view.metrics(record)

    def _on_checksum(self, s: _State, rank: int, msg: protocol.Checksum) -> Optional[Outcome]:
        # Judged only on one step's complete set of the ranks' own reports, never on the lists
        # rank 0 gathers: a collective a peer died in can leave stale values there (divergence.Reports).
        if s.checksums is None:
            s.checksums = divergence.Reports(s.group.ranks)
        sums = s.checksums.add(msg.step, rank, msg.value)
        return None if sums is None else self._diverged(s, msg.step, sums)

    def _diverged(self, s: _State, step: int, checksums: Optional[list]) -> Optional[Outcome]:
        odd = divergence.odd_ranks(checksums or [])
        if not odd:
            return None
        back = self.agreement.rollback_step()
        hosts = [s.group.host_of(r) for r in odd]
        self.run.event("diverged", rank=odd[0], ranks=odd, hosts=hosts, step=step, param_checksum=checksums,
                       rollback_to=back)
        where = ", ".join(f"rank {r} on {h}" for r, h in zip(odd, hosts))
        return Outcome(Status.FAILED, s.step, f"{where} diverged from the others' parameters at step {step}: rolling "
                                              "back to the newest checkpoint written while all ranks agreed"
                                              + (f" (step {back})" if back is not None else ""))

    def _on_resumed(self, s: _State, rank: int, msg: protocol.Resumed) -> None:
        if msg.checkpoint is None:
            self.run.event("resume", step=0, note="no checkpoint yet: starting from scratch")
        else:
            self.run.event("resume", step=msg.step, checkpoint=msg.checkpoint)
        s.step = msg.step

    def _on_checkpoint(self, s: _State, rank: int, msg: protocol.Checkpoint) -> Optional[Outcome]:
        extra = {k: v for k, v in (("agreed", msg.agreed), ("stall_s", msg.stall_s), ("write_s", msg.write_s))
                 if v is not None}
        self.run.event("checkpoint", step=msg.step, **extra)
        if msg.write_s is not None:
            # Written in the background: the rank's checkpoint phases are only its waits for a write,
            # which last up to a whole write. Its allowance learns from the writes themselves.
            s.dog.durations[CHECKPOINT].append(msg.write_s)
        self.agreement.checkpoint(msg.step, msg.agreed)
        if not self.members.enabled:
            return None
        self.members.progressed()
        back = self.members.readmittable()
        if back:  # relaunch from this checkpoint with the host(s) back in
            return Outcome(Status.RESIZE, msg.step, f"{', '.join(h.name for h in back)} answer again: re-admitting "
                                                    f"at the checkpoint of step {msg.step}")
        return None

    def _on_warning(self, s: _State, rank: int, msg: protocol.RankWarning) -> None:
        self.run.event(msg.event, rank=rank, **msg.details)
        self.view.note(f"[yellow]warning:[/] {msg.event}: {msg.details.get('reason') or msg.details}")

    def _on_bad_step(self, s: _State, rank: int, msg: protocol.BadStep) -> Optional[Outcome]:
        self.run.event("bad_step", **msg.fields())
        spiked = msg.loss_limit is not None and msg.loss > msg.loss_limit
        self.view.note(f"[yellow]skipped step {msg.step}:[/] loss {msg.loss}"
                       + (f" above the --loss-spike limit {msg.loss_limit:.4g}" if spiked else "")
                       + f", gradient norm {msg.grad_norm} ({msg.in_a_row} in a row)")
        if msg.in_a_row < ROLLBACK_AFTER_BAD_STEPS:
            return None
        # Skipping does not heal weights that already went bad: go back to the last checkpoint, and
        # step past the data of the bad steps, which a replay would meet again (rank/dataskip.py).
        first, last = msg.step - msg.in_a_row, msg.step - 1  # optimizer steps counted from 0
        old = self.cfg.skip_data
        window = dataskip.window_for(first, last)
        self.cfg = dataclasses.replace(self.cfg, skip_data=[*old, window])
        self.cfg.to_yaml(self.run.config_path)  # a later --resume steps past it too
        data = [dataskip.data_step(old, first), dataskip.data_step(old, last)]
        self.run.event("rollback", step=msg.step, bad_steps=msg.in_a_row, data_steps=data, skip=window)
        return Outcome(Status.FAILED, s.step, f"{msg.in_a_row} steps in a row with a non-finite loss or gradient "
                                              f"norm (or a loss spike): rolling back to the last checkpoint, past "
                                              f"the data of steps {first + 1}-{last + 1} (data steps {data[0]}-{data[1]})")

    def _on_oom(self, s: _State, rank: int, msg: protocol.OutOfMemory) -> None:
        s.group.oom = msg.fields()

    def _on_end(self, s: _State, rank: int, msg) -> None:
        s.finished.add(rank)
        s.dog.ranks.pop(rank, None)  # a finished rank is quiet by right
        s.step, s.status = msg.step, Status.DONE if isinstance(msg, protocol.Done) else Status.STOPPED

    # -- the rank's log ------------------------------------------------------------------------------
    def _attempt_log(self, rank: int) -> str:
        """This attempt's part of the rank's log."""
        try:
            text = self.run.log_path(rank).read_text(errors="replace")
        except OSError:
            return ""
        return text.rsplit("==== attempt ", 1)[-1]

    def _log_error(self, rank: int) -> str:
        try:
            lines = self.run.log_path(rank).read_text().splitlines()
        except OSError:
            return ""
        errors = [l for l in lines if l.startswith("error: ")]
        return errors[-1][len("error: "):] if errors else ""
