"""Checkpoints: safetensors for arrays, a JSON manifest with checksums, atomic by rename.

Layout: `checkpoints/step-000120/{model,optimizer}.safetensors` + `manifest.json`. A checkpoint is
written under a temporary name and renamed into place, so a crash mid-write never leaves a
directory that looks complete; a damaged one (bad checksum, missing file) is skipped on load in
favour of the previous one.

The files are streamed (`Stream`): each safetensors header is written first from the layouts
(`file_layout`: the bytes `mx.save_safetensors` would write), then each array at its place as it
comes, so a fully sharded run's rank 0 writes one gathered piece at a time and never holds the
whole (the trainer hands the pieces to its writer thread through a `Handoff`).

Rank 0 writes them, and where some rank's checkpoints directory is not rank 0's (hosts without a
shared disk) the lowest such rank, the mirror, writes the same files into its own
(rank/trainer.py find_stores: each rank's mark, `mark_here`/`first_here`, says which ranks share a
directory); a restore reads the newest intact copy wherever it is.

The manifest's `meta` records the run's identity (TrainConfig.identity()); a resume refuses a
checkpoint whose identity differs from the run's (`identity_mismatch`). No RNG state is stored:
the data order is a pure function of (seed, step) and the trainer reseeds the RNG every step.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import queue
import shutil
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import mlx.core as mx
import numpy as np

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


def bytes_of(v: mx.array) -> memoryview:
    """The array's own bytes, without a copy where they are contiguous (half the time of copying to
    numpy first)."""
    view = memoryview(v)
    return (view if view.c_contiguous else memoryview(np.array(v))).cast("B")


def leaf_crc(v: mx.array) -> tuple:
    """(crc32 of the array's own bytes, their length): a parameter checksum's part for one leaf."""
    view = bytes_of(v)
    return zlib.crc32(view), view.nbytes


_CRC_ZEROS: List[List[int]] = []  # [i]: the GF(2) operator appending 2**i zero bytes to a crc32 (zlib's)


def _gf2_times(mat: List[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def combined_crc(parts: Iterable[tuple]) -> int:
    """The crc32 of the concatenation of byte strings from each one's (crc32, length): zlib's
    crc32_combine, which Python's zlib lacks, so a checksum needs no leaf held after its own crc
    (and a fully sharded run's needs no leaf gathered: each owner's crcs of its slices)."""
    if not _CRC_ZEROS:
        op = [0xEDB88320] + [1 << n for n in range(31)]  # one zero bit
        for _ in range(3):  # -> one zero byte
            op = [_gf2_times(op, op[n]) for n in range(32)]
        for _ in range(64):
            _CRC_ZEROS.append(op)
            op = [_gf2_times(op, op[n]) for n in range(32)]
    crc = 0
    for part, length in parts:
        i = 0
        while length:
            if length & 1:
                crc = _gf2_times(_CRC_ZEROS[i], crc)
            length >>= 1
            i += 1
        crc ^= part
    return crc


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
    """Write checkpoint `step` under `root` atomically and keep only the newest `keep`: a Stream
    given everything at once (the trainer streams it piece by piece).

    Raises WriteFailed when the storage refuses it; the partial temporary directory is removed
    and every existing checkpoint is left as it was."""
    mx.eval(model, optimizer)
    stream = Stream(root, step, {"model": file_layout(specs(model)), "optimizer": file_layout(specs(optimizer))})
    try:
        stream.put("model", model.items())
        stream.put("optimizer", optimizer.items())
    except BaseException:
        stream.abort()
        raise
    return stream.close(meta or {}, keep)


def specs(flat: Dict[str, mx.array]) -> List[Tuple[str, tuple, Any]]:
    """(key, shape, dtype) of each array, in the dict's order: what file_layout needs."""
    return [(k, tuple(v.shape), v.dtype) for k, v in flat.items()]


@dataclass(frozen=True)
class FileLayout:
    """A safetensors file as mx.save_safetensors writes it, before its arrays are known: its
    header (the 8-byte length and the JSON) and where each key's bytes go, (offset in the file,
    length)."""

    header: bytes
    spans: Dict[str, Tuple[int, int]]
    size: int


def file_layout(items: List[Tuple[str, tuple, Any]]) -> FileLayout:
    """The layout of the file mx.save_safetensors would write for a dict of these (key, shape,
    dtype), in this order, byte for byte. MLX lays the arrays out in its C++ hash map's order,
    not the dict's or the header's (sorted), so that order, and its names of the dtypes, are
    read from a write of one-element arrays with the same keys in the same order: a few bytes
    per key, into memory."""
    probe = io.BytesIO()
    mx.save_safetensors(probe, {k: mx.zeros((1,), dtype) for k, _, dtype in items})
    raw = probe.getvalue()
    seen = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    nbytes = {k: int(np.prod(shape, dtype=np.int64)) * dtype.size for k, shape, dtype in items}
    head: Dict[str, Any] = {"__metadata__": seen["__metadata__"]} if "__metadata__" in seen else {}
    offset, places = 0, {}
    for key in sorted(nbytes, key=lambda k: seen[k]["data_offsets"][0]):
        if nbytes[key] == 0:  # as mx.save_safetensors refuses it
            raise ValueError(f"cannot serialize an empty array: {key}")
        places[key] = offset
        offset += nbytes[key]
    for key, shape, _ in items:
        head[key] = {"data_offsets": [places[key], places[key] + nbytes[key]], "dtype": seen[key]["dtype"],
                     "shape": list(shape)}
    # nlohmann::json's dump, as MLX writes it: keys sorted, no spaces, UTF-8 as is.
    text = json.dumps(head, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    header = struct.pack("<Q", len(text)) + text
    return FileLayout(header, {k: (len(header) + places[k], nbytes[k]) for k in places}, len(header) + offset)


class Stream:
    """Checkpoint `step` under `root` written a piece at a time: each file's header first (from
    its FileLayout), each array's bytes at their place as they come (in any order: a sharded run
    gathers them group by group), then `close` checks every array came, writes the digests and
    the manifest, fsyncs and renames into place, as `save` always did. The writer holds no array
    after its `put`: a save that hands it one piece at a time holds one piece, not the model.

    The storage's refusals (at the opening, a put or the close) raise WriteFailed, with the
    temporary directory removed."""

    def __init__(self, root: Path, step: int, layouts: Dict[str, FileLayout]):
        self.root, self.step, self.layouts = Path(root), step, layouts
        self.final = self.root / step_name(step)
        self.tmp = self.root / f".tmp-{self.final.name}-{os.getpid()}"
        self.left = {name: set(layout.spans) for name, layout in layouts.items()}
        self._fds: Dict[str, int] = {}
        with self._guard():
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
            for name, layout in layouts.items():
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                self._fds[name] = os.open(self.tmp / f"{name}.safetensors", flags, 0o644)
                _pwrite(self._fds[name], memoryview(layout.header), 0)

    def put(self, name: str, pairs: Iterable[Tuple[str, mx.array]]) -> None:
        """Write these (key, evaluated array) of file `name` at their places."""
        spans = self.layouts[name].spans
        with self._guard():
            for key, value in pairs:
                if key not in self.left[name]:
                    raise RuntimeError(f"{key} is not in {name}.safetensors' layout, or was written already")
                offset, nbytes = spans[key]
                view = bytes_of(value)
                if view.nbytes != nbytes:
                    raise RuntimeError(f"{key}: {view.nbytes} bytes where {name}.safetensors' layout has {nbytes}")
                _pwrite(self._fds[name], view, offset)
                self.left[name].discard(key)
                del view

    def close(self, meta: dict, keep: int) -> Path:
        """Seal the checkpoint (every array must have come) and keep only the newest `keep`."""
        missing = sorted(k for keys in self.left.values() for k in keys)
        if missing:
            self.abort()
            raise RuntimeError(f"checkpoint {self.final.name}: no piece held {', '.join(missing[:5])}")
        with self._guard():
            for fd in self._fds.values():
                os.fsync(fd)
            self._close_files()
            files = {f"{name}.safetensors": crc32_file(self.tmp / f"{name}.safetensors") for name in self.layouts}
            manifest = {"format": FORMAT, "step": self.step, "time": time.time(), "files": files, "meta": meta}
            (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            with (self.tmp / "manifest.json").open("rb") as fh:
                os.fsync(fh.fileno())
        if self.final.exists():  # a rerun of the same step after a restart: replace it
            shutil.rmtree(self.final)
        os.rename(self.tmp, self.final)
        _fsync_dir(self.root)
        prune(self.root, keep)
        return self.final

    def abort(self) -> None:
        self._close_files()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _close_files(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def _guard(self) -> "_Refused":
        return _Refused(self)


class _Refused:
    """Turns the storage's refusal inside a Stream's call into WriteFailed, the partial write removed."""

    def __init__(self, stream: Stream):
        self.stream = stream

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None and isinstance(exc, (OSError, ValueError)):
            self.stream.abort()
            need = sum(layout.size for layout in self.stream.layouts.values())
            raise WriteFailed(f"cannot write {self.stream.final.name} in {self.stream.root}: "
                              f"{why_failed(exc, self.stream.root, need)}") from exc
        return False


def _pwrite(fd: int, view: memoryview, offset: int) -> None:
    while view.nbytes:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


class Handoff:
    """A save's pieces from the training thread to the writer thread, one write in flight.

    `give` (training thread) waits until the writer is done with the previous piece, drops it and
    hands over this one; so the training thread gathers piece i while piece i-1 is written, and
    the arrays are freed in the training thread, never by the writer (the snapshot's rule).
    `end` says there are no more (with the manifest's meta, or None: the save was abandoned).
    `pieces` (writer thread) yields each piece and must be iterated to its end, even after a
    failed write, so that `give` never waits for ever."""

    def __init__(self) -> None:
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._done = threading.Semaphore(0)
        self._given = False
        self.held: Any = None  # the last piece given: freed once the write is over
        self.meta: Optional[dict] = None

    def give(self, piece: Any) -> None:
        if self._given:
            self._done.acquire()
        self._given = True
        self.held = piece  # the previous piece goes here, in this thread
        self._queue.put(piece)

    def end(self, meta: Optional[dict]) -> None:
        self._queue.put(_End(meta))

    def pieces(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if isinstance(item, _End):
                self.meta = item.meta
                return
            yield item
            del item  # the training thread frees it
            self._done.release()


@dataclass(frozen=True)
class _End:
    meta: Optional[dict]


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


def mark_here(root: Path, nonce: int, rank: int) -> Optional[Path]:
    """Leave `rank`'s mark for this launch (`nonce`) in the checkpoints directory as this host sees
    it; None when the storage refuses it (that rank keeps no copy)."""
    mark = Path(root) / f"{_MARK}{nonce}-{rank}"
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        mark.touch()
    except OSError:
        return None
    return mark


def first_here(root: Path, nonce: int, size: int) -> int:
    """The lowest rank whose mark of this launch this host sees in `root`: ranks that see the same
    one write to the same storage (one directory on a shared disk, or one host's own disk)."""
    return next((r for r in range(size) if (Path(root) / f"{_MARK}{nonce}-{r}").exists()), -1)


_MARK = ".here-"


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
