"""What `--model` names (config.py `model_kind`), decided in one place and asked everywhere else."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from mlx_train.config import ModelConfig, ModelKind, model_kind

ROOT = Path(__file__).resolve().parent.parent
OWNER = ROOT / "src" / "mlx_train" / "config.py"


@pytest.mark.parametrize("name, kind", [
    ("gpt", ModelKind.GPT),
    ("mypkg.models:build", ModelKind.FACTORY),
    ("tests.my_model:build", ModelKind.FACTORY),
    ("mlx-community/Qwen2.5-0.5B-Instruct-4bit", ModelKind.PRETRAINED),  # a hub id
    ("./models/x", ModelKind.PRETRAINED),  # a path, missing: rank/hf.py says so when it loads it
    ("models/x", ModelKind.PRETRAINED),
    ("/no/such/model", ModelKind.PRETRAINED),
    ("GPT", ModelKind.PRETRAINED),  # only the exact word is the built-in model; this one is a typo hf.py names
])
def test_what_model_names_mean(name, kind):
    assert model_kind(name) is kind
    assert ModelConfig(name=name).kind is kind


def test_a_model_directory_is_pretrained(tmp_path):
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert ModelConfig(name=str(model)).kind is ModelKind.PRETRAINED


def test_an_existing_path_with_a_colon_is_a_directory_not_a_factory(tmp_path):
    odd = tmp_path / "run:3"
    name = str(odd)
    assert model_kind(name) is ModelKind.FACTORY  # before it exists it reads as module:factory
    odd.mkdir()
    assert model_kind(name) is ModelKind.PRETRAINED


def test_the_planner_sizes_every_kind_but_a_factory():
    assert ModelKind.GPT.knows_shape and ModelKind.PRETRAINED.knows_shape
    assert not ModelKind.FACTORY.knows_shape


def _sources():
    for base in (ROOT / "src" / "mlx_train", ROOT / "tools"):
        for path in base.rglob("*.py"):
            if path != OWNER:
                yield path, ast.parse(path.read_text())


def test_no_module_but_the_owner_decides_the_kind_from_the_name():
    """The old copies (`name == "gpt"`, rank/hf.py's is_pretrained, planner's knows_shape) stay gone:
    every other module asks `cfg.model.kind`."""
    found = []
    for path, tree in _sources():
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(
                    isinstance(c, ast.Constant) and c.value == "gpt" for c in [node.left, *node.comparators]):
                found.append(f"{where}:{node.lineno} compares with 'gpt'")
            named = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) \
                else node.name if isinstance(node, ast.FunctionDef) else None
            if named in ("is_pretrained", "_pretrained", "knows_shape") and not (
                    isinstance(node, ast.Attribute) and named == "knows_shape"):  # ModelKind.knows_shape
                found.append(f"{where}:{node.lineno} has its own {named}")
            if isinstance(node, ast.alias) and node.name in ("is_pretrained", "knows_shape"):
                found.append(f"{where}:{node.lineno} imports {node.name}")
    assert not found, "the model's kind is config.py's ModelKind (cfg.model.kind):\n" + "\n".join(found)
