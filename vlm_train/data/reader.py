"""Reading WebDataset tar shards: local files (seekable), `pipe:` commands and http(s) URLs.

A sample is the run of consecutive tar members sharing a key (`<key>.<ext>`), as WebDataset
groups them. `read_slice` yields exactly as many items as the slice holds: a shard that ends
early or breaks mid-way yields `SkippedSample` markers for the samples it could not give, so every
(rank, worker) slot keeps its length and the ranks their equal batch counts.

Positioning inside a local shard reads tar headers only (data is seeked over), so resuming deep
into a shard costs a header scan of that one shard, whatever the training progress.
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

log = logging.getLogger(__name__)

META_MEMBER = re.compile(r"__[^/]*__($|/)")  # WebDataset's metadata members, not samples
KEY_AND_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass(frozen=True)
class Slice:
    """Samples [start, stop) of one shard, counted in the shard's own order."""

    url: str
    start: int
    stop: int


@dataclass(frozen=True)
class SkippedSample:
    """A training sample that could not be used (the pipeline puts a masked placeholder in its
    place): `reason` is one of samples.SKIP_REASONS. Not shard_records.RejectedRecord, a record
    the converter left out of the shards."""

    reason: str
    key: str


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def remote_command(url: str) -> str:
    """The shell command whose stdout is the shard: `pipe:CMD` as given, http(s) through curl."""
    if url.startswith("pipe:"):
        return url[len("pipe:") :]
    if url.startswith(("http://", "https://")):
        return f"curl --silent --show-error --fail --location {shlex.quote(url)}"
    raise ValueError(f"{url}: unsupported URL scheme (use a local path, http(s):// or pipe:COMMAND)")


@contextmanager
def open_tar(url: str) -> Iterator[tarfile.TarFile]:
    """A local shard opened for random access, or a remote one as a forward-only stream."""
    if is_local(url):
        with tarfile.open(url, "r:*") as tar:
            yield tar
        return
    process = subprocess.Popen(remote_command(url), shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stream: IO[bytes] = process.stdout  # type: ignore[assignment]
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            yield tar
    finally:
        # stopping early (a slice ends mid-shard) is normal: end the command rather than drain it
        if process.poll() is None:
            process.kill()
        process.wait()
        stream.close()
        process.stderr.close()  # type: ignore[union-attr]


def _sample_members(tar: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, extension, member) of each sample member, in tar order."""
    for member in tar:
        # keep no headers: a long stream would otherwise hold all of them (TarFile's own list,
        # which typeshed leaves undeclared)
        tar.members = []  # type: ignore[attr-defined]
        if not member.isreg() or META_MEMBER.match(member.name):
            continue
        match = KEY_AND_EXT.match(member.name)
        if match:
            yield match.group(1), match.group(2).lower(), member


def tar_samples(url: str, start: int = 0, hint: tuple[int, int, str] | None = None) -> Iterator[dict]:
    """Samples of one shard from index `start` on; members before it are never read, only passed.

    `hint` = (sample index, byte offset of its first header, its key) lets a local shard seek there
    instead of scanning from the top (a resume passes the block start its checkpoint recorded); a
    hint that no longer matches the file (the shard was rewritten) falls back to the scan. Each
    sample carries `__where__` = (url, index, offset, key) for such hints.
    """
    usable = hint is not None and is_local(url) and 0 < hint[1] and hint[0] <= start  # offset 0: the plain scan
    seek = hint if usable else None
    with open_tar(url) as tar:
        index, current = -1, None
        if seek is not None:
            # tarfile reads on from `offset` once its private record of members read so far is reset
            tar.firstmember, tar.offset, tar.members = None, seek[1], []  # type: ignore[attr-defined]
            index = seek[0] - 1
        for key, ext, member in _sample_members(tar):
            if current is None or key != current["__key__"]:
                if seek is not None and current is None and key != seek[2]:
                    log.warning("%s changed since its position was saved: scanning it from the start", url)
                    break
                if current is not None and index >= start:
                    yield current
                index += 1
                current = {"__key__": key, "__url__": url, "__where__": (url, index, member.offset, key)}
            if index >= start:
                data = tar.extractfile(member)
                assert data is not None, "a regular member has data"
                current[ext] = data.read()
        else:
            if current is not None and index >= start:
                yield current
            if current is not None or seek is None:
                return
            log.warning("%s has no sample where its saved position says: scanning it from the start", url)
    yield from tar_samples(url, start)


def read_slice(piece: Slice, hints: dict[str, list[tuple]] | None = None) -> Iterator[dict | SkippedSample]:
    """Exactly `stop - start` items: raw samples ({"__key__", ext: bytes}) or `SkippedSample` markers
    where the shard is truncated, corrupt, or shorter than its declared size."""
    wanted, produced = piece.stop - piece.start, 0
    usable = [h for h in (hints or {}).get(piece.url, []) if h[0] <= piece.start]
    try:
        for sample in tar_samples(piece.url, piece.start, max(usable, default=None)):
            if produced == wanted:
                return
            yield sample
            produced += 1
    except (tarfile.TarError, OSError, EOFError) as err:
        log.warning("shard %s is unreadable after sample %d: %s", piece.url, piece.start + produced, err)
    if produced < wanted:
        log.warning(
            "skipping samples %d-%d of %s: the shard ends early", piece.start + produced, piece.stop - 1, piece.url
        )
    for index in range(piece.start + produced, piece.stop):
        yield SkippedSample("corrupt_tar", f"{piece.url}#{index}")


def count_samples(url: str) -> int:
    """Samples in a local shard, from its tar headers (a truncated last sample still counts: reading
    it later reports it as skipped, so the loss is counted rather than silent)."""
    count, last_key = 0, None
    try:
        with open_tar(url) as tar:
            for key, _, _ in _sample_members(tar):
                count, last_key = count + (key != last_key), key
    except tarfile.TarError as err:
        log.warning("shard %s is unreadable after %d samples: %s", url, count, err)
    return count


def skipped(reason: str, key: str, why: str) -> SkippedSample:
    """A bad sample: logged, and counted under `reason` (one of samples.SKIP_REASONS)."""
    log.warning("skipping sample %s: %s", key, why)
    return SkippedSample(reason, key)
