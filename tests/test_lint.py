"""Hygiene is mechanical: `make lint` (ruff check + ruff format --check) runs in the suite, so CI fails on it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO

PATHS = ["vlm_train", "tests", "launch", "bench"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff(command):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *PATHS], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
