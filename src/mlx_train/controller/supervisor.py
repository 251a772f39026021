"""The supervisor: keeps a run's rank group going, from launch to its end, restarting from the last checkpoint.

It launches a rank group (group.py) and sleeps on one queue, where the group's pumps and waiters put
what the ranks say and how they exit; a rank that goes quiet is found by the watchdog (watchdog.py),
which the queue's one-second timeout consults. What a rank says is typed in protocol.py; each kind
has one handler below. A rank that dies takes its peers down with it (they would hang or fail in the
next all_sum anyway): the attempt ends with a Status, and the run loop (`_loop`) decides from it
whether the run ends or the whole group is relaunched with --resume (the transitions are beside
Status). Logged steps go to the sinks (reporting.py); config.yaml changes go through RunDir.save_config.
"""

from __future__ import annotations

import dataclasses
import enum
import queue
import shlex
import signal
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from mlx_train.controller import divergence, elastic, launch, reporting

from mlx_train import protocol
from mlx_train.config import RunOptions, Split, TrainConfig
from mlx_train.controller.console import ProgressView
from mlx_train.controller.group import DRAIN_S, RankGroup, _Proc
from mlx_train.controller.launch import Host
from mlx_train.controller.watchdog import CHECKPOINT, Allowances, Stall, Watchdog
from mlx_train.errors import UserError
from mlx_train.events import Event
from mlx_train.planning.oom import CrashFacts, OomPolicy
from mlx_train.rank import dataskip
from mlx_train.rundir import RunDir

# Skipped (non-finite) steps in a row after which the group restarts from its last checkpoint.
ROLLBACK_AFTER_BAD_STEPS = protocol.ROLLBACK_AFTER_BAD_STEPS


class Status(enum.Enum):
    """How an attempt ended, and what the run loop (Supervisor._loop) does next:

        DONE, STOPPED  the run ends: exit 0 ("finish", "stopped")
        INTERRUPTED    the run ends: exit 130 (SIGINT or SIGTERM; every rank stopped, --resume continues)
        USER_ERROR     the run ends: exit 2 (a rank rejected its input; a relaunch would too)
        OOM            relaunch with the OOM policy's next, smaller split, using no restart (a finite
                       ladder); the run ends, exit 1, when nothing smaller is left
        RESIZE         relaunch with the re-admitted hosts, using no restart
        FAILED         relaunch while restarts are left (--max-restarts); else the run ends, exit 1

    Every relaunch resumes from the newest checkpoint, and in an elastic run (--min-devices) first
    decides which hosts take part (_membership)."""
    DONE = "done"
    STOPPED = "stopped"            # --stop-after reached, checkpointed
    FAILED = "failed"
    OOM = "oom"
    USER_ERROR = "user_error"
    INTERRUPTED = "interrupted"
    RESIZE = "resize"              # an excluded host is back: relaunch from the checkpoint just written


# Relaunches that use up no restart.
_FREE = (Status.OOM, Status.RESIZE)


@dataclass
class Outcome:
    status: Status
    step: int = 0
    reason: str = ""
    oom: Optional[dict] = None
    host: Optional[str] = None     # the host that ended the attempt, when one did (elastic.py)


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


@dataclass(frozen=True)
class Supervision:
    """How a run is launched and kept going: the options of `train` that shape supervision, not training."""
    max_restarts: int                        # relaunches after a failure before giving up
    stall_timeout: Optional[float] = None    # None: the watchdog adapts to the run's pace (watchdog.py)
    resume: bool = False                     # the first launch resumes from the run's checkpoint too
    stop_after: Optional[int] = None         # checkpoint and stop after this step
    rank_wrapper: Tuple[str, ...] = ()       # prefixes each local rank's command (taskset, prlimit)
    min_devices: Optional[int] = None        # elastic (elastic.py): set, a failing host may be excluded
    max_devices: Optional[int] = None
    allowances: Allowances = Allowances()

    @classmethod
    def of(cls, opts: RunOptions) -> "Supervision":
        return cls(opts.max_restarts, opts.stall_timeout, bool(opts.resume), opts.stop_after,
                   tuple(shlex.split(opts.rank_wrapper)) if opts.rank_wrapper else (), opts.min_devices,
                   opts.max_devices)


@dataclass
class _State:
    """What the supervisor knows of the current attempt."""
    group: RankGroup
    dog: Watchdog
    step: int = 0
    finished: set = field(default_factory=set)
    status: Status = Status.DONE
    launched: bool = False
    checksums: Optional[divergence.Reports] = None  # each rank's own checksum reports (the divergence check)


