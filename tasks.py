"""invoke tasks: thin wrappers over the `mlx-train` command (`invoke --list`).

A task's parameters are its command's options under the same names (batch_size is --batch-size),
with the command's own help: the knobs and the CLI define both, and nothing here restates them
(a parameter the command lacks fails `invoke --list`).
"""

from __future__ import annotations

import sys

from invoke import task

from mlx_train.cli.main import build_parser, main as mlx_train
from mlx_train.cli.options import helps

_PARSER = build_parser()


def _help(command: str, *names: str) -> dict:
    said = helps(_PARSER, command)
    return {name: said[name] for name in names}


def _flags(**values) -> list:
    """The options given, as the command line spells them: a true switch alone, None and False left out."""
    argv = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def _run(*argv: str) -> None:
    code = mlx_train([a for a in argv if a is not None])
    if code:
        sys.exit(code)


@task(help={**_help("train", "devices", "distributed", "backend", "steps", "batch_size"),
            "extra": "more `mlx-train train` flags"})
def train(c, devices=None, distributed=False, backend=None, steps=None, batch_size=None, extra=""):
    """`mlx-train train`: the embedded default (GPT on the Python stdlib), locally or with --distributed."""
    _run("train", *_flags(distributed=distributed, devices=devices, backend=backend, steps=steps,
                          batch_size=batch_size), *extra.split())


@task(help=_help("monitor", "run_dir", "once", "performance", "plot"))
def monitor(c, run_dir=None, once=False, performance=False, plot=None):
    """Watch a run."""
    _run("monitor", run_dir, *_flags(once=once, performance=performance, plot=plot))


@task
def status(c):
    """This device, runs in progress, and the cluster's hosts."""
    _run("status")


@task(name="check-network", help=_help("check-network", "backend"))
def check_network(c, backend=None):
    """Check ssh, interfaces, MCA values, ring ports and bandwidth between every pair of hosts."""
    _run("check-network", *_flags(backend=backend))


@task(name="reset-distributed")
def reset_distributed(c):
    """Stop stray ranks (by their pid records) and remove stale files on every host."""
    _run("reset-distributed")


@task(help=_help("optimize", "devices", "output"))
def optimize(c, devices=None, output=None):
    """Measure candidate settings and write the best as a config file."""
    _run("optimize", *_flags(devices=devices, output=output))


@task(help=_help("configure", "inventory"))
def configure(c, inventory=None):
    """Write cluster.yaml from an Ansible inventory."""
    _run("configure", *_flags(distributed=True, inventory=inventory))
