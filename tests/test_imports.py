"""Dependency direction (DESIGN section 2, STYLE lessons 1), checked on the source with ast.

sparsity/ is pure mask mathematics: it imports only the standard library, torch and itself.
methods/ sits above sparsity/ and below the engine: it never imports a launcher, the engine, the
CLI, DeepSpeed or Ray.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "distsparse"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    """Every module a file imports (anywhere in it), relative imports made absolute."""
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    return _imports_of_source(path.read_text(), package, str(path))


def _imports_of_source(source: str, package: str, filename: str = "<test>") -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if not node.level:
                found.append(node.module)
                continue
            base = package.split(".")
            prefix = ".".join(base[: len(base) - (node.level - 1)])
            if node.module is None:  # from . import x: x is a module of the package
                found.extend(f"{prefix}.{alias.name}" for alias in node.names)
            else:
                found.append(f"{prefix}.{node.module}")
    return found


def _files(subpackage: str) -> list[Path]:
    files = sorted((PACKAGE / subpackage).rglob("*.py"))
    assert files, f"no modules found under distsparse/{subpackage}"
    return files


def _allowed_in_sparsity(module: str) -> bool:
    top = module.split(".")[0]
    return (
        top in sys.stdlib_module_names
        or top == "torch"
        or module == "distsparse.sparsity"
        or module.startswith("distsparse.sparsity.")
    )


def test_the_checker_sees_the_known_modules():
    names = {p.name for p in _files("sparsity")}
    assert {"counter_rng.py", "select.py", "masks.py", "scores.py", "schedules.py", "allocation.py"} <= names
    assert {"base.py", "sparse_to_sparse.py", "dense_to_sparse.py", "dense.py"} <= {p.name for p in _files("methods")}
    assert "distsparse.sparsity.counter_rng" in _imports(PACKAGE / "sparsity" / "scores.py")


def test_relative_imports_are_resolved():
    source = (
        "from . import masks\nfrom .scores import x\nfrom .. import engine\n"
        "from ..engine.loop import y\ndef f():\n    import ray.train\n"
    )
    assert _imports_of_source(source, "distsparse.sparsity") == [
        "distsparse.sparsity.masks",
        "distsparse.sparsity.scores",
        "distsparse.engine",
        "distsparse.engine.loop",
        "ray.train",
    ]


@pytest.mark.parametrize("path", _files("sparsity"), ids=lambda p: p.name)
def test_sparsity_imports_only_stdlib_torch_and_itself(path):
    bad = [m for m in _imports(path) if not _allowed_in_sparsity(m)]
    assert bad == [], f"{path.relative_to(PACKAGE.parent)} imports {bad}"


FORBIDDEN_IN_METHODS = ("distsparse.engine", "distsparse.orchestrate", "distsparse.cli", "deepspeed", "ray")


@pytest.mark.parametrize("path", _files("methods"), ids=lambda p: p.name)
def test_methods_never_import_engine_launchers_or_backends(path):
    bad = [
        m for m in _imports(path)
        if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_IN_METHODS)
    ]
    assert bad == [], f"{path.relative_to(PACKAGE.parent)} imports {bad}"


@pytest.mark.parametrize("path", _files("engine"), ids=lambda p: p.name)
def test_the_engine_never_imports_a_launcher(path):
    """Launchers (orchestrate/, Ray) wrap the trainer through its on_checkpoint callback."""
    bad = [m for m in _imports(path)
           if any(m == f or m.startswith(f + ".") for f in ("distsparse.orchestrate", "ray"))]
    assert bad == [], f"{path.relative_to(PACKAGE.parent)} imports {bad}"


LAYERS = {
    # subpackage or module -> what of distsparse it may import besides itself (DESIGN section 2)
    "errors": (),
    "sparsity": (),
    "models": ("errors",),
    "config": ("errors", "models"),
    "data": ("errors", "config"),
    "methods": ("errors", "config", "sparsity"),
    "distributed": ("errors", "sparsity"),
    "sparsifier": ("errors", "config", "sparsity", "methods", "distributed"),
    "integrations": ("errors", "config", "sparsity", "methods", "distributed", "sparsifier"),
    "engine": ("errors", "sparsity", "models", "config", "data", "methods", "distributed",
               "sparsifier"),
    "evaluate": ("errors", "sparsity", "models", "config", "data", "methods", "distributed",
                 "sparsifier", "engine"),
    "export": ("errors", "sparsity", "models", "config", "data", "methods", "distributed",
               "sparsifier", "engine"),
    "orchestrate": ("errors", "sparsity", "models", "config", "data", "methods", "distributed",
                    "sparsifier", "engine"),
}


def _layer_files(layer: str) -> list[Path]:
    single = PACKAGE / f"{layer}.py"
    return [single] if single.is_file() else _files(layer)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_each_layer_imports_only_the_layers_below_it(layer):
    allowed = {layer, *LAYERS[layer]}
    for path in _layer_files(layer):
        inside = [m for m in _imports(path) if m.startswith("distsparse.")]
        bad = [m for m in inside if m.split(".")[1] not in allowed]
        assert bad == [], f"{path.relative_to(PACKAGE.parent)} imports {bad}"


def test_the_sparse_file_reader_needs_only_torch_safetensors_and_errors():
    """What `load_sparse` needs is what a user without distsparse's stack has to install."""
    imports = _imports(PACKAGE / "export" / "sparse_format.py")
    tops = {m.split(".")[0] for m in imports} - set(sys.stdlib_module_names)
    assert tops <= {"torch", "safetensors", "numpy", "distsparse"}, tops
    assert {m for m in imports if m.startswith("distsparse")} == {"distsparse.errors"}


def test_methods_never_import_torch_distributed():
    for path in _files("methods"):
        bad = [m for m in _imports(path) if m == "torch.distributed" or
               m.startswith("torch.distributed.")]
        assert bad == [], f"{path.relative_to(PACKAGE.parent)} imports {bad}"


def test_only_the_code_that_wraps_models_imports_deepspeed():
    wrappers = {PACKAGE / "engine" / "backends" / "deepspeed.py",
                PACKAGE / "sparsifier" / "deepspeed_access.py"}
    importers = {path for path in PACKAGE.rglob("*.py")
                 if any(m == "deepspeed" or m.startswith("deepspeed.") for m in _imports(path))}
    assert importers == wrappers


def test_no_import_cycles():
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]  # `from pkg.mod import name`: the module pkg.mod
        return name or None

    # Imports inside functions count too: a deferred import hides a cycle, it does not break it.
    graph = {name: {resolve(m) for m in _imports(path) if m.startswith("distsparse")} - {None, name}
             for name, path in modules.items()}
    visiting, done = [], set()

    def visit(name: str) -> None:
        if name in done:
            return
        assert name not in visiting, "import cycle: " + " -> ".join(
            visiting[visiting.index(name):] + [name])
        visiting.append(name)
        for other in sorted(graph[name]):
            visit(other)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
