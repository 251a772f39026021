"""A text corpus for the tests and benches: the same bytes on every machine, at every commit.

They used to read this package's own sources. Those change with every edit, and with them every
loss and weight a test compares: a sharded run's checkpoint was within 1.2e-7 of data parallel's on
one commit's sources and one weight 1.6e-5 apart (twice the test's tolerance) on the next's. AdamW
divides a gradient element whose terms cancel to ~1e-9 by its own small size, so the last bits of
rounding became a visible difference in that weight. A test's numbers should move only when the
code under test does.

Made from a seeded generator, not the stdlib: the fleet's nodes may run another Python release than
the controller. Only `random.Random.random()` is used: Python keeps its sequence for a given seed
across releases (the other helpers of `random` may change).
"""

from __future__ import annotations

import random
from pathlib import Path

# Python-looking lines of a small vocabulary: structure a byte-level model learns in a few steps.
NAMES = ("model", "batch", "rank", "step", "loss", "grad", "layer", "state", "shard", "group", "size",
         "host", "token", "value", "total", "index", "chunk", "stage", "cache", "scale", "norm", "rate")
CALLS = ("sum", "len", "max", "min", "sorted", "range", "list", "dict", "zip", "float", "int", "abs")
WORDS = ("the", "each", "rank", "holds", "its", "slice", "of", "and", "sends", "to", "next", "one",
         "every", "step", "keeps", "what", "a", "host", "reads", "when", "it", "is", "not", "yet", "done")

FILES = 24
LINES = 320  # ~10 KB a file, ~250 KB in all


def write(where: Path, seed: int = 17) -> Path:
    """FILES files of generated Python-like text in `where` (made if missing); returns `where`."""
    rng = random.Random(seed)

    def pick(seq):
        return seq[int(rng.random() * len(seq))]

    def line() -> str:
        kind = rng.random()
        if kind < 0.15:
            return f"def {pick(NAMES)}_{pick(NAMES)}({pick(NAMES)}, {pick(NAMES)}):"
        if kind < 0.35:
            return "# " + " ".join(pick(WORDS) for _ in range(3 + int(rng.random() * 8))) + "."
        if kind < 0.5:
            return f"    return {pick(CALLS)}({pick(NAMES)}) + {int(rng.random() * 100)}"
        if kind < 0.6:
            return f"    for {pick(NAMES)} in {pick(CALLS)}({pick(NAMES)}.{pick(NAMES)}):"
        return f"    {pick(NAMES)} = {pick(NAMES)}.{pick(NAMES)}[{int(rng.random() * 10)}] * {pick(NAMES)}"

    where.mkdir(parents=True, exist_ok=True)
    for i in range(FILES):
        (where / f"part{i:02d}.py").write_text("\n".join(line() for _ in range(LINES)) + "\n")
    return where
