"""`mlx-train reset-distributed`: stop this project's stray ranks and remove stale files, everywhere.

Ranks are found only through the pid records the workers wrote (pidrecords): a process is
signalled when its pid, kernel start time and run id all match a record, never by name, so an
unrelated process of the same interpreter survives. Each host runs the same code with its own
interpreter (sent over ssh on stdin, so it works with any installed mlx-train version).

    python -m mlx_train.fleet.reset --local --json    # this machine only, machine-readable
    python -m mlx_train.fleet.reset --list --json     # the records, nothing touched
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from mlx_train.fleet import ssh

# Ring hostfiles a worker did not get to delete (it removes its own right after init); older
# than this, no rank is still starting up with one.
STALE_GLOBS = ("/tmp/mlx-train-ring-*.json",)
STALE_AFTER_S = 60.0


def local_reset() -> dict:
    return reset_host(ssh.LOCAL, sys.executable)


def local_list() -> List[dict]:
    from mlx_train.rank import pidrecords

    return [{k: r.get(k) for k in ("run_id", "rank", "pid", "run_dir", "alive")} for r in pidrecords.records()]


# Runs on each host with that host's interpreter.
_REMOTE = """
import glob, json, os, sys, time
from mlx_train.rank import pidrecords
killed = pidrecords.stop_stray()
removed, now = [], time.time()
for pattern in json.loads(sys.argv[1]):
    for f in glob.glob(pattern):
        try:
            if now - os.path.getmtime(f) > float(sys.argv[2]):
                os.unlink(f); removed.append(f)
        except OSError:
            pass
print(json.dumps({"killed": [{k: r[k] for k in ("run_id", "rank", "pid")} for r in killed], "removed": removed}))

"""


def reset_host(name: str, python: str) -> dict:
    report, why = ssh.probe(name, python, _REMOTE, [json.dumps(STALE_GLOBS), str(STALE_AFTER_S)])
    return {"host": name, **report} if report is not None else {"host": name, "error": why}


def reset_distributed(cluster_file: Optional[str] = None, local_only: bool = False) -> int:
    from rich.console import Console
    from rich.table import Table

    results = [{**local_reset(), "host": "this machine"}]
    note = ""
    if not local_only:
        from mlx_train.fleet.hosts import configured, load_hosts

        if cluster_file or configured():
            hosts = [h for h in load_hosts(cluster_file) if not h.local]
            results += ssh.parallel(lambda h: reset_host(h.name, h.python), hosts)
        else:
            note = "no cluster file: only this machine was reset"
    t = Table(title="reset-distributed", title_justify="left")
    for col in ("host", "stopped ranks", "removed files", "result"):
        t.add_column(col)
    failed = False
    for r in results:
        if "error" in r:
            failed = True
            t.add_row(r["host"], "-", "-", f"[red]FAIL[/] {r['error']}: check `ssh {r['host']} true`, then rerun")
            continue
        ranks = ", ".join(f"{k['run_id']} rank {k['rank']} (pid {k['pid']})" for k in r["killed"]) or "none"
        t.add_row(r["host"], ranks, str(len(r["removed"])), "[green]ok[/]")
    Console().print(t)
    if note:
        print(note)
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mlx_train.fleet.reset")
    p.add_argument("--local", action="store_true", help="reset this machine only")
    p.add_argument("--list", action="store_true", help="print the pid records, change nothing")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.list:
        out = local_list()
    elif a.local:
        out = local_reset()
    else:
        return reset_distributed()
    print(json.dumps(out) if a.json else out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
