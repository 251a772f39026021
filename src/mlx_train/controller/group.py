"""The rank group: one launch of every rank of a run, which it starts, signals and stops.

It knows each process's exit as it happens (one waiter thread per process, blocked in wait()) and
reads every process's output through a pipe (one pump thread per process); both put what they learn
in the supervisor's inbox, tagged with the group's number, so a straggler of an earlier launch (a
pump still draining) is never mistaken for the current one. How a process is stopped and how its
lines name their rank depend on how it was launched (local, ssh, mpirun): launch.RankProc says.

Nothing here waits without a bound: an exit is learnt from wait(), never from the pipe's end (a
process the rank spawned, e.g. an ssh ControlMaster, can hold the pipe open forever).
"""

from __future__ import annotations

import ctypes
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from mlx_train import procs, protocol
from mlx_train.controller import keepalive
from mlx_train.controller.launch import RankProc
from mlx_train.errors import UserError
from mlx_train.rundir import RunDir

STOP_GRACE_S = 5.0
# After a process exits, how long its pipe may still deliver what it wrote before it died.
DRAIN_S = 2.0


def _die_with_parent() -> None:
    # Linux: a rank gets SIGKILL if the supervisor dies, so no orphan outlives a killed supervisor.
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class _Proc:
    spec: RankProc
    popen: subprocess.Popen
    drained: threading.Event = field(default_factory=threading.Event)
    wake: tuple = field(default_factory=os.pipe)  # _wait writes here so the pump starts its bounded drain


class RankGroup:
    """Every rank of one launch: the processes, their pumps and waiters, and what the ranks said of
    themselves (hello, memory budgets and peaks, an out-of-memory report).

    Its inbox items: ("msg", number, rank, protocol.Message) and ("exit", number, index in procs, code)."""

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
        rank, line = proc.spec.split(line)
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
        """SIGKILL what the processes left in their process groups where that is safe (RankProc.sweep)."""
        for p in self.procs:
            p.spec.sweep(p.popen.pid)

    def _signal(self, proc: _Proc, sig: int) -> None:
        proc.spec.send_signal(proc.popen.pid, sig, {r: h.pid for r, h in self.hello.items()})

    def host_of(self, rank: int) -> str:
        for p in self.procs:
            if rank in p.spec.ranks:
                return p.spec.host_of(rank)
        return "?"

    def stopped(self, rank: int) -> bool:
        """Is the rank's process stopped (SIGSTOP, a debugger)? Known only of a rank on this machine
        that said hello (its pid); False where it cannot be told."""
        spec = next((p.spec for p in self.procs if rank in p.spec.ranks), None)
        hello = self.hello.get(rank)
        if spec is None or spec.remote or hello is None:
            return False
        st = procs.stat(hello.pid)
        return st is not None and st.state in ("T", "t")

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
