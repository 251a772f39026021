"""Is a process still there, and which process is it: the questions asked of a pid.

Standard library only: tools/fleet.py loads this file by path so that `make fleet-down` runs from a
bare python3 without the package's dependencies.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import NamedTuple, Optional


class Stat(NamedTuple):
    """The fields of /proc/PID/stat that are read here (proc(5) numbers them 3, 4 and 22). A NamedTuple,
    not a dataclass: a dataclass needs its module in sys.modules, which a load by path does not give."""
    state: str       # R running, S sleeping, T stopped, t traced, Z zombie, ...
    ppid: int
    start_time: str  # clock ticks since boot: with the pid it names one process for good


def stat(pid: int) -> Optional[Stat]:
    """`pid`'s /proc/PID/stat, or None where it cannot be read (the process is gone, or no /proc: macOS)."""
    try:
        # The command name (field 2) is in parentheses and may hold spaces and ")": split after the last.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return Stat(fields[0], int(fields[1]), fields[19])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (an unreaped child is gone for our purposes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    st = stat(pid)
    return st is None or st.state != "Z"  # None: no /proc (macOS), and kill(0) said it exists


def start_time(pid: int) -> Optional[str]:
    """When `pid` started (clock ticks since boot on Linux, `ps` lstart elsewhere): with the pid it
    names one process for good, so a reused pid is never mistaken for ours."""
    if Path("/proc").is_dir():
        st = stat(pid)
        return None if st is None else st.start_time
    try:
        out = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
