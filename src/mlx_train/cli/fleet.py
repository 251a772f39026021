"""Sub-commands about the fleet and tuning: configure, check-network, reset-distributed, optimize.

An option that is a config knob (--cluster, --backend, --devices, ...) is added from the knob
(cli/options.py), with its help, type and checks; only the options that belong to these commands
alone are written here.
"""

from __future__ import annotations

import argparse

from mlx_train.cli import options
from mlx_train.config import DistributedConfig, RunOptions, TrainConfig


def cmd_configure(a: argparse.Namespace) -> int:
    from mlx_train.fleet.configure import configure

    return configure(distributed=a.distributed, inventory=a.inventory, output=a.output, hostfile=a.hostfile)


def cmd_check_network(a: argparse.Namespace) -> int:
    from mlx_train.fleet.network import check_network

    dist = options.build(a, DistributedConfig)
    return check_network(cluster_file=options.build(a, RunOptions).cluster, backend=dist.backend, size_mb=a.size_mb,
                         link_gbps=dist.link_gbps)


def cmd_reset(a: argparse.Namespace) -> int:
    from mlx_train.fleet.reset import reset_distributed

    return reset_distributed(cluster_file=options.build(a, RunOptions).cluster, local_only=a.local)


def cmd_optimize(a: argparse.Namespace) -> int:
    from mlx_train.controller.optimize import optimize

    return optimize(options.given(a, TrainConfig), options.build(a, RunOptions), a.trial_steps, a.output)


def add_commands(sub) -> None:
    p = sub.add_parser("configure", help="write the cluster file from an Ansible inventory")
    p.add_argument("--distributed", action="store_true", help="configure for multi-host training")
    p.add_argument("--inventory", help="Ansible inventory (default: the test fleet's, else inventory/local.yml)")
    p.add_argument("--output", default="cluster.yaml", help="cluster file to write")
    p.add_argument("--hostfile", default="hostfile.json", help="mlx.launch-compatible hostfile to write")
    p.set_defaults(func=cmd_configure)

    p = sub.add_parser("check-network", help="ssh, interfaces, MCA values, ring ports and bandwidth between hosts")
    options.add_options(p, RunOptions, "where", only={"--cluster"})
    options.add_options(p, DistributedConfig, "the links", only={"--backend", "--link-gbps"})
    p.add_argument("--size-mb", type=options.positive_number, default=8.0,
                   help="all_sum buffer size for the bandwidth probe (default: 8)")
    p.set_defaults(func=cmd_check_network)

    p = sub.add_parser("reset-distributed", help="stop this project's stray ranks and remove stale files")
    options.add_options(p, RunOptions, "where", only={"--cluster"})
    p.add_argument("--local", action="store_true", help="only this machine")
    p.set_defaults(func=cmd_reset)

    p = sub.add_parser("optimize", help="measure candidate settings and write the best as a config file")
    options.add_options(p, TrainConfig, "the run to tune", only={"--devices", "--memory-budget"})
    options.add_options(p, RunOptions, "the base config and where to tune",
                        only={"--config", "--distributed", "--cluster"})
    p.add_argument("--output", default="optimized.yaml", type=options.output_file(),
                   help="config file to write (default: optimized.yaml)")
    p.add_argument("--trial-steps", type=int, default=6, help="steps per trial, at least 3 (default: 6)")
    p.set_defaults(func=cmd_optimize)
