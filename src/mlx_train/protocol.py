"""The line protocol from rank processes to the supervisor.

A rank reports on its stdout with lines `@mlx-train {json}`; everything else it prints is log
text. stdout is the one channel that reaches the supervisor from every kind of launch (a local
child, `ssh host ...`, `mpirun --tag-output`), so the supervisor never needs the ranks' disks.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

PREFIX = "@mlx-train "

# Exit codes a rank uses to tell the supervisor why it stopped.
EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_OUT_OF_MEMORY = 75  # the rank's peak passed --memory-budget (EX_TEMPFAIL: retry with less)


def emit(kind: str, **fields) -> None:
    sys.stdout.write(PREFIX + json.dumps({"kind": kind, **fields}) + "\n")
    sys.stdout.flush()


def parse(line: str) -> Optional[dict]:
    """The message in `line`, or None when it is ordinary log text."""
    at = line.find(PREFIX)
    if at < 0:
        return None
    try:
        msg = json.loads(line[at + len(PREFIX):])
    except ValueError:
        return None
    return msg if isinstance(msg, dict) and "kind" in msg else None
