"""The test suite's own shape: test modules share code through tests/helpers.py and tests/slurm_helpers.py (plain helpers) and
tests/conftest.py (fixtures), never by importing each other, so one module can move or change
without breaking another."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers import REPO

TEST_MODULE = re.compile(r"\b(?:from|import)\s+tests\.(test_\w+)")


def imported_test_modules(path: Path) -> set[str]:
    """Test modules `path` imports: import statements anywhere (also inside functions), and code
    strings a test hands to a subprocess (`python -c` code naming a tests.test_* module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [f"tests.{module}" for module in TEST_MODULE.findall(node.value)]
        else:
            continue
        found.update(name.split(".")[1] for name in names if re.fullmatch(r"tests\.test_\w+(\..*)?", name))
    return found


def test_no_test_module_imports_another():
    offenders = {
        path.name: sorted(modules)
        for path in sorted((REPO / "tests").glob("test_*.py"))
        if (modules := imported_test_modules(path))
    }
    assert not offenders, (
        f"test modules importing other test modules (move the shared code to a helper module such as tests/helpers.py): {offenders}"
    )
