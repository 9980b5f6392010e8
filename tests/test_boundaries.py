"""Boundaries: models are plain PyTorch (importing them pulls in no deepspeed, hydra or megatron
parallel state); the package's layers are imported one way only; no import circle."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

MODELS = Path(__file__).resolve().parents[1] / "vlm_train" / "models"
FORBIDDEN = ("deepspeed", "hydra", "megatron.core.parallel_state", "megatron.core.tensor_parallel")


def test_models_source_imports_nothing_forbidden():
    for file in MODELS.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(FORBIDDEN), f"{file.name} imports {name}"


def test_importing_and_building_models_loads_no_forbidden_module():
    code = (
        "import sys\n"
        "from vlm_train.config import Config, MLPConnectorConfig\n"
        "from vlm_train.models import build_vision_tower, build_llm, build_connector\n"
        "cfg = Config(connector=MLPConnectorConfig(path=None))\n"
        "cfg.vision.path = cfg.llm.path = None\n"
        "tower = build_vision_tower(cfg.vision)\n"
        "llm = build_llm(cfg.llm, vocab_size=64)\n"
        "build_connector(cfg.connector, vision_dim=tower.hidden_size, llm_dim=llm.hidden_size, num_patches=9)\n"
        f"bad = [m for m in sys.modules if m.startswith({FORBIDDEN!r})]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Layering and import circles -----------------------------------------------------------------
# The package's layers, lowest first: a module imports its own layer and those below it, never one
# above. Measured from the import graph on 2026-12-02 (every import statement, function-level and
# TYPE_CHECKING ones included) and written down here, so that a new module is placed on purpose: one that no
# entry covers fails the test. The longest matching prefix decides; `vlm_train` alone is the
# package's own __init__, not a catch-all.
LAYERS = {
    "vlm_train.errors": 0,  # imports nothing of ours
    "vlm_train.config": 0,  # the typed config: every layer reads its own section
    "vlm_train.files": 0,  # durable writes (atomic replace, directory fsync)
    "vlm_train.models": 1,  # plain PyTorch
    "vlm_train.data": 2,  # reads the model's conventions (IGNORE_INDEX, the tower's image stats)
    "vlm_train.interop": 3,  # HF/megatron weight formats: above models and data (the processor export),
    # below parallel (the tensor-parallel decoder converts with the megatron layouts)
    "vlm_train.parallel": 4,
    "vlm_train.training": 5,
    "vlm_train.build": 6,  # assembles a model from a config, the tensor-parallel decoder included
    "vlm_train.plan": 6,  # vlm-plan: builds on meta, counts FLOPs
    "vlm_train.train": 7,  # entry points: vlm-train, vlm-convert
    "vlm_train.convert": 7,
    "vlm_train": 7,  # the package's facade (build_model, compose)
}
# Wrong-way imports being removed by this session's refactor (issue 13): each entry must still
# exist -- once it is gone, delete it here, so that it cannot come back unnoticed.
PENDING_VIOLATIONS: set[tuple[str, str]] = set()
# Libraries one part of the package wraps, and the only modules that import them: DeepSpeed behind
# one adapter (parallel/engine.py and its checkpoint half), megatron-core's layers applied from
# parallel/, Hydra at the config edge.
LIBRARY_OWNERS = {
    "deepspeed": ("vlm_train.parallel",),
    "megatron": ("vlm_train.parallel",),
    "hydra": ("vlm_train.config",),
}
PACKAGE = Path(__file__).resolve().parents[1] / "vlm_train"


@dataclass(frozen=True)
class Import:
    """One name an import statement of the package asks for: a package module once resolved
    (`package_imports`), or as written (`_all_imports`, which libraries are checked on)."""

    where: str  # "pkg/sub/file.py:LINE"
    importer: str
    imported: str
    statement: str


def package_modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `package` (a package is its __init__)."""
    modules = {}
    for file in sorted(package.rglob("*.py")):
        parts = file.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return modules


def package_imports(package: Path) -> list[Import]:
    """Every import of a package module by another, wherever the statement is (top level, inside a
    function, under TYPE_CHECKING): an import inside a function still runs and still couples."""
    modules = package_modules(package)
    found = []
    for imp in _all_imports(package):
        target = imp.imported
        while target and target not in modules:  # `from m import name`: m, or m.name if a module
            target = target.rpartition(".")[0]
        if target and target != imp.importer:
            found.append(Import(imp.where, imp.importer, target, imp.statement))
    return found


