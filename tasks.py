"""invoke tasks: thin wrappers over the `mlx-train` command (`invoke --list`)."""

from __future__ import annotations

import sys

from invoke import task

from mlx_train.cli.main import main as mlx_train


def _run(*argv: str) -> None:
    code = mlx_train([a for a in argv if a is not None])
    if code:
        sys.exit(code)


@task(help={"devices": "number of ranks (with --distributed: spread over the cluster file's hosts)",
            "distributed": "run across the hosts in the cluster file", "backend": "ring (default) or mpi",
            "steps": "optimizer steps", "batch_size": "per-device batch", "extra": "more `mlx-train train` flags"})
def train(c, devices=None, distributed=False, backend=None, steps=None, batch_size=None, extra=""):
    """`mlx-train train`: the embedded default (GPT on the Python stdlib), locally or with --distributed."""
    argv = ["train", *(["--distributed"] if distributed else [])]
    for flag, value in (("--devices", devices), ("--backend", backend), ("--steps", steps),
                        ("--batch-size", batch_size)):
        if value is not None:
            argv += [flag, str(value)]
    _run(*argv, *extra.split())


@task(help={"run_dir": "run directory (default: newest)", "once": "one snapshot", "performance": "timing table"})
def monitor(c, run_dir=None, once=False, performance=False, plot=None):
    """Watch a run."""
    _run("monitor", run_dir, *(["--once"] if once else []), *(["--performance"] if performance else []),
         *(["--plot", plot] if plot else []))


@task
def status(c):
    """This device, runs in progress, and the cluster's hosts."""
    _run("status")


@task(name="check-network")
def check_network(c, backend="ring"):
    """Check ssh, interfaces, MCA values, ring ports and bandwidth between every pair of hosts."""
    _run("check-network", "--backend", backend)


@task(name="reset-distributed")
def reset_distributed(c):
    """Stop stray ranks (by their pid records) and remove stale files on every host."""
    _run("reset-distributed")


@task(help={"devices": "ranks to tune for", "output": "config file to write"})
def optimize(c, devices=1, output="optimized.yaml"):
    """Measure candidate settings and write the best as a config file."""
    _run("optimize", "--devices", str(devices), "--output", output)


@task
def configure(c, inventory=None):
    """Write cluster.yaml from an Ansible inventory."""
    _run("configure", "--distributed", *(["--inventory", inventory] if inventory else []))
