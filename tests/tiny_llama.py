"""A tiny llama-family model and chat data, made offline (no downloads), for the real-model tests.

`make_model_dir(dir)` writes what `mlx_lm.load(dir)` opens: config.json, model.safetensors (random
weights from mlx-lm's own llama class), tokenizer.json (a byte-level BPE trained with `tokenizers`
on a few standard-library files) and tokenizer_config.json with a chat template.
`make_chat_data(dir)` writes train.jsonl / valid.jsonl in the OpenAI chat format.

Import the fixtures into a test module (`from tiny_llama import tiny_model, chat_data`) to use them.
"""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import pytest

SPECIAL = ["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, num_hidden_layers=2,
              intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
              tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=512)


def train_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in ("textwrap.py", "string.py", "bisect.py", "this.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def make_model_dir(out: Path, chat_template: bool = True, seed: int = 0, **overrides) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
               "pad_token": "<|pad|>", "model_max_length": 512}
    if chat_template:
        tok_cfg["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))
    cfg = {**CONFIG, "vocab_size": tok.get_vocab_size(), "bos_token_id": tok.token_to_id("<|bos|>"),
           "eos_token_id": tok.token_to_id("<|eos|>"), **overrides}
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def quantize_model_dir(src: Path, out: Path, bits: int = 4) -> Path:
    """The model at `src` quantized by mlx-lm's own converter (what mlx-community's 4-bit builds are)."""
    from mlx_lm import convert

    convert(str(src), str(out), quantize=True, q_bits=bits, q_group_size=32)
    return Path(out)


# A task a 2-layer model learns in tens of steps: answer a colour question with a fixed reply.
_COLOURS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]


def chat_records(n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        c = rng.choice(_COLOURS)
        yield {"messages": [{"role": "user", "content": f"what colour is the {c} box?"},
                            {"role": "assistant", "content": f"the box is {c}."}]}


def make_chat_data(out: Path, n_train: int = 200, n_valid: int = 24) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 1), ("valid", n_valid, 2)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_records(n, seed)))
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model_4bit(tmp_path_factory, tiny_model) -> Path:
    return quantize_model_dir(tiny_model, tmp_path_factory.mktemp("models-q") / "tiny-llama-4bit")


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> Path:
    return make_chat_data(tmp_path_factory.mktemp("data") / "chat")


@pytest.fixture(autouse=False)
def token_cache(tmp_path, monkeypatch) -> Path:
    """A private token cache (MLX_TRAIN_CACHE), so tests never share or keep tokenized data."""
    path = tmp_path / "cache"
    monkeypatch.setenv("MLX_TRAIN_CACHE", str(path))
    return path