def _all_imports(package: Path) -> Iterator[Import]:
    """Every name every import statement of the package's modules asks for, unresolved."""
    for module, file in package_modules(package).items():
        where = file.relative_to(package.parent).as_posix()
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            for target in _targets(node, module, is_package=file.name == "__init__.py"):
                yield Import(f"{where}:{getattr(node, 'lineno', 0)}", module, target, ast.unparse(node))


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the importer's package, one level up per extra dot
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(anchor[: len(anchor) - node.level + 1] + ([node.module] if node.module else []))
    return [f"{base}.{alias.name}" for alias in node.names]


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    parts = module.split(".")
    for size in range(len(parts), 0, -1):
        prefix = ".".join(parts[:size])
        if prefix in layers and (size > 1 or module == prefix):
            return layers[prefix]
    return None


def layer_violations(package: Path, layers: dict[str, int]) -> dict[tuple[str, str], str]:
    """(file, imported module) -> message, for each module with no layer and each import of a
    higher layer."""
    found = {}
    for module, file in package_modules(package).items():
        if layer_of(module, layers) is None:
            where = file.relative_to(package.parent).as_posix()
            found[(where, module)] = f"{where}: module {module} has no entry in LAYERS: place it"
    for imp in package_imports(package):
        low, high = layer_of(imp.importer, layers), layer_of(imp.imported, layers)
        if low is not None and high is not None and high > low:
            found[(imp.where.rpartition(":")[0], imp.imported)] = (
                f"{imp.where} `{imp.statement}`: {imp.importer} (layer {low}) imports {imp.imported} (layer {high})"
            )
    return found


def library_imports(package: Path, owners: dict[str, tuple[str, ...]]) -> list[str]:
    """Each import of a library in `owners` by a module outside that library's owners."""
    found = []
    for imp in _all_imports(package):
        library = imp.imported.split(".")[0]
        allowed = owners.get(library)
        if allowed is not None and not any((imp.importer + ".").startswith(owner + ".") for owner in allowed):
            found.append(f"{imp.where} `{imp.statement}`: only {', '.join(allowed)} import {library}")
    return sorted(set(found))


def import_cycles(package: Path) -> dict[frozenset[str], str]:
    """The package's import circles (strongly connected modules) -> one circle spelled out with
    the statement of each step. Importing a.b.c also runs a.b's __init__: that is an edge too."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in package_imports(package):
        parts = imp.imported.split(".")
        for size in range(2, len(parts) + 1):  # the package's own root is everyone's ancestor
            target = ".".join(parts[:size])
            if not (imp.importer + ".").startswith(target + "."):  # not the importer's own ancestor
                edges.setdefault(imp.importer, {}).setdefault(target, imp)
    return {frozenset(group): _spell_cycle(group, edges) for group in _strongly_connected(edges) if len(group) > 1}


def _strongly_connected(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on a deep package)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, {}))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    work.append((succ, iter(sorted(edges.get(succ, {})))))
                    break
                if succ in stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while not group or group[-1] != node:
                        group.append(stack.pop())
                    groups.append(sorted(group))
    return groups


def _spell_cycle(group: list[str], edges: dict[str, dict[str, Import]]) -> str:
    """A shortest circle through the group's first module, each step with its import statement."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for succ in sorted(edges.get(node, {})):
            if succ == start:
                path = [*paths[node], start]
                steps = [f"{a} -> {b} ({edges[a][b].where} `{edges[a][b].statement}`)" for a, b in zip(path, path[1:])]
                return "; ".join(steps)
            if succ in members and succ not in paths:
                paths[succ] = [*paths[node], succ]
                queue.append(succ)
    raise AssertionError(f"no circle through {start}")  # unreachable for a strongly connected group


def test_layers_are_respected():
    found = layer_violations(PACKAGE, LAYERS)
    new = [message for key, message in sorted(found.items()) if key not in PENDING_VIOLATIONS]
    gone = sorted(PENDING_VIOLATIONS - found.keys())
    assert not new, "wrong-way imports (layers: models <- data <- parallel <- training <- train):\n" + "\n".join(new)
    assert not gone, f"no longer imported: remove from PENDING_VIOLATIONS: {gone}"


def test_wrapped_libraries_are_imported_by_their_owners_only():
    found = library_imports(PACKAGE, LIBRARY_OWNERS)
    assert not found, "\n".join(found)


def test_no_import_circle():
    found = import_cycles(PACKAGE)
    assert not found, "import circles (a module imported inside a function still closes one):\n" + "\n".join(
        sorted(found.values())
    )


