"""Byte quantities as people write them ("8GiB", "512MB", "1e9")."""

from __future__ import annotations

import re

from mlx_train.errors import UserError

# Far beyond any device, and still an exact integer everywhere sizes go (numpy, MLX, JSON).
MAX_BYTES = 2**60
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise UserError(f"cannot read {text!r} as a size: write bytes or e.g. 512MiB, 8GiB, 16GB")
    try:
        value = float(m.group(1)) * _UNITS[unit]
    except ValueError:
        raise UserError(f"cannot read {text!r} as a size: write bytes or e.g. 512MiB, 8GiB, 16GB") from None
    if not value >= 1:  # NaN included
        raise UserError(f"size {text!r} must be at least 1 byte: write e.g. 512MiB, 8GiB, 16GB")
    if value > MAX_BYTES:
        raise UserError(f"size {text!r} is larger than any device ({MAX_BYTES} bytes at most): write e.g. 8GiB")
    return int(value)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
