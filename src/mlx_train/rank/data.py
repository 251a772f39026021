"""Corpora: the bytes or token ids a run trains on (their batching is rank/batcher.py's).

The default corpus is the running Python's standard library source: every machine that can run
the trainer has it, so the main job needs no download. Tokens are bytes (vocabulary 256) unless a
`.npy` of token ids says otherwise.
"""

from __future__ import annotations

import json
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from mlx_train.config import DataConfig, ModelConfig, ModelKind
from mlx_train.errors import UserError
from mlx_train.rank.batcher import Batcher

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclass
class Corpus:
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    description: str

    def batcher(self, split: str, seq_len: int, seed: int) -> "Batcher":
        tokens = self.train if split == "train" else self.val
        return Batcher(tokens, seq_len, seed, "training" if split == "train" else "validation")


def load_corpus(cfg: DataConfig, model: Optional[ModelConfig] = None):
    """The corpus for `cfg`: bytes for the built-in GPT and factories, the model's own tokens (and
    JSONL formats, see token_data.py) for a pretrained model."""
    if model is not None:
        from mlx_train.rank.hf import model_path

        if model.kind is ModelKind.PRETRAINED:
            from mlx_train.rank.token_data import load_token_corpus

            return load_token_corpus(cfg, model_path(model.name))
    if cfg.path is None:
        return _stdlib_corpus(cfg.val_fraction)
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise UserError(f"data path {path} does not exist: pass a text file or folder, a .jsonl with a "
                        "'text' field, or a .npy of token ids")
    if path.is_dir() and (path / "train.jsonl").is_file():
        return _jsonl_dir_bytes(path, cfg.val_fraction)
    if path.is_dir() or not path.is_file():  # a folder (whatever its name), or a pipe/device: read as a folder
        tokens, vocab = _load_text(path), 256
    elif path.suffix == ".npy":
        tokens = _load_npy(path)
        vocab = max(256, int(tokens.max()) + 1)
    elif path.suffix == ".jsonl":
        tokens, vocab = _load_jsonl(path), 256
    else:
        tokens, vocab = _load_text(path), 256
    cut = len(tokens) - max(1, int(len(tokens) * cfg.val_fraction))
    return Corpus(tokens[:cut], tokens[cut:], vocab, f"{path} ({len(tokens):,} tokens)")


def _stdlib_corpus(val_fraction: float) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts))
    train, val = [], []
    for f in files:
        rel = f.relative_to(root).as_posix()
        # A file-level split keyed on the path keeps the split identical on every host and run.
        bucket = val if zlib.crc32(rel.encode()) % 1000 < val_fraction * 1000 else train
        bucket.append(f.read_bytes())
    to_arr = lambda parts: np.frombuffer(b"\n".join(parts), dtype=np.uint8)
    return Corpus(to_arr(train), to_arr(val), 256, f"Python {sysconfig.get_python_version()} stdlib ({len(files)} files)")


def _load_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"{path} is not a readable .npy file ({type(exc).__name__}): write it with numpy.save") \
            from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or arr.size == 0 or arr.min() < 0 \
            or arr.max() >= 2**31:
        raise UserError(f"{path} must hold a non-empty 1-D array of integer token ids in [0, 2**31): save such an "
                        "array with numpy.save")
    return arr


def _load_jsonl(path: Path) -> np.ndarray:
    docs = []
    with path.open("rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)["text"].encode())
            except (ValueError, KeyError, TypeError, AttributeError):
                raise UserError(f"{path}:{n} is not a JSON object with a string 'text' field: fix or remove that "
                                "line") from None
    if not docs:
        raise UserError(f"{path} holds no documents: add lines like {{\"text\": \"...\"}}")
    return np.frombuffer(b"\n".join(docs), dtype=np.uint8)


def _jsonl_dir_bytes(path: Path, val_fraction: float) -> Corpus:
    """A train.jsonl / valid.jsonl folder (token_data.py's formats) as bytes for the byte-level GPT:
    chat messages as "role: content" lines, prompt and completion end to end."""
    from mlx_train.rank.token_data import read_records  # here: token_data loads MLX, which the controller does not

    def render(obj: dict, fmt: str) -> bytes:
        if fmt == "messages":
            return "".join(f"{m.get('role', '')}: {m.get('content', '')}\n" for m in obj["messages"]).encode()
        return (obj["prompt"] + obj["completion"] if fmt == "prompt/completion" else obj["text"]).encode()

    def docs(f: Path) -> list:
        return [render(obj, fmt) for _, obj, fmt in read_records(f)]

    train = docs(path / "train.jsonl")
    if (path / "valid.jsonl").is_file():
        val = docs(path / "valid.jsonl")
    else:
        cut = len(train) - max(1, int(len(train) * val_fraction))
        train, val = train[:cut], train[cut:]
    if not train or not val:
        raise UserError(f"{path}: train.jsonl and the validation split each need at least one example")
    to_arr = lambda parts: np.frombuffer(b"\n".join(parts), dtype=np.uint8)
    return Corpus(to_arr(train), to_arr(val), 256, f"{path} ({len(train):,} + {len(val):,} examples, as bytes)")


def _load_text(path: Path) -> np.ndarray:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    parts = [b for b in (f.read_bytes() for f in files) if b and b"\0" not in b[:4096]]
    if not parts:
        raise UserError(f"{path} holds no text files: pass a text file or a folder of them, a .jsonl with a "
                        "'text' field, or a .npy of token ids")
    return np.frombuffer(b"\n".join(parts), dtype=np.uint8)
