"""Pretrained language models in the Hugging Face / mlx-lm layout, loaded and adapted through mlx-lm.

`--model` names one of three things (config.py `ModelKind`): "gpt" (built in), `package.module:factory`,
or a pretrained model: a local directory (config.json, *.safetensors, tokenizer files) or a hub id. Everything
about architectures, quantized bases and LoRA/DoRA layers is mlx-lm's; this module only checks
the input once (one-line errors), freezes what must not train, and writes adapters in mlx-lm's
own layout so `mlx_lm.load(model, adapter_path=...)` opens them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Tuple

# transformers warns on import that PyTorch is absent; mlx-lm needs only its tokenizers.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_train.config import FineTuneConfig, ModelConfig  # noqa: E402
from mlx_train.errors import UserError  # noqa: E402

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists() \
        or name.count("/") != 1


def model_path(name: str) -> Path:
    """The local directory for `name`, checked; a hub id is fetched once into the hub cache."""
    path = Path(name).expanduser()
    if not path.exists() and not _looks_like_path(name):
        path = _fetch(name)
    if not path.is_dir():
        # A bare word that is no directory is most likely a typo for a model name, not a path.
        what = f"unknown model {name!r}" if "/" not in name and not name.startswith((".", "~")) \
            else f"model {name}: no such directory"
        raise UserError(f"{what}: use 'gpt', package.module:factory, a model directory (config.json, "
                        "*.safetensors, tokenizer files) or a Hugging Face id like mlx-community/Qwen2.5-0.5B-Instruct-4bit")
    if not (path / "config.json").is_file():
        raise UserError(f"model directory {path} has no config.json: it is not a Hugging Face / mlx-lm model "
                        "(convert it with `mlx_lm.convert`, or point --model at the folder holding config.json)")
    config = read_config(path)
    _model_classes(config, path)
    if not any(path.glob("*.safetensors")):
        raise UserError(f"model directory {path} has no *.safetensors weights: convert it with `mlx_lm.convert`")
    return path


def _fetch(repo: str) -> Path:
    try:
        from mlx_lm.utils import _download

        return Path(_download(repo))
    except Exception as exc:  # noqa: BLE001  (the hub client raises many kinds; the user needs one line)
        raise UserError(f"cannot fetch model {repo!r} from the Hugging Face hub ({exc.__class__.__name__}): "
                        "check the id and the network, or download it once and pass the directory") from None


def read_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path / 'config.json'} is not readable JSON ({exc}): fix or re-download it") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"{path / 'config.json'} has no 'model_type': it is not a Hugging Face model config")
    return config


def _model_classes(config: dict, path: Path):
    from mlx_lm.utils import _get_classes

    try:
        return _get_classes(config)
    except ValueError:
        raise UserError(f"model {path}: architecture {config['model_type']!r} is not one mlx-lm knows: upgrade "
                        "mlx-lm (pip install -U mlx-lm) or pick a supported model") from None


def check(cfg: ModelConfig, ft: FineTuneConfig) -> Path:
    """Before any rank starts: the model is usable and `ft` fits it (from config.json, no weights read)."""
    path = model_path(cfg.name)
    config = read_config(path)
    quantized = "quantization" in config or "quantization_config" in config
    if ft.mode == "full" and quantized:
        raise UserError(f"model {path} is quantized: its packed weights cannot train, use --fine-tune lora "
                        "(QLoRA) or a full-precision model")
    return path


def load_tokenizer(path: Path):
    from mlx_lm.utils import load_tokenizer as _load

    return _load(path)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def load_model(cfg: ModelConfig, ft: FineTuneConfig, grad_checkpoint: bool = False, lazy: bool = False) -> nn.Module:
    """The pretrained model with `ft` applied: frozen base plus adapters, or everything trainable.

    Call with the same mx.random seed on every rank: the adapters' initial values are random.
    `lazy`: no weight is read yet (MLX reads a safetensors tensor when it is first evaluated), so a
    pipeline stage can drop the other stages' layers unread (rank/pipeline.py load_only) and a base
    too big for one host never has to fit one.
    """
    from mlx_lm.utils import load_model as _load

    path = model_path(cfg.name)
    model, _ = _load(path, lazy=lazy)
    apply_fine_tune(model, ft, str(path))
    model.train()  # mlx-lm loads for inference; training mode turns on the adapters' dropout
    if grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint as _checkpoint_blocks

        _checkpoint_blocks(model.layers[0])  # patches the block class: every block recomputes in backward
    return model


def apply_fine_tune(model: nn.Module, ft: FineTuneConfig, where: str) -> None:
    if ft.mode == "full":
        if is_quantized(model):
            raise UserError(f"model {where} is quantized: its packed weights cannot train, use --fine-tune lora "
                            "(QLoRA) or a full-precision model")
        model.unfreeze()
        return
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    layers = adapted_blocks(ft, len(model.layers))
    keys = ft.keys
    if keys is not None:
        known = {k for block in model.layers for k, m in block.named_modules()
                 if isinstance(m, (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding))}
        unknown = sorted(set(keys) - known)
        if unknown:
            raise UserError(f"--lora-keys: {unknown[0]!r} is not a linear layer in model {where}'s blocks "
                            f"(there: {', '.join(sorted(known))})")
    linear_to_lora_layers(model, layers, lora_parameters(ft), use_dora=ft.mode == "dora")


def adapted_blocks(ft: FineTuneConfig, n_blocks: int) -> int:
    """The last --lora-layers blocks are adapted; -1, or more than the model has, means all of them."""
    return n_blocks if ft.lora_layers == -1 else min(ft.lora_layers, n_blocks)


def lora_parameters(ft: FineTuneConfig) -> dict:
    out = {"rank": ft.lora_rank, "scale": ft.lora_scale, "dropout": ft.lora_dropout}
    if ft.keys is not None:
        out["keys"] = ft.keys
    return out


def masked_lm_loss(model: nn.Module, inputs: mx.array, targets: mx.array) -> mx.array:
    """Mean cross-entropy over the real target tokens: a negative target (padding, a masked prompt)
    counts for nothing."""
    logits = model(inputs).astype(mx.float32)
    mask = targets >= 0
    ce = nn.losses.cross_entropy(logits, mx.maximum(targets, 0)) * mask
    return ce.sum() / mx.maximum(mask.sum(), 1)


def build(cfg: ModelConfig, ft: FineTuneConfig, grad_checkpoint: bool = False,
          lazy: bool = False) -> Tuple[nn.Module, Any]:
    return load_model(cfg, ft, grad_checkpoint, lazy), masked_lm_loss


# -- results in mlx-lm's layout --------------------------------------------------------------------
def adapter_config(model_name: str, ft: FineTuneConfig, n_blocks: int) -> dict:
    """What `mlx_lm.tuner.utils.load_adapters` reads (the same keys `mlx_lm.lora` writes)."""
    return {"model": model_name, "fine_tune_type": ft.mode, "num_layers": adapted_blocks(ft, n_blocks),
            "lora_parameters": lora_parameters(ft)}


def write_adapters(out: Path, params: Any, config: dict, weights: Optional[Path] = None) -> Path:
    """Write `params` (the trainable tree) and `config` to `out` atomically (replace by rename);
    or, given `weights` (a checkpoint's model.safetensors: the same tree, the same bytes), copy it.

    Raises checkpoint.WriteFailed when the storage refuses it (disk full, no permission, read-only),
    as a checkpoint does: the partial temporary directory is removed and adapters already at `out`
    are left as they were."""
    from mlx_train.rank import checkpoint

    out = Path(out)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    arrays = dict(tree_flatten(params)) if weights is None else {}
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if weights is None:
            mx.save_safetensors(str(tmp / ADAPTER_WEIGHTS), arrays)
        else:
            shutil.copyfile(weights, tmp / ADAPTER_WEIGHTS)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))
    except (OSError, RuntimeError, ValueError) as exc:  # MLX reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        need = sum(v.nbytes for v in arrays.values())
        raise checkpoint.WriteFailed(f"cannot write adapters to {out}: "
                                     f"{checkpoint.why_failed(exc, out.parent, need)}") from exc
    old = out.with_name(f".old-{out.name}-{os.getpid()}")
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def read_adapter_config(path: Path) -> Optional[dict]:
    try:
        return json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        return None