def test_a_wrong_way_import_in_the_real_tree_is_caught(tmp_path):
    """The mutant of the acceptance criterion, on a copy of the package: a model that imports the
    training loop inside a function is a layering violation and closes a circle (loop imports vlm)."""
    copy = tmp_path / "vlm_train"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    vlm = copy / "models" / "vlm.py"
    vlm.write_text(vlm.read_text() + "\n\ndef _wrong_way():\n    from vlm_train.training import loop\n")
    line = vlm.read_text().splitlines().index("    from vlm_train.training import loop") + 1
    violation = layer_violations(copy, LAYERS)[("vlm_train/models/vlm.py", "vlm_train.training.loop")]
    assert f"vlm_train/models/vlm.py:{line} `from vlm_train.training import loop`" in violation
    cycle = next(message for key, message in import_cycles(copy).items() if "vlm_train.models.vlm" in key)
    assert "vlm_train.models.vlm -> vlm_train.training.loop" in cycle, cycle


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(source)
    return root / "pkg"


TOY_FILES = {
    "pkg/__init__.py": "",
    "pkg/low/__init__.py": "",
    "pkg/low/a.py": "import os\n\nVALUE = 1\n",
    "pkg/high/__init__.py": "",
    "pkg/high/b.py": "from pkg.low import a\nfrom pkg.low.a import VALUE\n",
}
TOY_LAYERS = {"pkg": 1, "pkg.low": 0, "pkg.high": 1}
WRONG_WAY = {  # line 3 of pkg/low/a.py, each a form a checker could miss
    "top-level": "from pkg.high import b",
    "in a function": "def f():\n    import pkg.high.b",
    "TYPE_CHECKING": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high.b import VALUE",
    "relative": "def f():\n    from ..high import b",
    "the package facade": "def f():\n    from pkg import VALUE",
}


def test_checker_passes_a_layered_package(tmp_path):
    package = _write_package(tmp_path, TOY_FILES)
    assert layer_violations(package, TOY_LAYERS) == {}
    assert import_cycles(package) == {}


@pytest.mark.parametrize("source", WRONG_WAY.values(), ids=WRONG_WAY.keys())
def test_checker_catches_a_wrong_way_import(tmp_path, source):
    package = _write_package(tmp_path, {**TOY_FILES, "pkg/low/a.py": "import os\n\n" + source + "\n"})
    found = layer_violations(package, TOY_LAYERS)
    assert len(found) == 1, found
    message = next(iter(found.values()))
    assert message.startswith("pkg/low/a.py:") and "pkg.low.a (layer 0) imports pkg" in message, message


def test_checker_places_every_module(tmp_path):
    package = _write_package(tmp_path, {**TOY_FILES, "pkg/extra.py": ""})
    found = layer_violations(package, TOY_LAYERS)  # "pkg" is the facade's __init__, not a catch-all
    assert found == {("pkg/extra.py", "pkg.extra"): "pkg/extra.py: module pkg.extra has no entry in LAYERS: place it"}
    assert layer_violations(package, {**TOY_LAYERS, "pkg.extra": 1}) == {}


def test_checker_finds_a_circle_hidden_in_a_function(tmp_path):
    files = {**TOY_FILES, "pkg/low/a.py": "def f():\n    from pkg.high.b import VALUE\n    return VALUE\n"}
    cycles = import_cycles(_write_package(tmp_path, files))
    assert list(cycles) == [frozenset({"pkg.low.a", "pkg.high.b"})], cycles
    message = cycles[frozenset({"pkg.low.a", "pkg.high.b"})]
    assert "pkg.low.a -> pkg.high.b (pkg/low/a.py:2 `from pkg.high.b import VALUE`)" in message, message
    assert "pkg.high.b -> pkg.low.a (pkg/high/b.py:1 `from pkg.low import a`)" in message, message


def test_checker_finds_a_circle_through_a_package_init(tmp_path):
    """Importing pkg.high.c runs pkg/high/__init__.py first, which here imports b, which imports a."""
    files = {
        **TOY_FILES,
        "pkg/low/a.py": "def f():\n    import pkg.high.c\n",
        "pkg/high/__init__.py": "from pkg.high.b import VALUE\n",
        "pkg/high/c.py": "",
    }
    cycles = import_cycles(_write_package(tmp_path, files))
    assert list(cycles) == [frozenset({"pkg.low.a", "pkg.high", "pkg.high.b"})], cycles


def test_checker_catches_a_library_imported_outside_its_owner(tmp_path):
    files = {**TOY_FILES, "pkg/high/b.py": "import os\n\ndef f():\n    from deepspeed.comm import torch\n"}
    package = _write_package(tmp_path, files)
    assert library_imports(package, {"deepspeed": ("pkg.low",)}) == [
        "pkg/high/b.py:4 `from deepspeed.comm import torch`: only pkg.low import deepspeed"
    ]
    assert library_imports(package, {"deepspeed": ("pkg.high",)}) == []
