"""The command line: `mlx-train` and its sub-commands.

Owns argument parsing and the one-line error contract (a `UserError` becomes `error: ...` on
stderr and exit 2). Every command parses its flags and calls one library function; nothing else
lives here. May import every other side; nothing imports it.
"""

from mlx_train.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
