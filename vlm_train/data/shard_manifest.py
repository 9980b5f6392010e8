"""`vlm-shards manifest DIR`: existing WebDataset corpora (LAION/CC style: jpg + txt/json) as-is.

The pipeline needs each shard's sample count up front (to give every rank equal batches); it reads
them from `manifest.json` beside the shards, which this command writes from the tar headers alone
(no image bytes are read). It also says which `data.*` overrides read the corpus.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from pathlib import Path

from vlm_train.data.shard_util import DEFAULT_IMAGE_KEYS, brace_pattern, parallel_map, shell_words
from vlm_train.errors import DataError

IMAGE_EXTENSIONS = {"png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff"}
WDS_META = re.compile(r"__[^/]*__($|/)")  # members WebDataset skips
WDS_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's key.extension split


def scan_tar(path: Path) -> tuple[int, Counter, bytes | None]:
    """(samples, member extensions, first .json member) as WebDataset will group the members:
    consecutive members sharing a key form one sample."""
    count, previous = 0, None
    extensions: Counter[str] = Counter()
    first_json: bytes | None = None
    try:
        with tarfile.open(path, "r:") as tar:  # plain tar: headers are read, data is seeked over
            for member in tar:
                match = WDS_KEY.match(member.name) if member.isreg() and not WDS_META.match(member.name) else None
                if match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                count += key != previous
                previous = key
                extensions[ext] += 1
                if ext == "json" and first_json is None:
                    data = tar.extractfile(member)
                    assert data is not None, "a regular member has data"
                    first_json = data.read()
    except (tarfile.TarError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path} is not a readable tar file: {reason}") from None
    return count, extensions, first_json


def reading_overrides(extensions: Counter, first_json: bytes | None) -> tuple[list[str], list[str]]:
    """(overrides that read this corpus, notes on what the pipeline cannot read from it)."""
    overrides, notes = [], []
    images = set(extensions) & IMAGE_EXTENSIONS
    if not images:
        notes.append("no image members: every sample trains as text only")
    elif images - DEFAULT_IMAGE_KEYS:
        overrides.append(f"data.image_key={';'.join(sorted(DEFAULT_IMAGE_KEYS | images))}")
    try:
        conversations = first_json is not None and "conversations" in json.loads(first_json)
    except (ValueError, TypeError):
        conversations = False
    if conversations:
        return overrides, notes  # LLaVA records: the default data.text_key=json
    if "txt" in extensions:
        overrides += ["data.text_key=txt", "data.template=plain"]
    else:
        notes.append("no .txt captions and no LLaVA 'conversations' in .json: rewrite it with vlm-shards captions")
    return overrides, notes


def manifest_command(folder: Path, workers: int) -> dict:
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise DataError(f"{folder} holds no .tar shards")
    scans = parallel_map(scan_tar, tars, workers)
    empty = [t.name for t, (count, _, _) in zip(tars, scans) if count == 0]
    if empty:
        print(f"warning: {len(empty)} shards hold no samples, e.g. {empty[0]}")
    manifest_file = folder / "manifest.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    manifest["shards"] = {t.name: count for t, (count, _, _) in zip(tars, scans)}
    manifest["total"] = sum(manifest["shards"].values())
    manifest_file.write_text(json.dumps(manifest, indent=1))
    extensions: Counter[str] = sum((ext for _, ext, _ in scans), Counter())
    first_json = next((j for _, _, j in scans if j is not None), None)
    overrides, notes = reading_overrides(extensions, first_json)
    members = ", ".join(f"{ext} {n}" for ext, n in sorted(extensions.items()))
    print(f"{manifest['total']} samples in {len(tars)} shards ({members}); wrote {manifest_file}")
    for note in notes:
        print(f"note: {note}")
    urls = f"data.urls={brace_pattern(folder, [t.name for t in tars])}"
    print(f"train on them with: {shell_words([urls, *overrides])}")
    return manifest
