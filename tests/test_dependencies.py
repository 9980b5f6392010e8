"""The lock (constraints.txt) is what the suite runs on, and pyproject's bounds do not claim more.

A fresh install reproduces what was tested only if the README's commands install from the lock,
the lock names every package this environment holds at the version it holds, and pyproject's lower
bounds are those tested versions (not older ones nobody ran).
"""

from __future__ import annotations

import re
from importlib import metadata

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.helpers import REPO

# Builds that come from the platform (NGC containers ship their own): bounds stay wide on purpose.
PLATFORM_PACKAGES = {"torch", "numpy", "pillow"}
NOT_LOCKED = {"vlm-train", "pip", "setuptools", "wheel"}


def locked_versions() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version.strip())
    return pins


def test_every_installed_package_is_locked_at_its_version():
    pins = locked_versions()
    drift = []
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in NOT_LOCKED:
            continue
        installed = Version(dist.version)
        if pins.get(name) != Version(installed.base_version if name == "torch" else dist.version):
            drift.append(f"{name} {dist.version} (lock: {pins.get(name)})")
    assert not drift, f"installed versions differ from constraints.txt (run `make lock`): {drift}"


def test_lower_bounds_are_the_tested_versions():
    pins = locked_versions()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wrong = []
    for spec in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        locked = pins[name]
        if locked not in requirement.specifier:
            wrong.append(f"{spec} excludes the locked {locked}")
        lower = [s.version for s in requirement.specifier if s.operator in (">=", "==")]
        if name not in PLATFORM_PACKAGES and lower:
            parts = len(lower[0].split("."))
            tested = ".".join(str(p) for p in (*locked.release, 0, 0)[:parts])
            if Version(lower[0]) != Version(tested):
                wrong.append(f"{spec}: lower bound is not the tested {locked}")
    assert not wrong, wrong


def test_readme_and_ci_install_from_the_lock():
    torch_pin = f"torch=={locked_versions()['torch']}"
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^python3 -m venv .*$", readme, flags=re.M)[:2]
    ci = (REPO / ".ci" / "run").read_text()
    assert len(commands) == 2 and commands[1] in ci
    for command in commands:
        assert f"pip install -q {torch_pin} " in command and "-c constraints.txt" in command
