"""Helpers both halves of `vlm-shards` use (shards.py converts, shard_manifest.py counts existing
shards): a leaf module, so neither imports the other for them."""

from __future__ import annotations

import multiprocessing
import re
import shlex
from collections.abc import Callable, Iterable
from pathlib import Path

DEFAULT_IMAGE_KEYS = {"png", "jpg", "jpeg", "webp"}  # data.image_key's default


def parallel_map(function: Callable, items: Iterable, workers: int, chunksize: int = 1) -> list:
    """`map` in input order, over a process pool when workers > 1."""
    if workers <= 1:
        return list(map(function, items))
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return list(pool.imap(function, items, chunksize=chunksize))


def shell_words(overrides: list[str]) -> str:
    """Overrides as one pastes them into a shell (braces and ';' quoted)."""
    return " ".join(shlex.quote(o) for o in overrides)


def brace_pattern(folder: Path, names: list[str]) -> str:
    """A `data.urls` pattern for these shard files: `{000000..000009}` when numbered contiguously."""
    matches = [re.fullmatch(r"(.*?)(\d+)(\.tar)", n) for n in sorted(names)]
    parts = [m for m in matches if m is not None]
    if len(parts) == len(matches) and len({(p[1], p[3], len(p[2])) for p in parts}) == 1:
        numbers = [int(p[2]) for p in parts]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            first, last = parts[0], parts[-1]
            span = first[2] if len(parts) == 1 else f"{{{first[2]}..{last[2]}}}"
            return str(folder / f"{first[1]}{span}{first[3]}")
    return str(folder / ("{" + ",".join(sorted(names)) + "}" if len(names) > 1 else names[0]))
