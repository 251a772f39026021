"""Sub-commands for fine-tuned models: export (fuse adapters into the base) and generate (a sample)."""

from __future__ import annotations

import argparse

from mlx_train.errors import UserError


def cmd_export(a: argparse.Namespace) -> int:
    from mlx_train.controller.export import fuse

    if not a.fuse:
        raise UserError("export needs --fuse OUT: the directory to write the fused model to")
    out = fuse(a.run_dir, a.fuse, dequantize=a.dequantize)
    print(f"fused model written to {out} (open it with mlx_lm.load('{out}'))")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from mlx_train.controller.export import sample

    if a.max_tokens <= 0:
        raise UserError("--max-tokens must be a positive integer")
    print(sample(a.run_dir, a.prompt, a.max_tokens, raw=a.raw), flush=True)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="write a fine-tuning run's model for mlx-lm (base + adapters fused)")
    p.add_argument("run_dir", help="the run directory (runs/<id>)")
    p.add_argument("--fuse", metavar="OUT", help="directory for the fused model (must not exist or be empty)")
    p.add_argument("--dequantize", action="store_true", help="write a quantized base back in full precision")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="print a sample from a fine-tuning run's model")
    p.add_argument("run_dir", help="the run directory (runs/<id>)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.set_defaults(func=cmd_generate)
