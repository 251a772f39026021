"""Users' JSONL data, tokenized with a pretrained model's tokenizer, in fixed-shape masked rows.

Input: a directory with train.jsonl and valid.jsonl (test.jsonl optional; without valid.jsonl the
last --val-fraction of train.jsonl validates), or one .jsonl file. One JSON object a line, in the
formats mlx-lm's trainer reads: {"text"}, {"prompt", "completion"}, or {"messages": [...]} (the
tokenizer's chat template applied; mlx-lm's own dataset classes do the encoding).

Each example becomes tokens plus a mask of which tokens are learned (padding never is; with
--mask-prompt the prompt is not either). 'pack' lays examples end to end and cuts rows of
seq_len + 1 tokens; 'pad' puts one example in each row. Rows then go through the same
(seed, step) -> rows mapping as the byte corpus (batcher.Batcher), so order, disjoint rank shards and
exact resumption carry over. Targets that must not count are -1 (see hf.masked_lm_loss).

Tokenizing is done once per (data, tokenizer, options) and cached on disk under
$MLX_TRAIN_CACHE (default ~/.cache/mlx-train)/tokens, written by rename so the ranks of one host
can race to fill it safely.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from mlx_train.config import DataConfig, DistributedConfig
from mlx_train.errors import UserError
from mlx_train.rank.batcher import Batcher
from mlx_train.rank.checkpoint import sha256_file

CACHE_FORMAT = 1
FORMATS = ("text", "prompt/completion", "messages")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def cache_root() -> Path:
    return Path(os.environ.get("MLX_TRAIN_CACHE") or Path.home() / ".cache" / "mlx-train")


def splits_of(path: Path) -> Dict[str, Path]:
    """{"train": file, "valid": file?, "test": file?} for a data directory or a single .jsonl."""
    if path.is_file():
        if path.suffix != ".jsonl":
            raise UserError(f"data {path}: a pretrained model trains on JSONL: pass a directory with train.jsonl "
                            "and valid.jsonl, or one .jsonl file")
        return {"train": path}
    if not (path / "train.jsonl").is_file():
        raise UserError(f"data directory {path} has no train.jsonl: put one JSON object a line there "
                        '({"text"}, {"prompt","completion"} or {"messages"}), and valid.jsonl beside it')
    return {name: path / f"{name}.jsonl" for name in ("train", "valid", "test") if (path / f"{name}.jsonl").is_file()}


def read_records(path: Path) -> Iterator[Tuple[int, dict, str]]:
    """(line number, object, format) for each non-blank line; a bad line is a UserError naming file:line."""
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as exc:
                raise UserError(f"{path}:{n} is not valid JSON ({exc.msg}): one JSON object a line") from None
            yield n, obj, record_format(obj, path, n)


def record_format(obj, path: Path, n: int) -> str:
    if isinstance(obj, dict):
        if isinstance(obj.get("messages"), list) and obj["messages"]:
            return "messages"
        if isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
            return "prompt/completion"
        if isinstance(obj.get("text"), str):
            return "text"
    keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
    raise UserError(f"{path}:{n} has none of the known keys (found: {keys or 'nothing'}): each line needs "
                    '"text", "prompt" and "completion", or "messages"')


class Encoder:
    """One record -> (token ids, index of the first learned token), through mlx-lm's dataset classes."""

    def __init__(self, tokenizer, mask_prompt: bool):
        from mlx_lm.tuner.datasets import ChatDataset, CompletionsDataset, TextDataset

        self.tokenizer, self.mask_prompt = tokenizer, mask_prompt
        self.has_template = getattr(tokenizer, "chat_template", None) is not None
        self.text = TextDataset([], tokenizer)
        self.chat = ChatDataset([], tokenizer, mask_prompt=mask_prompt)
        self.completions = CompletionsDataset([], tokenizer, "prompt", "completion", mask_prompt)

    def __call__(self, obj: dict, fmt: str, path: Path, n: int) -> Tuple[List[int], int]:
        if fmt == "text":
            return self.text.process(obj)
        if not self.has_template:
            if fmt == "messages":
                raise UserError(f"{path}:{n} is chat data but the model's tokenizer has no chat template: add a "
                                "'chat_template' to tokenizer_config.json, or write the lines as {\"text\"} or "
                                '{"prompt","completion"}')
            # No template: the prompt and completion as plain text, the completion ending the example.
            prompt = self.tokenizer.encode(obj["prompt"])
            tokens = prompt + self.tokenizer.encode(obj["completion"], add_special_tokens=False)
            if self.tokenizer.eos_token_id is not None:
                tokens.append(self.tokenizer.eos_token_id)
            return tokens, len(prompt) if self.mask_prompt else 0
        try:
            return (self.chat if fmt == "messages" else self.completions).process(obj)
        except Exception as exc:  # noqa: BLE001  (jinja and the tokenizer raise many kinds)
            raise UserError(f"{path}:{n}: the chat template failed on this line ({exc}): check its messages") from None


def tokenizer_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        f = Path(model_dir) / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@dataclass
class Examples:
    """The examples of one split, end to end: tokens, the learned-token mask, and where each starts."""

    tokens: np.ndarray   # int32
    learn: np.ndarray    # bool, learn[i]: token i is a target that counts
    starts: np.ndarray   # int64, len(examples) + 1 offsets into tokens

    def __len__(self) -> int:
        return len(self.starts) - 1


