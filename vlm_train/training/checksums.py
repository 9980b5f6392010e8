"""SHA-256 checksums of checkpoint files: computed by the writer while it writes, checked on resume.

Every rank writes `SHA256SUMS.rank<R>` beside the files it wrote, in `sha256sum`'s format
(`<hex digest>  <file name>`), so `cd step_<N> && sha256sum -c SHA256SUMS.rank*` checks a folder
by hand. The digest is of the bytes handed to the file as they were written (`HashingFile`): no
second read on save. A resume re-reads every listed file (`problems`), split across ranks.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, cast

from vlm_train.files import write_atomic

MANIFEST_PREFIX = "SHA256SUMS.rank"
_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")
_CHUNK = 8 << 20


def manifest_name(rank: int) -> str:
    return f"{MANIFEST_PREFIX}{rank:05d}"


class HashingFile:
    """A writable file that hashes what goes through it; `after_first_write` runs once, after the
    first bytes reached the file (the fault-injection hook for "killed mid-write")."""

    def __init__(self, file: IO[bytes], after_first_write: Callable[[], None] | None = None):
        self.file, self.sha256, self.size = file, hashlib.sha256(), 0
        self.after_first_write = after_first_write

    def write(self, data) -> int:
        written = self.file.write(data)
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        if self.after_first_write is not None and self.size:
            hook, self.after_first_write = self.after_first_write, None
            self.file.flush()
            hook()
        return written

    def flush(self) -> None:
        self.file.flush()


def write_hashed(
    path: Path, write: Callable[[IO[bytes]], object], after_first_write: Callable[[], None] | None = None
) -> str:
    """Write `path` atomically (temp file, fsync, rename) and return the SHA-256 of its bytes."""
    hashed: list[HashingFile] = []

    def through_hash(f: IO[bytes]) -> None:
        hashed.append(HashingFile(f, after_first_write))
        write(cast(IO[bytes], hashed[0]))  # a writable binary file as far as the writer can tell

    write_atomic(path, through_hash)
    return hashed[0].sha256.hexdigest()


def write_manifest(folder: Path, rank: int, digests: dict[str, str]) -> None:
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items()))
    write_atomic(folder / manifest_name(rank), lambda f: f.write(lines.encode()))


def read_manifests(folder: Path) -> dict[str, str] | None:
    """File name -> SHA-256 over every rank's manifest; None when the folder has no manifest (a
    checkpoint written before vlm_train recorded checksums). Raises ValueError on a bad line."""
    manifests = sorted(folder.glob(f"{MANIFEST_PREFIX}*"))
    if not manifests:
        return None
    digests = {}
    for manifest in manifests:
        for line in manifest.read_text().splitlines():
            match = _LINE.fullmatch(line)
            if match is None:
                raise ValueError(f"{manifest.name} has a line that is not `<sha256>  <file>`: {line[:80]!r}")
            digests[match[2]] = match[1]
    return digests


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe(name: str) -> str:
    """What a checkpoint file holds, for messages: "optimizer file zero_pp_rank_1_..._optim_states.pt"."""
    kinds = (
        ("optim_states.pt", "optimizer file"),
        ("model_states.pt", "model file"),
        ("trainer_rank", "trainer-state file"),
        (MANIFEST_PREFIX, "checksum list"),
    )
    kind = next((kind for key, kind in kinds if key in name), "file")
    return f"{kind} {name}"


def problems(folder: Path, names: list[str], digests: dict[str, str]) -> list[str]:
    """What is wrong with `names` (files listed in `digests`): missing, or bytes that do not hash
    to the recorded digest (a flipped bit, a truncated write)."""
    found = []
    for name in names:
        path = folder / name
        if not path.is_file():
            found.append(f"{describe(name)} is missing")
        elif sha256_file(path) != digests[name]:
            found.append(f"{describe(name)} fails its checksum (flipped or truncated)")
    return found


def structure_problems(folder: Path, digests: dict[str, str]) -> list[str]:
    """Problems visible without reading data: a rank's trainer file without that rank's manifest,
    or a listed file that is not there."""
    found = []
    for trainer_file in sorted(folder.glob("trainer_rank*.pt")):
        manifest = manifest_name(int(trainer_file.stem.removeprefix("trainer_rank")))
        if not (folder / manifest).is_file():
            found.append(f"{describe(manifest)} is missing")
    found += [f"{describe(name)} is missing" for name in sorted(digests) if not (folder / name).is_file()]
    return found


def share_of_work(folder: Path, names: list[str], rank: int, world: int) -> list[str]:
    """This rank's files to check: the biggest first, dealt out in turn, so that ranks read about
    as many bytes each (every rank computes the same split)."""
    sized = sorted(names, key=lambda name: (-os.stat(folder / name).st_size, name))
    return sized[rank::world]
