"""Launch to first optimizer step of the default 2-rank local run (`mlx-train train --devices 2`):
wall time from starting the command to the supervisor's record of step 1 (imports, OpenBLAS
re-exec, ring connect, data, model, the step's compile and the step itself)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def once(work: Path) -> float:
    run = Path(tempfile.mkdtemp(dir=work)) / "r"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "mlx_train.cli", "train", "--devices", "2", "--steps", "2",
                           "--log-every", "1", "--run-dir", str(run), "--no-live"],
                          capture_output=True, text=True, timeout=300, env=os.environ)
    if proc.returncode:
        raise SystemExit(f"startup run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    return first["time"] - t0


def main(rounds=3) -> dict:
    with tempfile.TemporaryDirectory(prefix="mlx-train-bench-") as tmp:
        times = [once(Path(tmp)) for _ in range(rounds)]
    return {"launch_to_first_step_s": statistics.median(times), "all_s": times}


if __name__ == "__main__":
    print(json.dumps(main(**json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})))
