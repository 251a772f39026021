"""Checkpoints: safetensors for arrays, a JSON manifest with checksums, atomic by rename.

Layout: `checkpoints/step-000120/{model,optimizer}.safetensors` + `manifest.json`. A checkpoint is
written under a temporary name and renamed into place, so a crash mid-write never leaves a
directory that looks complete; a damaged one (bad checksum, missing file) is skipped on load in
favour of the previous one.

The manifest's `meta` records the run's identity (TrainConfig.identity()); a resume refuses a
checkpoint whose identity differs from the run's (`identity_mismatch`). No RNG state is stored:
the data order is a pure function of (seed, step) and the trainer reseeds the RNG every step.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import mlx.core as mx

# Format 2 names each file's digest "crc32:<hex>" (twice sha256's speed here: 2.1 vs 1.1 GB/s,
# a third of a checkpoint's write time went to the digest); format 1 (sha256) still loads.
FORMAT = 2
_FORMATS = (1, 2)
_PREFIX = "step-"


@dataclass
class Checkpoint:
    step: int
    path: Path
    model: Dict[str, mx.array]
    optimizer: Dict[str, mx.array]
    meta: dict


@dataclass
class LoadResult:
    checkpoint: Optional[Checkpoint]
    # (path, reason) for every newer checkpoint that was damaged and skipped.
    skipped: List[tuple] = field(default_factory=list)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def crc32_file(path: Path) -> str:
    """The digest a checkpoint's manifest keeps of each file: it catches a torn or damaged file
    (what it is for), at memory speed."""
    crc = 0
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            crc = zlib.crc32(chunk, crc)
    return f"crc32:{crc:08x}"


def _digest_matches(path: Path, digest: str) -> bool:
    return (crc32_file(path) if digest.startswith("crc32:") else sha256_file(path)) == digest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteFailed(Exception):
    """A checkpoint could not be written (disk full, no permission, read-only): nothing of it is left."""


def save(root: Path, step: int, model: Dict[str, mx.array], optimizer: Dict[str, mx.array],
         meta: Optional[dict] = None, keep: int = 3) -> Path:
    """Write checkpoint `step` under `root` atomically and keep only the newest `keep`.

    Raises WriteFailed when the storage refuses it; the partial temporary directory is removed
    and every existing checkpoint is left as it was."""
    final = root / step_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files = {}
        for name, tree in {"model": model, "optimizer": optimizer}.items():
            path = tmp / f"{name}.safetensors"
            mx.save_safetensors(str(path), tree)
            files[path.name] = crc32_file(path)
        manifest = {"format": FORMAT, "step": step, "time": time.time(), "files": files, "meta": meta or {}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    except (OSError, RuntimeError, ValueError) as exc:  # MLX reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        need = sum(v.nbytes for tree in (model, optimizer) for v in tree.values())
        raise WriteFailed(f"cannot write {final.name} in {root}: {why_failed(exc, root, need)}") from exc
    if final.exists():  # a rerun of the same step after a restart: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    prune(root, keep)
    return final


def snapshot(flat: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """The arrays of `flat` as they are now, evaluated and row-contiguous, for a write in the background.

    MLX arrays are immutable and the step replaces the parameters with new arrays (it never writes
    into these: a buffer is reused only when nothing else holds it), so holding them is a snapshot;
    making them contiguous here leaves the writer thread no graph to evaluate."""
    out = {k: mx.contiguous(v) for k, v in flat.items()}
    mx.eval(out)
    return out


class Writer:
    """One checkpoint write at a time, in a background thread, while training goes on.

    `start` hands it a job (a function writing a snapshot); `finish` waits for it (or, without
    block, only looks) and returns (what the job returned or raised, seconds it took). The thread is
    not a daemon: a rank that ends while a write is going finishes the write first."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._result: Optional[Tuple[Any, float]] = None

    def start(self, job: Callable[[], Any]) -> None:
        if self._thread is not None:
            raise RuntimeError("a checkpoint write is still going: finish() it first")
        t0 = time.perf_counter()

        def run() -> None:
            try:
                out = job()
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread, which decides
                out = exc
            self._result = (out, time.perf_counter() - t0)

        self._thread = threading.Thread(target=run, name="checkpoint-writer")
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def finish(self, block: bool = True) -> Optional[Tuple[Any, float]]:
        """The finished write's (outcome, seconds), or None when there is none (or, without block, not yet)."""
        if self._thread is None or (not block and self._thread.is_alive()):
            return None
        self._thread.join()
        result, self._thread, self._result = self._result, None, None
        return result


