"""Records of the rank processes this project started, one JSON file per rank per host.

`reset-distributed` and `status` use them: a process is only ever signalled when its pid, its
start time and its run id all match a record, never by process name, so an unrelated process of
the same interpreter (or a reused pid) is left alone.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import List

from mlx_train import procs

RECORD_DIR = Path(os.environ.get("MLX_TRAIN_STATE", str(Path.home() / ".mlx-train"))) / "ranks"


def write(run_id: str, rank: int, run_dir: str) -> Path:
    RECORD_DIR.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    path = RECORD_DIR / f"{run_id}.rank{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"run_id": run_id, "rank": rank, "pid": pid, "start": procs.start_time(pid),
                               "run_dir": run_dir}))
    tmp.replace(path)
    return path


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def records() -> List[dict]:
    out = []
    for f in sorted(RECORD_DIR.glob("*.json")) if RECORD_DIR.is_dir() else []:
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        rec["file"] = str(f)
        rec["alive"] = rec.get("start") is not None and procs.start_time(rec["pid"]) == rec["start"]
        out.append(rec)
    return out


def stop_stray(sig: int = signal.SIGKILL) -> List[dict]:
    """Signal every recorded rank still alive as the same process; drop every record. Returns the killed."""
    killed = []
    for rec in records():
        if rec["alive"]:
            try:
                os.kill(rec["pid"], sig)
                killed.append(rec)
            except ProcessLookupError:
                pass
        Path(rec["file"]).unlink(missing_ok=True)
    return killed
