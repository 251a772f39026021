"""`mlx-train`: parse the command line and call the library. Nothing else lives here."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from mlx_train.cli import options
from mlx_train.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _train_parser(sub) -> None:
    from mlx_train.config import RunOptions, TrainConfig

    p = sub.add_parser("train", help="train on local ranks or across the cluster",
                       description="Train on local ranks or across the cluster. Values come from the flags, "
                                   "then --config (or the --resume'd run's config.yaml), then the defaults.")
    options.add_options(p, TrainConfig, title="training")
    options.add_options(p, RunOptions, title="run")
    p.set_defaults(func=cmd_train)


def cmd_train(a: argparse.Namespace) -> int:
    from mlx_train.config import RunOptions, TrainConfig
    from mlx_train.controller.run import start

    return start(options.given(a, TrainConfig), options.build(a, RunOptions))


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

    p = sub.add_parser("monitor", help="live view of a run (default: the newest under runs/)")
    p.add_argument("run_dir", nargs="?", help="the run directory (default: the newest under runs/)")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--plot", metavar="FILE.png", type=options.output_file(".png", ".pdf", ".svg"),
                   help="write loss and throughput curves")
    p.add_argument("--performance", action="store_true", help="compute/communication breakdown per step")
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("status", help="this device, the cluster's hosts, and runs in progress")
    p.add_argument("--cluster")
    p.add_argument("--local", action="store_true", help="only this machine")
    p.set_defaults(func=cmd_status)

    from mlx_train.cli import fleet as cli_fleet

    cli_fleet.add_commands(sub)
    from mlx_train.cli import models as cli_models

    cli_models.add_commands(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    given = sys.argv[1:] if argv is None else argv
    a = argparse.Namespace(command=given[0] if given else "")
    try:
        a = parser.parse_args(argv)  # inside: an argparse type can meet a bug too
        return a.func(a)
    except UserError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message quotes
        print(f"mlx-train {a.command}: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug, not bad input (that is a UserError, raised where the input enters)
        log = _crash_log(argv)
        print(f"mlx-train {a.command}: internal error, please report it with {log} (it holds the traceback)",
              file=sys.stderr)
        return 1


def _crash_log(argv: Optional[List[str]]) -> str:
    """Write the current exception's traceback to a file under the state directory; return its path."""
    import os
    import tempfile
    import time
    import traceback
    from pathlib import Path

    text = f"mlx-train {' '.join(sys.argv[1:] if argv is None else argv)}\n\n{traceback.format_exc()}"
    state = Path(os.environ.get("MLX_TRAIN_STATE", str(Path.home() / ".mlx-train"))) / "crashes"
    for folder in (state, Path(tempfile.gettempdir())):  # the state directory may itself be the problem
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            path.write_text(text)
            return str(path)
        except OSError:
            continue
    return "(no writable place for the log)"


if __name__ == "__main__":
    sys.exit(main())
