"""Type hints are checked: `make typecheck` (mypy over vlm_train, settings in pyproject.toml's
[tool.mypy]) runs in the suite, so CI fails on a type error as it does on a ruff finding."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO


def test_mypy():
    # One run over the whole package (~30 s on 2 cores cold, a few seconds with .mypy_cache warm)
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
