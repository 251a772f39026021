"""A rank ends when its supervisor is gone or out of reach, wherever it runs and whatever it is doing.

The supervisor keeps each rank's stdin open as a pipe. That pipe crosses ssh (the remote command's
stdin closes when the ssh session ends) and mpirun (which forwards its stdin to rank 0 only; when
rank 0 dies, mpirun takes the job down). So end of file on stdin means "nobody supervises you any
more". The rank's launcher dying (the sshd session, mpirun, orted) means the same, and covers the
MPI ranks that have no stdin.

A partition (the host's link down for good) brings neither: no packet arrives, so the ssh session
never ends. So the supervisor also writes a byte on that pipe every few seconds
(controller/keepalive.py), and a rank started with a timeout (`--lifeline-timeout`) that hears
nothing on its stdin for that long ends as well. Without a timeout (a rank started by hand, or a
stdin that is not a pipe, as MPI ranks other than 0 have) silence means nothing.

The watching is done by a small forked guardian process, not a thread: a rank blocked in an
all_sum may hold the interpreter lock inside MLX, and a frozen one (SIGSTOP) runs nothing at all;
SIGKILL from another process ends either. The guardian holds none of the rank's output, so it
can never keep the supervisor's pipe open, and it ends with the rank (a pipe of its own).
"""

from __future__ import annotations

import os
import select
import signal
import stat
import time
from typing import Optional

from mlx_train import procs

# How often the guardian looks whether the rank's launcher is still there.
POLL_S = 1.0


def _is_pipe(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _launcher_gone(rank: int, launcher: int) -> bool:
    """Has the process that started `rank` exited? (Linux: the rank was re-parented, which happens
    at the launcher's exit even while it is an unreaped zombie; elsewhere: its pid is gone.)"""
    st = procs.stat(rank)
    if st is not None:
        return st.ppid != launcher
    try:
        os.kill(launcher, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def start(timeout: Optional[float] = None) -> Optional[int]:
    """Fork the guardian of this process; its pid. Call before MLX starts threads (fork is then safe).
    `timeout`: seconds of silence on stdin after which the supervisor counts as unreachable."""
    rank, launcher = os.getpid(), os.getppid()
    watch_stdin = _is_pipe(0)  # under mpirun, ranks other than 0 have /dev/null: nothing to watch there
    rank_end, keep = os.pipe()  # `keep` stays open in the rank; its end of file tells the guardian
    pid = os.fork()
    if pid:
        os.close(rank_end)
        return pid
    try:  # the guardian: never returns
        os.close(keep)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (1, 2):
            os.dup2(null, fd)  # never hold the rank's output pipe
        os.closerange(3, rank_end)
        os.closerange(rank_end + 1, 1 << 16)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        watched = [rank_end] + ([0] if watch_stdin else [])
        heard = time.monotonic()
        while True:
            ready, _, _ = select.select(watched, [], [], POLL_S)
            if rank_end in ready:
                os._exit(0)  # the rank ended on its own
            gone = False
            if 0 in ready:
                gone = not os.read(0, 1 << 12)
                heard = time.monotonic()
            if watch_stdin and timeout is not None and time.monotonic() - heard > timeout:
                gone = True  # no beat: the supervisor is out of reach (a partition ends no session)
            if gone or _launcher_gone(rank, launcher) or os.getppid() != rank:
                os.kill(rank, signal.SIGKILL)
                os._exit(0)
    except BaseException:
        os._exit(1)
