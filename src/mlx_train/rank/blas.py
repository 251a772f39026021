"""A rank's process environment on Linux: which BLAS the CPU build of MLX uses (and how to give it
a fast one), and how glibc's allocator keeps its memory.

The `mlx[cpu]` wheel bundles netlib's reference BLAS (~4 GFLOP/s for a 1024^2 matmul on this
kind of machine). Preloading an optimized libblas.so.3 (Debian's OpenBLAS) makes MLX's matmuls
~30x faster. Its threads are split among the ranks sharing a host so cores are not oversubscribed.

The CPU build allocates every array with plain malloc (MLX keeps a buffer cache only on Metal).
glibc's defaults give large freed blocks back to the kernel (mmap'd ones, and the heap's top past
128 KiB), so every step faults the same memory in again. Kept instead, as Metal's cache keeps it:
a 3.4M-parameter llama step (fresh processes, alternating) went from 635 ms against mlx-lm's 615
to 607 against 607 (mlx-lm's own step, which materializes less, hardly moved). The environment
variables take effect at exec, hence the re-exec (needs_reexec) that applies them with the BLAS.
"""

from __future__ import annotations

import glob
import os
import platform
from typing import Dict, Optional

# Debian/Ubuntu paths of OpenBLAS' libblas.so.3 (pthread build first: it scales with cores).
_CANDIDATES = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/*-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
)
_DONE = "MLX_TRAIN_BLAS_SET"
# Blocks up to 32 MiB (the largest glibc allows) come from the heap, and freed memory stays there.
# One arena: glibc gives each new thread (lanes, MLX's stream threads) an arena of its own that
# reserves address space and keeps its own free memory; under an address-space limit (`prlimit
# --as`, tests/test_recovery.py) two lanes' arenas alone made a step that fitted crash. Measured:
# no difference in step time with two lanes allocating from the one arena.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_ARENA_MAX": "1"}


def find_openblas() -> Optional[str]:
    if platform.system() != "Linux":
        return None
    for pattern in _CANDIDATES:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def rank_env(ranks_on_host: int, cores: Optional[int] = None) -> Dict[str, str]:
    """Environment that gives one of `ranks_on_host` ranks on Linux an optimized BLAS and its share
    of cores, and keeps its freed memory for the next step ({} elsewhere)."""
    if platform.system() != "Linux":
        return {}
    env = {**ALLOCATOR, _DONE: "1"}
    lib = find_openblas()
    if lib is None or os.environ.get("MLX_TRAIN_NO_OPENBLAS"):
        return env
    cores = cores or os.cpu_count() or 1
    threads = str(max(1, cores // max(1, ranks_on_host)))
    preload = " ".join(p for p in (lib, os.environ.get("LD_PRELOAD", "")) if p)
    return {**env, "LD_PRELOAD": preload, "OPENBLAS_NUM_THREADS": threads}


def needs_reexec() -> bool:
    return platform.system() == "Linux" and not os.environ.get(_DONE)


def in_use() -> str:
    """Name the BLAS that MLX's matmuls call in this process."""
    if platform.system() == "Darwin":
        return "Accelerate (Metal/CPU, macOS)"
    provider = _global_provider("cblas_sgemm")
    if provider and "openblas" in provider:
        return f"OpenBLAS ({_openblas_threads()} threads)"
    try:
        maps = open("/proc/self/maps").read()
    except OSError:
        return "unknown"
    # Not in the global scope: MLX binds its own bundled copy (numpy's OpenBLAS, also mapped, uses
    # suffixed symbols and serves only numpy, so "openblas" in the maps proves nothing).
    if "mlx_cpu.libs/libblas" in maps or "libblas" in maps:
        return "reference BLAS bundled with mlx[cpu] (slow: apt-get install libopenblas0-pthread)"
    return "unknown"


def _global_provider(symbol: str) -> Optional[str]:
    """Path of the library that serves `symbol` in the global scope (a preload wins), or None."""
    import ctypes

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    try:
        here = ctypes.CDLL(None)
        address = ctypes.cast(getattr(here, symbol), ctypes.c_void_p)
    except (AttributeError, OSError):
        return None
    info = DlInfo()
    if not here.dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode())


def _openblas_threads() -> str:
    """The thread count OpenBLAS itself reports (preloaded, its symbols are global)."""
    import ctypes

    try:
        return str(ctypes.CDLL(None).openblas_get_num_threads())
    except (AttributeError, OSError):
        return os.environ.get("OPENBLAS_NUM_THREADS", "auto")


def set_threads(n: int) -> bool:
    """Give OpenBLAS `n` threads from now on, if OpenBLAS serves MLX's matmuls here (rank/lanes.py
    runs several matmuls at once, one per lane, each on a share of the rank's cores)."""
    import ctypes

    if "openblas" not in (_global_provider("cblas_sgemm") or ""):
        return False
    ctypes.CDLL(None).openblas_set_num_threads(max(1, int(n)))
    return True


def cores_of_rank() -> int:
    """The cores this rank owns: its OpenBLAS thread share (rank_env), else the whole machine's."""
    try:
        return max(1, int(os.environ.get("OPENBLAS_NUM_THREADS", "")))
    except ValueError:
        return max(1, os.cpu_count() or 1)


def allocator_in_use() -> str:
    """How this process's allocator treats freed memory (the settings rank_env gives a rank)."""
    if platform.system() != "Linux":
        return "system"
    if all(os.environ.get(k) == v for k, v in ALLOCATOR.items()):
        return "glibc, freed memory kept"
    return "glibc defaults (freed memory returned: slower steps)"
