"""The supervisor's keepalive: one byte on every live rank's stdin each PERIOD_S.

A partition (a host's link down for good) ends nothing by itself: no packet arrives, so the ssh
session that carries the rank's stdin never reaches its end and the rank's lifeline never fires.
With this beat, a rank that hears nothing for TIMEOUT_S knows its supervisor is unreachable and
ends itself (rank/lifeline.py, `--lifeline-timeout`). The beat runs on its own thread, so it is
independent of steps, checkpoint writes and the supervisor's message handling.

Writes never block the supervisor: the pipes are non-blocking, a full pipe skips one beat and a
broken one (the rank or its ssh ended) is forgotten.
"""

from __future__ import annotations

import os
import threading
from typing import IO, List

PERIOD_S = 4.0
# Four beats missed in a row: far above any scheduling hiccup of the supervisor or the link, short
# enough that a cut-off host stops burning a core and holding the model's memory within seconds.
TIMEOUT_S = 4 * PERIOD_S


class Keepalive:
    """Beats until stop(); add() each rank's stdin pipe as it is started."""

    def __init__(self, period: float = PERIOD_S):
        self._period = period
        self._fds: List[int] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="keepalive", daemon=True)
        self._thread.start()

    def add(self, pipe: IO[bytes]) -> None:
        # A copy of the descriptor of its own: the owner may close its file whenever it likes.
        fd = os.dup(pipe.fileno())
        os.set_blocking(fd, False)
        with self._lock:
            if self._stopped.is_set():
                os.close(fd)
            else:
                self._fds.append(fd)

    @property
    def pipes(self) -> int:
        """How many pipes still get the beat."""
        with self._lock:
            return len(self._fds)

    def _beat(self) -> None:
        while True:
            with self._lock:
                if self._stopped.is_set():
                    return
                for fd in list(self._fds):
                    try:
                        os.write(fd, b"\n")
                    except BlockingIOError:
                        pass  # the pipe is full (its reader is behind): the next beat tries again
                    except OSError:
                        self._fds.remove(fd)  # the rank (or its ssh) is gone
                        os.close(fd)
            self._stopped.wait(self._period)

    def stop(self) -> None:
        """No beat after this returns, and the copies are closed (the pipes' end of file is the owner's)."""
        with self._lock:
            self._stopped.set()
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()
