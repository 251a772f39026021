"""docs/performance.md's planning table from the scaling model (planning/perf.py).

    PYTHONPATH=src python bench/scaling_table.py --micro-batch-s 1.0 --grad-bytes 1.42e9

--micro-batch-s: one device's forward + backward of one micro-batch (a 1-device run's
compute_time_s divided by its accumulation); --grad-bytes: metrics' grad_bytes (4 x parameters in fp32).
"""

from __future__ import annotations

import argparse

from mlx_train.planning.perf import LINKS, scaling_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--micro-batch-s", type=float, required=True)
    ap.add_argument("--grad-bytes", type=float, required=True)
    ap.add_argument("--devices", default="2,3,4,6,8")
    ap.add_argument("--overhead", type=float, default=0.10, help="sync share of the step to plan for")
    a = ap.parse_args()
    print(scaling_table(a.micro_batch_s, a.grad_bytes, list(LINKS.values()), [int(n) for n in a.devices.split(",")],
                        a.overhead))


if __name__ == "__main__":
    main()