class Supervisor:
    """One run: launches its rank group, handles what the ranks say, and ends the run or relaunches."""

    def __init__(self, cfg: TrainConfig, run: RunDir, hosts: List[Host], opts: Supervision, *,
                 view: Optional[ProgressView] = None, oom: Optional[OomPolicy] = None,
                 sinks: Sequence[reporting.SinkLike] = ()):
        """`sinks` get every logged step, in order (reporting.py): give reporting.MetricsFile for metrics.jsonl."""
        self.cfg, self.run, self.hosts, self.opts = cfg, run, hosts, opts
        self.members = elastic.Membership(hosts, opts.min_devices, opts.max_devices)
        self.view = view or ProgressView(cfg.steps, live=False)
        # Without a policy (the tuner's trials) out-of-memory is recognised but never reconfigured.
        self.oom = oom or OomPolicy(recover=False)
        self.sinks = [reporting.as_callback(sink) for sink in sinks]
        self.inbox: "queue.Queue" = queue.Queue()
        self.agreement = divergence.Agreement()
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

    def _finish(self, event: Event, note: str, code: int, **fields) -> int:
        self.run.event(event, **fields)
        self.view.note(note)
        return code

    def _loop(self) -> int:
        """Attempt after attempt, until one ends the run (the transitions are beside Status)."""
        attempt, resume, free = 0, self.opts.resume, 0  # free: relaunches that used up no restart
        while True:
            out = self._attempt(attempt, resume)
            code = self._end(out, attempt - free)
            if code is not None:
                return code
            if out.status in _FREE:
                free += 1
            attempt += 1
            resume = True
            self.run.event(Event.RESTART, attempt=attempt, reason=out.reason)
            if out.status not in _FREE:
                self.view.note(f"[yellow]restart {attempt - free}/{self.opts.max_restarts}:[/] {out.reason}")
            if self.members.enabled:
                code = self._membership(out)
                if code is not None:
                    return code

    def _end(self, out: Outcome, restarts: int) -> Optional[int]:
        """The exit code when `out` ends the run, `restarts` restarts in; None: relaunch (after out of
        memory, with the policy's next config: _reconfigure)."""
        if out.status in (Status.DONE, Status.STOPPED):
            done = out.status is Status.DONE
            return self._finish(Event.FINISH if done else Event.STOPPED,
                                f"[green]{'finished' if done else 'stopped'} at step {out.step}[/]", 0, step=out.step)
        if out.status is Status.INTERRUPTED:
            return self._finish(Event.INTERRUPTED, "interrupted: every rank stopped; continue with --resume "
                                f"{self.run.path}", 130, step=out.step)
        if out.status is Status.USER_ERROR:
            return self._finish(Event.FAILED, f"[red]error:[/] {out.reason}", 2, reason=out.reason)
        if out.status is Status.OOM and not self._reconfigure(out):
            reason = (f"out of memory ({out.reason}) and nothing smaller is left to try: use more devices, "
                      "a smaller model or --seq-len, or a larger --memory-budget")
            return self._finish(Event.FAILED, f"[red]failed:[/] {reason}", 1, reason=reason)
        if out.status is Status.FAILED and restarts >= self.opts.max_restarts:
            reason = f"{out.reason}; gave up after {self.opts.max_restarts} restarts"
            return self._finish(Event.FAILED, f"[red]failed:[/] {reason}", 1, reason=reason)
        return None

    def _membership(self, out: Outcome) -> Optional[int]:
        """Elastic runs (--min-devices): exclude or re-admit hosts before the relaunch, and re-split
        the global batch over the devices that remain (elastic.py). The exit code when that ends the
        run: a pipeline that cannot be re-planned on what remains (its stages need every host)."""
        m = self.members
        before = [h.name for h in m.active]
        if out.status is Status.RESIZE:
            for h in m.readmittable():
                m.readmit(h)
                self.run.event(Event.READMIT, host=h.name)
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
                self.run.event(Event.EXCLUDE, host=h.name, reason=why)
                self.view.note(f"[yellow]exclude {h.name}:[/] {why}")
        if [h.name for h in m.active] == before:
            return None
        try:
            new, reshared = m.resplit(self.cfg, self.hosts)
        except UserError as exc:
            if self.cfg.dist.pipeline_stages > 1:  # relaunched as it was, it would wait on the lost host again
                reason = f"cannot re-plan the pipeline: {exc}"
                return self._finish(Event.FAILED, f"[red]failed:[/] {reason}", 1, reason=reason)
            self.view.note(f"[yellow]cannot resize:[/] {exc}")
            return None
        split = Split.of(new)
        self.run.event(Event.RESIZE, hosts=[h.name for h in m.active], **split.event())
        self.view.note(f"[yellow]resize:[/] {split.devices} devices ({', '.join(h.name for h in m.active)}), "
                       f"{split}, global batch {split.global_batch}")
        if reshared:
            self.run.event(Event.RESHARE, **reshared)
            self.view.note(f"[yellow]reshare:[/] {reshared['note']}")
        self.run.save_config(new)
        self.cfg, self.hosts = new, list(m.active)
        return None

    def _reconfigure(self, out: Outcome) -> bool:
        """After out-of-memory: record it, take the policy's next configuration; False when none is left."""
        self.run.event(Event.OOM, **{"step": out.step, "reason": out.reason, **(out.oom or {})})
        new = self.oom.next_config(self.cfg)
        if new is None:
            return False
        old, split = Split.of(self.cfg), Split.of(new)
        self.run.event(Event.RECONFIGURE, old=old.event(), new=split.event(), global_batch=split.global_batch)
        self.run.save_config(new)
        self.cfg = new
        self.view.note(f"[yellow]out of memory:[/] {out.reason}; relaunching with {split}")
        return True

    def _attempt(self, attempt: int, resume: bool) -> Outcome:
        specs = launch.plan(self.cfg, self.hosts, str(self.run.path.resolve()), self.run.run_id, resume,
                            self.opts.stop_after, list(self.opts.rank_wrapper))
        try:
            group = RankGroup(specs, self.run, self.inbox, attempt)
        except UserError as exc:
            self.run.event(Event.FAILED, reason=str(exc))
            raise
        try:
            return self._watch(_State(group, Watchdog(group.ranks, self.opts.stall_timeout, self.opts.allowances)))
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
                    self.run.event(Event.UNACCOUNTED, ranks=[r for i, p in enumerate(group.procs) if i not in reported
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
                for r in proc.spec.exit_ranks:
                    self.run.event(Event.RANK_EXIT, rank=r, host=proc.spec.host,
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
        rank, where = proc.spec.ranks[0], proc.spec.what
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
        suspect = next((r for r in stall.quiet if s.group.stopped(r)), stall.rank)
        host = s.group.host_of(suspect)
        step = s.dog.ranks[suspect].step
        self.run.event(Event.STALL, rank=suspect, host=host, step=step, phase=stall.phase,
                       quiet_s=round(stall.quiet_s, 1), timeout_s=stall.timeout_s, quiet=stall.quiet)
        return Outcome(Status.FAILED, s.step, f"no progress from rank {suspect} on {host} for {stall.quiet_s:.0f} s "
                                              f"(allowed {stall.timeout_s:.0f} s after its {stall.phase})", host=host)

    # -- one handler per message kind ---------------------------------------------------------------
    def _on_hello(self, s: _State, rank: int, msg: protocol.Hello) -> None:
        s.group.hello[rank] = msg
        if len(s.group.hello) == self.cfg.dist.num_devices and not s.launched:
            s.launched = True
            ranks = [{"rank": r, "host": h.host, "pid": h.pid} for r, h in sorted(s.group.hello.items())]
            self.run.event(Event.LAUNCH, attempt=s.group.number, backend=self.cfg.dist.backend, ranks=ranks,
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
        for sink in self.sinks:
            sink(msg.step, record)

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
        self.run.event(Event.DIVERGED, rank=odd[0], ranks=odd, hosts=hosts, step=step, param_checksum=checksums,
                       rollback_to=back)
        where = ", ".join(f"rank {r} on {h}" for r, h in zip(odd, hosts))
        return Outcome(Status.FAILED, s.step, f"{where} diverged from the others' parameters at step {step}: rolling "
                                              "back to the newest checkpoint written while all ranks agreed"
                                              + (f" (step {back})" if back is not None else ""))

    def _on_resumed(self, s: _State, rank: int, msg: protocol.Resumed) -> None:
        if msg.checkpoint is None:
            self.run.event(Event.RESUME, step=0, note="no checkpoint yet: starting from scratch")
        else:
            # The rank that read it holds the newest copy (rank/trainer.py restore): on a fleet
            # without a shared disk, the host's own disk it came from.
            self.run.event(Event.RESUME, step=msg.step, checkpoint=msg.checkpoint, rank=rank, host=s.group.host_of(rank))
        s.step = msg.step

    def _on_checkpoint(self, s: _State, rank: int, msg: protocol.Checkpoint) -> Optional[Outcome]:
        extra = {k: v for k, v in (("agreed", msg.agreed), ("stall_s", msg.stall_s), ("write_s", msg.write_s))
                 if v is not None}
        if rank != 0:
            # The mirror's copy on its own host's storage (rank/trainer.py find_stores): where the
            # checkpoint also lives; rank 0's own report is the one that counts.
            self.run.event(Event.CHECKPOINT, step=msg.step, mirror=s.group.host_of(rank), rank=rank, **extra)
            return None
        self.run.event(Event.CHECKPOINT, step=msg.step, **extra)
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
        self.run.event(Event.BAD_STEP, **msg.fields())
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
        self.run.save_config(self.cfg)  # a later --resume steps past it too
        data = [dataskip.data_step(old, first), dataskip.data_step(old, last)]
        self.run.event(Event.ROLLBACK, step=msg.step, bad_steps=msg.in_a_row, data_steps=data, skip=window)
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
