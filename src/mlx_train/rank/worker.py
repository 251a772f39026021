"""One rank of a training run: `python -m mlx_train.rank.worker ...`, started by the supervisor.

Reports to the supervisor with protocol lines on stdout (see protocol.py) and writes checkpoints
from rank 0. Everything about the run comes from the arguments, so the same command works for a
local child, over ssh, and under mpirun.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile

from mlx_train.rank import blas


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mlx_train.rank.worker")
    p.add_argument("--config-json", required=True, help="the resolved TrainConfig as JSON")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--rank", type=int, help="ring backend: this rank")
    p.add_argument("--ring-hosts", help='ring backend: JSON list, one ["ip:port"] per rank')
    p.add_argument("--placed", default="{}",
                   help="JSON: the config's model/data path -> its copy on this host (fleet/ship.py)")
    p.add_argument("--ranks-on-host", type=int, default=1, help="ranks sharing this host (BLAS threads)")
    p.add_argument("--rank-hosts", type=lambda text: [int(x) for x in text.split(",")],
                   help="each rank's host, by number, comma-separated (--shares auto re-shares between hosts "
                        "only); default: every rank on one host")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint")
    p.add_argument("--stop-after", type=int, help="checkpoint and exit cleanly after this step")
    p.add_argument("--lifeline", action="store_true",
                   help="end when stdin reaches its end or the launcher exits (the supervisor is gone: lifeline.py)")
    p.add_argument("--lifeline-timeout", type=float, metavar="S",
                   help="with --lifeline: also end after S seconds without a byte on stdin (the supervisor's "
                        "keepalive stopped arriving: out of reach)")
    return p.parse_args(argv)


def init_group(args, backend: str):
    import mlx.core as mx

    if args.ring_hosts is not None:
        # MLX's ring backend reads its peers from a file: write ours from the argument.
        fd, path = tempfile.mkstemp(prefix="mlx-train-ring-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            fh.write(args.ring_hosts)
        os.environ["MLX_HOSTFILE"], os.environ["MLX_RANK"] = path, str(args.rank)
        try:
            return mx.distributed.init(backend="ring", strict=True)
        finally:
            os.unlink(path)
    if backend == "mpi":
        return mx.distributed.init(backend="mpi", strict=True)
    return mx.distributed.init(backend=backend)


def main(argv=None) -> int:
    args = parse_args(argv)
    if blas.needs_reexec():
        # LD_PRELOAD only takes effect at exec; same pid, so the supervisor's records stay valid.
        env = {**os.environ, **blas.rank_env(args.ranks_on_host)}
        os.execve(sys.executable, [sys.executable, "-m", "mlx_train.rank.worker", *sys.argv[1:]], env)

    from mlx_train.rank import lifeline, pidrecords

    if args.lifeline:
        lifeline.start(args.lifeline_timeout)  # before MLX starts any thread

    from mlx_train import protocol
    from mlx_train.config import TrainConfig
    from mlx_train.errors import UserError
    from mlx_train.rank import inject
    from mlx_train.rank.device import ThisHost, rank_budget_for
    from mlx_train.rank.trainer import Trainer

    cfg = TrainConfig.trusted(json.loads(args.config_json))  # checked once, by the controller
    group = init_group(args, cfg.dist.backend)
    rank = group.rank()
    record = pidrecords.write(args.run_id, rank, args.run_dir)
    try:
        protocol.emit(protocol.Hello(rank=rank, size=group.size(), host=socket.gethostname(), pid=os.getpid(),
                                     python=sys.executable))
        budget = rank_budget_for(cfg, [ThisHost(args.ranks_on_host)])  # memory as measured here, where the rank runs
        protocol.emit(protocol.Budget(rank=rank, budget=budget))
        trainer = Trainer(cfg, group, args.run_dir, budget, placed=json.loads(args.placed),
                          hosts=inject.hosts(args.rank_hosts))
        trainer.run(resume=args.resume, stop_after=args.stop_after)
        return protocol.EXIT_OK
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return protocol.EXIT_USER_ERROR
    finally:
        sys.stdout.flush()
        pidrecords.remove(record)


if __name__ == "__main__":
    sys.exit(main())
