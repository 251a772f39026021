"""Is a process still there, and which process is it: the two questions asked of a pid.

Standard library only: tools/fleet.py loads this file by path so that `make fleet-down` runs from a
bare python3 without the package's dependencies.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (an unreaped child is gone for our purposes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(0) said it exists


def start_time(pid: int) -> Optional[str]:
    """When `pid` started (clock ticks since boot on Linux, `ps` lstart elsewhere): with the pid it
    names one process for good, so a reused pid is never mistaken for ours."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        pass
    except IndexError:
        return None
    if Path("/proc").is_dir():
        return None
    try:
        out = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
