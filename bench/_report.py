"""What every benchmark writes into docs/benchmarks.md: its own section (the others left as they
are), opened by the command, date, machine and versions behind its numbers."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "docs" / "benchmarks.md"
VERSIONS = ("torch", "deepspeed", "transformers", "pillow")


def run_details(argv: list[str] | None = None) -> str:
    """The line that opens a section: "`python bench/x.py --flags` on x86_64 with 2 cores, <date>, ..."."""
    argv = sys.argv if argv is None else argv
    command = " ".join(["python", f"bench/{Path(argv[0]).name}", *argv[1:]])
    versions = ", ".join(f"{name} {_version(name)}" for name in VERSIONS)
    return (
        f"`{command}` on {platform.machine()} with {os.cpu_count()} cores, {datetime.date.today()}, "
        f"Python {platform.python_version()}, {versions}"
    )


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def write_section(section: str, path: Path = BENCHMARKS) -> None:
    """Replace the section of `path` whose heading is `section`'s first line (or append it)."""
    heading = section.splitlines()[0]
    assert heading.startswith("## "), "a section starts with its '## ' heading"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section.rstrip("\n") + "\n" + (text[end:] if end >= 0 else "")
    path.write_text(text.rstrip("\n") + "\n")
    print(f"wrote the '{heading[3:]}' section of {path}")