def encode_file(path: Path, tokenizer, tok_digest: str, mask_prompt: bool) -> Examples:
    """The examples of one JSONL file, from the on-disk cache when this data and tokenizer were seen."""
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, sha256_file(path), tok_digest, mask_prompt]).encode()).hexdigest()
    cached = cache_root() / "tokens" / f"{key[:32]}.npz"
    if cached.is_file():
        try:
            with np.load(cached) as z:
                return Examples(z["tokens"], z["learn"], z["starts"])
        except (OSError, ValueError, KeyError):
            pass  # damaged: tokenize again and replace it
    encode = Encoder(tokenizer, mask_prompt)
    tokens, learn, starts = [], [], [0]
    for n, obj, fmt in read_records(path):
        ids, offset = encode(obj, fmt, path, n)
        tokens.extend(ids)
        learn.extend([False] * min(offset, len(ids)) + [True] * max(len(ids) - offset, 0))
        starts.append(len(tokens))
    if len(starts) == 1:
        raise UserError(f"{path} holds no examples: one JSON object a line")
    ex = Examples(np.array(tokens, np.int32), np.array(learn, bool), np.array(starts, np.int64))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".tmp-{os.getpid()}-{cached.name}")
    with tmp.open("wb") as fh:
        np.savez(fh, tokens=ex.tokens, learn=ex.learn, starts=ex.starts)
    os.replace(tmp, cached)
    return ex


def take(ex: Examples, first: int, last: int) -> Examples:
    """Examples [first, last) of `ex`."""
    a, b = ex.starts[first], ex.starts[last]
    return Examples(ex.tokens[a:b], ex.learn[a:b], ex.starts[first:last + 1] - a)


def to_rows(ex: Examples, seq_len: int, packing: str, pad_id: int) -> Tuple[np.ndarray, np.ndarray]:
    """Rows of seq_len + 1 tokens and their learn masks (row r predicts tokens 1.. from tokens ..-1)."""
    width = seq_len + 1
    if packing == "pack":
        n = max(1, -(-(len(ex.tokens) - 1) // seq_len))  # every token a target once; the tail is padded
        total = n * seq_len + 1
        tokens = np.full(total, pad_id, np.int32)
        learn = np.zeros(total, bool)
        tokens[:len(ex.tokens)], learn[:len(ex.learn)] = ex.tokens, ex.learn
        idx = np.arange(n)[:, None] * seq_len + np.arange(width)[None, :]
        return tokens[idx], learn[idx]
    rows = np.full((len(ex), width), pad_id, np.int32)
    learn = np.zeros((len(ex), width), bool)
    for i in range(len(ex)):
        a, b = ex.starts[i], min(ex.starts[i + 1], ex.starts[i] + width)  # longer examples are cut
        rows[i, :b - a], learn[i, :b - a] = ex.tokens[a:b], ex.learn[a:b]
    return rows, learn


class RowBatcher(Batcher):
    """batcher.Batcher's (seed, step, micro, rank) -> rows mapping over fixed rows with a loss mask."""

    def __init__(self, rows: np.ndarray, learn: np.ndarray, seed: int, split: str = "train"):
        self.rows, self.learn = rows, learn
        self.seq_len = rows.shape[1] - 1
        self.seed, self.split = seed, split
        self.n_windows = len(rows)
        self._perm_epoch, self._perm = -1, None
        self._row_tokens = learn[:, 1:].sum(axis=1)

    def rows_of(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        rows, learn = self.rows[ids], self.learn[ids]
        return rows[:, :-1], np.where(learn[:, 1:], rows[:, 1:], -1).astype(np.int32)

    def tokens_in_step(self, step: int, dist: DistributedConfig) -> int:
        """Real (learned) target tokens in global step `step`, over every rank and micro-batch."""
        ids = [self.window_ids(step, m, r, dist) for m in range(dist.gradient_accumulation)
               for r in range(dist.num_devices)]
        return int(self._row_tokens[np.concatenate(ids)].sum())


@dataclass
class TokenCorpus:
    train: Examples
    val: Examples
    vocab_size: int
    pad_id: int
    packing: str
    description: str

    def batcher(self, split: str, seq_len: int, seed: int) -> RowBatcher:
        ex = self.train if split == "train" else self.val
        rows, learn = to_rows(ex, seq_len, self.packing, self.pad_id)
        return RowBatcher(rows, learn, seed, "training" if split == "train" else "validation")


def load_token_corpus(cfg: DataConfig, model_dir: Path, tokenizer=None, vocab_size: Optional[int] = None) -> TokenCorpus:
    if cfg.path is None:
        raise UserError("a pretrained model needs --data: a directory with train.jsonl and valid.jsonl "
                        '(one {"text"}, {"prompt","completion"} or {"messages"} object a line)')
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise UserError(f"data path {path} does not exist: pass a directory with train.jsonl and valid.jsonl")
    files = splits_of(path)
    if tokenizer is None:
        from mlx_train.rank.hf import load_tokenizer

        tokenizer = load_tokenizer(model_dir)
    digest = tokenizer_digest(model_dir)
    train = encode_file(files["train"], tokenizer, digest, cfg.mask_prompt)
    if "valid" in files:
        val = encode_file(files["valid"], tokenizer, digest, cfg.mask_prompt)
    else:
        if len(train) < 2:
            raise UserError(f"{files['train']} has {len(train)} example: add a valid.jsonl or more examples")
        cut = len(train) - max(1, int(len(train) * cfg.val_fraction))
        train, val = take(train, 0, cut), take(train, cut, len(train))
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (tokenizer.eos_token_id or 0)
    learned = int(train.learn.sum())
    if learned == 0:
        raise UserError(f"{files['train']}: no token is left to learn (every one is prompt): drop --mask-prompt or "
                        "give the examples a completion")
    if vocab_size is None:
        from mlx_train.rank.hf import read_config

        vocab_size = read_config(model_dir).get("vocab_size") or len(tokenizer.vocab)
    return TokenCorpus(train, val, int(vocab_size), int(pad), cfg.packing,
                       f"{path} ({len(train):,} examples, {len(train.tokens):,} tokens, {learned:,} learned)")
