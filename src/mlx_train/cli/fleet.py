"""Sub-commands about the fleet and tuning: configure, check-network, reset-distributed, optimize."""

from __future__ import annotations

import argparse

from mlx_train.cli import options


def cmd_configure(a: argparse.Namespace) -> int:
    from mlx_train.fleet.configure import configure

    return configure(distributed=a.distributed, inventory=a.inventory, output=a.output, hostfile=a.hostfile)


def cmd_check_network(a: argparse.Namespace) -> int:
    from mlx_train.fleet.network import check_network

    return check_network(cluster_file=a.cluster, backend=a.backend, size_mb=a.size_mb, link_gbps=a.link_gbps or 0.0)


def cmd_reset(a: argparse.Namespace) -> int:
    from mlx_train.fleet.reset import reset_distributed

    return reset_distributed(cluster_file=a.cluster, local_only=a.local)


def cmd_optimize(a: argparse.Namespace) -> int:
    from mlx_train.controller.tune import optimize

    return optimize(a)


def add_commands(sub) -> None:
    p = sub.add_parser("configure", help="write the cluster file from an Ansible inventory")
    p.add_argument("--distributed", action="store_true", help="configure for multi-host training")
    p.add_argument("--inventory", help="Ansible inventory (default: the test fleet's, else inventory/local.yml)")
    p.add_argument("--output", default="cluster.yaml", help="cluster file to write")
    p.add_argument("--hostfile", default="hostfile.json", help="mlx.launch-compatible hostfile to write")
    p.set_defaults(func=cmd_configure)

    p = sub.add_parser("check-network", help="ssh, interfaces, MCA values, ring ports and bandwidth between hosts")
    p.add_argument("--cluster")
    p.add_argument("--backend", choices=["ring", "mpi"], default="ring")
    p.add_argument("--size-mb", type=options.positive_number, default=8.0,
                   help="all_sum buffer size for the bandwidth probe (default: 8)")
    p.add_argument("--link-gbps", type=options.positive_number,
                   help="the links' rate in Gbit/s: bandwidths are also shown as a percentage of it")
    p.set_defaults(func=cmd_check_network)

    p = sub.add_parser("reset-distributed", help="stop this project's stray ranks and remove stale files")
    p.add_argument("--cluster")
    p.add_argument("--local", action="store_true", help="only this machine")
    p.set_defaults(func=cmd_reset)

    p = sub.add_parser("optimize", help="measure candidate settings and write the best as a config file")
    p.add_argument("--devices", type=int, help="ranks to tune for (default 1; with --distributed: the cluster's)")
    p.add_argument("--config", help="base config (YAML)")
    p.add_argument("--output", default="optimized.yaml", type=options.output_file(),
                   help="config file to write (default: optimized.yaml)")
    p.add_argument("--trial-steps", type=int, default=6, help="steps per trial, at least 3 (default: 6)")
    p.add_argument("--memory-budget", type=options.size,
                   help="per-device budget, bytes or e.g. 8GiB (default: from the device)")
    p.add_argument("--distributed", action="store_true", help="tune across the cluster file's hosts")
    p.add_argument("--cluster")
    p.set_defaults(func=cmd_optimize)
