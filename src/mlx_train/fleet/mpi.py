"""Open MPI: where MLX finds libmpi, and the environment and command line of an mpirun.

The one owner of these facts, used by launch (training under mpirun, here or on the first host)
and check-network (its MPI all-reduce probes).
"""

from __future__ import annotations

import glob
import os
import shlex
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from mlx_train.fleet.ssh import host_part

# MLX dlopens MLX_MPI_LIBNAME, by default the unversioned libmpi.so (.dylib); Debian's
# openmpi-bin without libopenmpi-dev ships only the versioned name.
LIBMPI_PATHS = ("/usr/lib/*/libmpi.so", "/usr/lib/libmpi.so", "/opt/homebrew/lib/libmpi.dylib",
                "/usr/local/lib/libmpi.dylib")
VERSIONED_LIBMPI = "libmpi.so.40"
# Open MPI refuses to run as root without both.
AS_ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}

# For a shell command on a node: sets $lib to the mpirun flag naming the versioned library when
# the node has no unversioned one, else to nothing.
_LIB_PROBE = (f"lib='-x MLX_MPI_LIBNAME={VERSIONED_LIBMPI}'; for f in {' '.join(LIBMPI_PATHS)}; "
              'do [ -e "$f" ] && lib=; done; ')


def env_here() -> Dict[str, str]:
    """The environment an mpirun started on this machine passes to its ranks (each key with -x)."""
    env = {"PYTHONUNBUFFERED": "1"}
    if os.geteuid() == 0:
        env.update(AS_ROOT)
    if sys.platform.startswith("linux") and not any(glob.glob(p) for p in LIBMPI_PATHS):
        env["MLX_MPI_LIBNAME"] = VERSIONED_LIBMPI
    return env


def forward(env: Dict[str, str]) -> List[str]:
    """mpirun's flags passing each variable of `env` on to the ranks."""
    return [a for key in sorted(env) for a in ("-x", key)]


def on_node(hosts: Sequence[Tuple[str, int]], program: Sequence[str], options: Sequence[str] = (),
            env: Optional[Dict[str, str]] = None) -> str:
    """A shell command for a node: mpirun there, one rank per slot of `hosts` ((ssh destination,
    slots)), reaching the others over the nodes' own key mesh, passing `env` on to the ranks.
    Whether the node runs as root or lacks the unversioned libmpi cannot be told from here: the
    root variables are harmless where not needed, and the library is probed on the node itself."""
    env = {**(env or {}), **AS_ROOT}
    mpirun = ["mpirun", "-np", str(sum(slots for _, slots in hosts)), *options,
              "--host", ",".join(f"{host_part(dest)}:{slots}" for dest, slots in hosts), *forward(env)]
    assign = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    return f"{_LIB_PROBE}exec env {assign} {shlex.join(mpirun)} $lib {shlex.join(program)}"
