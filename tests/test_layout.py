"""The package draws its architecture: each side imports only the levels below it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "src" / "mlx_train"
CONTRACTS = {"config", "errors", "events", "procs", "protocol", "rundir", "units"}
# What each side may import from the package (besides itself).
ALLOWED = {
    "contracts": {"contracts"},
    "rank": {"contracts"},
    "planning": {"contracts", "rank"},
    "fleet": {"contracts", "rank"},
    "controller": {"contracts", "rank", "planning", "fleet"},
    "cli": {"contracts", "rank", "planning", "fleet", "controller"},
    # `import mlx_train`: the guide's public names (DistributedConfig, MemoryOptimizer, lazily).
    "api": {"contracts", "planning"},
}


def side(module: str) -> str:
    parts = module.split(".")
    if module in ("mlx_train", "mlx_train.__init__"):
        return "api"
    if parts[1] in CONTRACTS:
        return "contracts"
    return parts[1]


def package_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlx_train"):
            if node.module != "mlx_train":  # importing the package itself loads only its __init__
                yield node.module, node.lineno
            for alias in node.names:  # `from mlx_train import protocol` names a module
                yield f"{node.module}.{alias.name}", node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mlx_train"):
                    yield alias.name, node.lineno


def module_of(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    return ".".join(rel.parts)


def test_every_module_sits_in_a_known_side():
    for path in PKG.rglob("*.py"):
        assert side(module_of(path)) in ALLOWED, f"{path}: not in any side; add it to one"


def test_no_import_runs_back_up():
    upward = []
    for path in PKG.rglob("*.py"):
        here = side(module_of(path))
        for target, line in package_imports(path):
            there = side(target)
            if there != here and there in ALLOWED and there not in ALLOWED[here]:
                upward.append(f"{path.relative_to(PKG)}:{line} ({here}) imports {target} ({there})")
    assert not upward, "imports against the layout:\n" + "\n".join(upward)


def test_each_side_opens_with_what_it_owns_and_may_import():
    for sub in ("rank", "planning", "fleet", "controller", "cli"):
        doc = ast.get_docstring(ast.parse((PKG / sub / "__init__.py").read_text())) or ""
        assert "Owns" in doc or "owns" in doc, f"{sub}/__init__.py says what it owns"
        assert "import" in doc, f"{sub}/__init__.py says what it may import"


def module_imports(path: Path, modules: set):
    """The package's modules that `path` imports, at the top or inside a function: `from pkg import
    mod` names `mod`, not `pkg`'s __init__ (which holds no code of its own to wait on)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlx_train"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                yield name if name in modules else node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("mlx_train"))


def test_no_import_cycle():
    # A cycle dodged with a function-level import is still a cycle: the shared piece belongs in a
    # module both can import (as rank/batcher.py is for rank/data.py and rank/token_data.py).
    paths = {module_of(p).removesuffix(".__init__"): p for p in PKG.rglob("*.py")}
    graph = {m: set(module_imports(p, set(paths))) & set(paths) - {m} for m, p in paths.items()}
    cycles, state = [], {}

    def visit(module: str, path: list) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [module, target]))
            elif target not in state:
                visit(target, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_architecture_drawing_names_every_module():
    """docs/architecture.md's drawing is where a newcomer looks first: a module it leaves out is a room
    nobody knows is there. Each module is named in its side's rows (contracts in theirs)."""
    text = (PKG.parent.parent / "docs" / "architecture.md").read_text()
    drawing = text.split("```", 2)[1]
    rows: dict = {}
    current = None
    for line in drawing.splitlines():
        head = line[:16].strip().rstrip("/")
        if head:
            current = head
        rows.setdefault(current, []).append(line[16:] if head else line)
    missing = []
    for path in sorted(PKG.rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        module = module_of(path)
        where = "contracts" if side(module) == "contracts" else module.split(".")[1]
        if not re.search(rf"\b{re.escape(path.name)}", "\n".join(rows.get(where, []))):
            missing.append(f"{path.relative_to(PKG)} (in the {where} rows)")
    assert not missing, "docs/architecture.md does not draw:\n" + "\n".join(missing)
