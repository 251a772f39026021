"""`mlx-train`: parse the command line and call the library. Nothing else lives here."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from mlx_train.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train on local ranks or across the cluster")
    g = p.add_argument_group("where")
    g.add_argument("--devices", type=int, help="number of ranks (default 1; with --distributed: the cluster's)")
    g.add_argument("--distributed", action="store_true", help="run across the hosts in the cluster file")
    g.add_argument("--cluster", help="cluster file (default ./cluster.yaml or ~/.mlx-train/cluster.yaml)")
    g.add_argument("--backend", choices=["ring", "mpi", "any"])
    g = p.add_argument_group("what")
    g.add_argument("--model", help="'gpt' or package.module:factory")
    g.add_argument("--layers", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--heads", type=int)
    g.add_argument("--seq-len", type=int)
    g.add_argument("--data", help="text file/folder, .jsonl with 'text', or .npy token ids (default: Python stdlib)")
    g = p.add_argument_group("how")
    g.add_argument("--batch-size", type=int, help="per-device batch size")
    g.add_argument("--accumulation", type=int, help="gradient accumulation steps")
    g.add_argument("--steps", type=int, help="optimizer steps")
    g.add_argument("--lr", type=float)
    g.add_argument("--warmup", type=int, help="warmup steps")
    g.add_argument("--precision", choices=["fp32", "bf16"])
    g.add_argument("--grad-checkpoint", action="store_true", default=None, help="recompute each block in backward")
    g.add_argument("--seed", type=int)
    g.add_argument("--optimize-memory", action="store_true", help="start from the memory planner's split")
    g.add_argument("--memory-budget", help="per-device budget, bytes or e.g. 8GiB (default: from the device)")
    g = p.add_argument_group("run")
    g.add_argument("--config", help="YAML config (flags override it)")
    g.add_argument("--run-dir", help="default runs/<run-id>")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    g.add_argument("--log-every", type=int)
    g.add_argument("--eval-every", type=int)
    g.add_argument("--checkpoint-every", type=int)
    g.add_argument("--keep-checkpoints", type=int)
    g.add_argument("--max-restarts", type=int, default=3)
    g.add_argument("--stall-timeout", type=float, default=None, help="seconds without progress before a restart "
                   "(default: adaptive, 5 x the median step, at least 10 s, with allowances for start-up, "
                   "evaluation and checkpoints)")
    g.add_argument("--stop-after", type=int, help="checkpoint and stop cleanly after this step")
    g.add_argument("--no-live", action="store_true", help="plain log lines instead of a progress bar")
    g.add_argument("--rank-wrapper", metavar="CMD", help="prefix each local rank's command, e.g. 'taskset -c 0' "
                   "or 'prlimit --as=4000000000'")


def _overrides(a: argparse.Namespace) -> dict:
    from mlx_train.units import parse_bytes

    pick = lambda **kv: {k: v for k, v in kv.items() if v is not None}
    out = {
        "model": pick(name=a.model, n_layers=a.layers, d_model=a.width, n_heads=a.heads, seq_len=a.seq_len),
        "data": pick(path=a.data),
        "optim": pick(lr=a.lr, warmup_steps=a.warmup),
        "dist": pick(num_devices=a.devices, batch_size_per_device=a.batch_size, gradient_accumulation=a.accumulation,
                     backend=a.backend),
        **pick(precision=a.precision, grad_checkpoint=a.grad_checkpoint, steps=a.steps, seed=a.seed,
               log_every=a.log_every, eval_every=a.eval_every, checkpoint_every=a.checkpoint_every,
               keep_checkpoints=a.keep_checkpoints,
               memory_budget=parse_bytes(a.memory_budget) if a.memory_budget else None),
    }
    return {k: v for k, v in out.items() if v != {}}


def cmd_train(a: argparse.Namespace) -> int:
    from mlx_train.controller.run import RunRequest, start

    if a.max_restarts < 0:
        raise UserError("--max-restarts must be >= 0")
    return start(RunRequest(_overrides(a), a.config, a.run_dir, a.resume, a.distributed, a.cluster, a.max_restarts,
                            a.stall_timeout, a.stop_after, a.optimize_memory, False if a.no_live else None,
                            a.rank_wrapper))


def cmd_monitor(a: argparse.Namespace) -> int:
    from mlx_train.controller.monitor import monitor

    return monitor(a.run_dir, once=a.once, plot=a.plot, performance=a.performance)


def cmd_status(a: argparse.Namespace) -> int:
    from mlx_train.controller.status import status

    return status(cluster_file=a.cluster, local_only=a.local)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mlx-train", description="Data-parallel MLX training across your machines.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(sub)
    sub.choices["train"].set_defaults(func=cmd_train)

    p = sub.add_parser("monitor", help="live view of a run (default: the newest under runs/)")
    p.add_argument("run_dir", nargs="?")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--plot", metavar="FILE.png", help="write loss and throughput curves")
    p.add_argument("--performance", action="store_true", help="compute/communication breakdown per step")
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("status", help="this device, the cluster's hosts, and runs in progress")
    p.add_argument("--cluster")
    p.add_argument("--local", action="store_true", help="only this machine")
    p.set_defaults(func=cmd_status)

    from mlx_train.cli import fleet as cli_fleet

    cli_fleet.add_commands(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    func = a.func if hasattr(a, "func") else cmd_train
    try:
        return func(a)
    except UserError as exc:
        print(f"mlx-train {a.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