def why_failed(exc: BaseException, root: Path, need: int) -> str:
    """Why a write under `root` of `need` bytes failed, in words (errno names; MLX's own errors say less)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{os.strerror(exc.errno)} ({errno.errorcode.get(exc.errno, exc.errno)})"
    try:  # MLX's own write error names no cause; a disk without room for the arrays is the usual one
        free = shutil.disk_usage(root).free
    except OSError:
        free = None
    if free is not None and free < need:
        return (f"{os.strerror(errno.ENOSPC)} (ENOSPC): {need / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free "
                f"[{exc}]")
    return str(exc) or exc.__class__.__name__


def step_name(step: int) -> str:
    return f"{_PREFIX}{step:06d}"


def agreed(path: Path) -> bool:
    """Were the ranks' parameters identical when `path` was written? (Older checkpoints: assumed.)"""
    try:
        return json.loads((path / "manifest.json").read_text()).get("meta", {}).get("agreed") is not False
    except (OSError, ValueError):
        return False


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep`, and always the newest one written while the ranks agreed."""
    steps = list_steps(root)
    safe = next((p for p in reversed(steps) if agreed(p)), None)
    for old in steps[:-keep]:
        if old != safe:
            shutil.rmtree(old, ignore_errors=True)


def remove_temporaries(root: Path) -> None:
    """Remove what writes cut short left (a rank stopped mid-write: its temporary directory). Only
    at restore, when no write of this run can be going on (one supervisor per run: its lock)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(f".tmp-{_PREFIX}") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def list_steps(root: Path) -> List[Path]:
    """Checkpoint directories, oldest first (temporary ones excluded)."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(_PREFIX):]))


def verify(path: Path) -> Optional[str]:
    """Return why checkpoint `path` is unusable, or None when it is intact."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        return f"manifest unreadable ({exc.__class__.__name__})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        return "manifest is not a checkpoint manifest"
    if manifest.get("format") not in _FORMATS:
        return f"unknown checkpoint format {manifest.get('format')!r}"
    if manifest.get("meta", {}).get("agreed") is False:
        return f"written while the ranks' parameters disagreed ({manifest['meta'].get('param_checksum')})"
    for name, digest in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} missing"
        if not isinstance(digest, str) or not _digest_matches(f, digest):
            return f"{name} checksum mismatch"
    return None


def load_latest(root: Path) -> LoadResult:
    result = LoadResult(None)
    for path in reversed(list_steps(root)):
        reason = verify(path)
        if reason:
            result.skipped.append((str(path), reason))
            continue
        manifest = json.loads((path / "manifest.json").read_text())
        opt = mx.load(str(path / "optimizer.safetensors"))
        opt.pop("__rng__", None)  # written by earlier versions, never needed (see the module docstring)
        result.checkpoint = Checkpoint(manifest["step"], path, mx.load(str(path / "model.safetensors")), opt,
                                       manifest.get("meta", {}))
        return result
    return result


NO_IDENTITY = -1


def identity_mismatch(meta: dict, identity: dict) -> int:
    """Bit i set when field i of `identity` (sorted keys) differs from the one saved in `meta`;
    NO_IDENTITY when the checkpoint records none. 0 means the checkpoint belongs to this run.

    An int so that rank 0, the only rank that reads the checkpoint, can hand the verdict to every
    rank in the same all_sum as the step (each rank then fails with the same message).
    """
    saved = meta.get("identity")
    if not isinstance(saved, dict):
        return NO_IDENTITY
    mine = json.loads(json.dumps(identity))  # tuples become lists, as in the saved JSON
    return sum(1 << i for i, key in enumerate(sorted(mine)) if saved.get(key) != mine[key])


def describe_mismatch(mask: int, identity: dict) -> str:
    if mask == NO_IDENTITY:
        return "it records no run identity"
    keys = [k for i, k in enumerate(sorted(identity)) if mask & (1 << i)]
    return ", ".join(keys) + (" differs" if len(keys) == 1 else " differ")
