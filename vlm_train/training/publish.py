"""Atomic publishing of checkpoint folders: write aside, rename into place, then move `latest`.

A save writes into `step_<N>.partial/`; `publish` renames it to `step_<N>` and then replaces
`latest` (both atomic renames, each made durable with an fsync of the directory), so a crash or
SIGKILL at any moment of a save leaves `latest` naming a complete checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from vlm_train.files import fsync_dir, write_atomic
from vlm_train.parallel.signals import fault_point

LATEST = "latest"  # the file naming the newest complete step folder
PARTIAL = ".partial"  # suffix of a folder still being written


def publish(root: Path, partial: Path, tag: str) -> None:
    """Rename a complete `partial` folder to root/tag, then point `latest` at it."""
    final = root / tag
    if final.exists():  # the same step saved again after a resume
        shutil.rmtree(final)
    os.replace(partial, final)
    fsync_dir(root)
    fault_point("publish", int(tag.removeprefix("step_")), 0, root.parent)  # tests stop rank 0 here
    write_atomic(root / LATEST, lambda f: f.write(tag.encode()))
    fsync_dir(root)


def prune(root: Path, keep: int) -> None:
    """Delete stale partials and, unless `keep` is 0 (keep all), all but the newest `keep` step
    folders (never the one `latest` names) and the folders after `latest`: left by an earlier
    attempt (a save killed between its rename and `latest`, a damaged checkpoint the resume
    skipped), never resumed, and not to count among those kept."""
    latest = (root / LATEST).read_text().strip()
    for stale in root.glob(f"step_*{PARTIAL}"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep <= 0:
        return
    steps = sorted(
        (p for p in root.glob("step_*") if p.name.split("_")[-1].isdigit()), key=lambda p: int(p.name.split("_")[-1])
    )
    newest = int(latest.split("_")[-1])
    for folder in [p for p in steps if int(p.name.split("_")[-1]) > newest]:
        shutil.rmtree(folder, ignore_errors=True)
        steps.remove(folder)
    for folder in steps[:-keep]:
        if folder.name != latest:
            shutil.rmtree(folder, ignore_errors=True)
